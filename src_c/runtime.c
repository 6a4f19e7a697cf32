/* Build and thread facts, and the multi-threaded copy (see runtime.h). */
#include "runtime.h"

#include <string.h>

#include "fn_platform.h"

/* Bytes per parallel task of fn_parallel_copy. */
#define FN_COPY_PIECE ((size_t)1 << 20)

int fn_openmp_enabled(void) { return FN_OPENMP_ENABLED; }

int fn_get_max_threads(void) { return fn_omp_get_max_threads(); }

void fn_set_max_threads(int n) { fn_omp_set_num_threads(n); }

void fn_parallel_copy(void *dst, const void *src, size_t nbytes, int num_threads)
{
    const ptrdiff_t pieces = (ptrdiff_t)((nbytes + FN_COPY_PIECE - 1) / FN_COPY_PIECE);
    char *d = (char *)dst;
    const char *s = (const char *)src;
    (void)num_threads;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (ptrdiff_t p = 0; p < pieces; p++) {
        size_t start = (size_t)p * FN_COPY_PIECE;
        size_t len = nbytes - start < FN_COPY_PIECE ? nbytes - start : FN_COPY_PIECE;
        memcpy(d + start, s + start, len);
    }
}
