/* Build and thread facts, and the multi-threaded copy (see runtime.h). */
#include "runtime.h"

#include <string.h>

#include "fn_activation.h"
#include "fn_platform.h"
#include "fn_pool.h"

/* Bytes per parallel task of fn_parallel_copy. */
#define FN_COPY_PIECE ((size_t)1 << 20)

int fn_openmp_enabled(void) { return FN_OPENMP_ENABLED; }

const char *fn_vector_paths(void)
{
#if FN_VECTOR_DISPATCH
    return "x86-64-v4,x86-64-v3,baseline";
#elif defined(__AVX512F__)
    return "compile-time AVX-512";
#elif defined(__AVX2__)
    return "compile-time AVX2";
#else
    return "baseline";
#endif
}

const char *fn_vector_path(void)
{
#if FN_VECTOR_DISPATCH
    /* The choice the loader's dispatch makes: the highest level this CPU supports. */
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4"))
        return "x86-64-v4";
    if (__builtin_cpu_supports("x86-64-v3"))
        return "x86-64-v3";
    return "baseline";
#else
    return fn_vector_paths();
#endif
}

int fn_get_max_threads(void) { return fn_omp_get_max_threads(); }

void fn_set_max_threads(int n) { fn_omp_set_num_threads(n); }

typedef struct {
    char *dst;
    const char *src;
    size_t nbytes;
} fn_copy_job;

static void fn_copy_region(fn_worker *w, void *arg)
{
    const fn_copy_job *j = arg;
    const ptrdiff_t pieces = (ptrdiff_t)((j->nbytes + FN_COPY_PIECE - 1) / FN_COPY_PIECE);
    FN_FOR(w, p, pieces, (ptrdiff_t)(FN_COPY_PIECE / 4))
    {
        size_t start = (size_t)p * FN_COPY_PIECE;
        size_t len = j->nbytes - start < FN_COPY_PIECE ? j->nbytes - start : FN_COPY_PIECE;
        memcpy(j->dst + start, j->src + start, len);
    }
}

void fn_parallel_copy(void *dst, const void *src, size_t nbytes, int num_threads)
{
    fn_copy_job j = {(char *)dst, (const char *)src, nbytes};
    fn_team_run(num_threads, fn_copy_region, &j);
}

/* The activations' building blocks on their own, for float and double. */
#define FN_IMPL "runtime_impl.h"
#include "fn_instantiate.h"
