#include "runtime.h"

#include <string.h>

#include "fn_common.h"

int fn_openmp_enabled(void) { return FN_OPENMP_ENABLED; }

int fn_get_max_threads(void) { return fn_omp_get_max_threads(); }

void fn_set_max_threads(int n) { fn_omp_set_num_threads(n); }

void fn_parallel_copy(void *dst, const void *src, size_t nbytes, int num_threads)
{
    const size_t piece = (size_t)1 << 20;
    const ptrdiff_t pieces = (ptrdiff_t)((nbytes + piece - 1) / piece);
    char *d = (char *)dst;
    const char *s = (const char *)src;
    (void)num_threads;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (ptrdiff_t p = 0; p < pieces; p++) {
        size_t start = (size_t)p * piece;
        size_t len = nbytes - start < piece ? nbytes - start : piece;
        memcpy(d + start, s + start, len);
    }
}
