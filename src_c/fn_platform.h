/* The platform under foldnorm's kernels: optional OpenMP, the vector-target dispatch, streaming stores, and
 * the small integer helpers.
 *
 * This is the only file that names OpenMP functions or x86 intrinsics.  Kernels parallelize with plain
 * `#pragma omp` (which a compiler without OpenMP ignores; the build then adds -Wno-unknown-pragmas) and
 * mark a `num_threads` they only pass to such pragmas with `(void)num_threads;`.
 */
#ifndef FOLDNORM_FN_PLATFORM_H
#define FOLDNORM_FN_PLATFORM_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* ---- OpenMP, or one thread ---- */

#ifdef _OPENMP
#include <omp.h>
#define FN_OPENMP_ENABLED 1
static inline int fn_omp_get_max_threads(void) { return omp_get_max_threads(); }
static inline void fn_omp_set_num_threads(int n) { omp_set_num_threads(n); }
#else
#define FN_OPENMP_ENABLED 0
static inline int fn_omp_get_max_threads(void) { return 1; }
static inline void fn_omp_set_num_threads(int n) { (void)n; }
#endif

/* ---- Vector targets ---- */

/* A building block that must be compiled into its caller's vector target. */
#if defined(__GNUC__)
#define FN_INLINE static inline __attribute__((always_inline))
#else
#define FN_INLINE static inline
#endif

/* A rarely taken path, kept out of line: its code then does not change how the hot loops around it are
 * compiled and laid out. */
#if defined(__GNUC__)
#define FN_COLD static __attribute__((cold, noinline))
#else
#define FN_COLD static
#endif

/* The compute-bound loops are compiled three times, for baseline x86-64, for x86-64-v3 (AVX2 and FMA) and
 * for x86-64-v4 (AVX-512), and the loader picks one by the CPU it runs on (GNU ifunc), so a built package
 * still runs on any x86-64.  Which version runs depends on the CPU alone, never on the thread count, so
 * results stay bit-identical for any number of threads on one machine; the build contracts a * b + c into
 * FMA where the target has it.  A kernel marks its dispatch points FN_VECTOR_KERNEL (one per row, block or
 * unit of work, never per element) and writes the loops they call as FN_INLINE building blocks.  GCC 12 is
 * the first to dispatch on arch=x86-64-v3 and v4; the dispatch needs glibc's ifunc (musl has none).
 * FN_VECTOR_PATHS names the versions built, and fn_vector_path() (runtime.h) the one this CPU runs. */
#if defined(__x86_64__) && defined(__ELF__) && defined(__GLIBC__) && defined(__GNUC__) && !defined(__clang__) \
    && __GNUC__ >= 12 && !defined(__AVX2__)
#define FN_VECTOR_KERNEL __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define FN_VECTOR_DISPATCH 1
#else
#define FN_VECTOR_KERNEL
#define FN_VECTOR_DISPATCH 0
#endif

/* ---- Streaming stores ---- */

/* Outputs of at least this many bytes are written with non-temporal stores: beyond the last-level cache of
 * most machines, where streaming pays off and below which it does not (benchmarks/README.md has the
 * figures). */
#ifndef FN_STREAM_BYTES
#define FN_STREAM_BYTES ((ptrdiff_t)32 << 20)
#endif

/* fn_stream_store_f32/_f64: dst[0..n) = src[0..n) with non-temporal stores, which write an output far larger
 * than the caches straight to memory: no read of every destination line into the cache first, and no
 * eviction of input that is about to be read again (batch_norm_train's second pass over x).  Kernels compute
 * a piece of output into an L1-resident buffer with plain loops and stream it out with these; only this
 * copy names SSE2, which every x86-64 has.  Elsewhere the output is written with ordinary stores. */
#if defined(__SSE2__)
#define FN_STREAMING 1
/* Bytes per non-temporal store, which must be aligned to them. */
#define FN_STREAM_ALIGN 16

/* Scalar stores up to the first aligned address (all of them if dst is not even aligned to its type),
 * aligned non-temporal stores, scalar stores for the tail. */
static inline void fn_stream_store_f32(float *restrict dst, const float *restrict src, ptrdiff_t n)
{
    ptrdiff_t i = 0;
    for (; i < n && ((uintptr_t)(dst + i) % FN_STREAM_ALIGN) != 0; i++)
        dst[i] = src[i];
    for (; i + 4 <= n; i += 4)
        _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
    for (; i < n; i++)
        dst[i] = src[i];
}

static inline void fn_stream_store_f64(double *restrict dst, const double *restrict src, ptrdiff_t n)
{
    ptrdiff_t i = 0;
    for (; i < n && ((uintptr_t)(dst + i) % FN_STREAM_ALIGN) != 0; i++)
        dst[i] = src[i];
    for (; i + 2 <= n; i += 2)
        _mm_stream_pd(dst + i, _mm_loadu_pd(src + i));
    for (; i < n; i++)
        dst[i] = src[i];
}

/* Non-temporal stores are weakly ordered: each thread fences its own before its parallel region ends. */
static inline void fn_stream_fence(void) { _mm_sfence(); }
#else
#define FN_STREAMING 0
static inline void fn_stream_store_f32(float *restrict dst, const float *restrict src, ptrdiff_t n)
{
    memcpy(dst, src, (size_t)n * sizeof *dst);
}

static inline void fn_stream_store_f64(double *restrict dst, const double *restrict src, ptrdiff_t n)
{
    memcpy(dst, src, (size_t)n * sizeof *dst);
}

static inline void fn_stream_fence(void) {}
#endif

/* Whether an output of `count` elements of `size` bytes each is streamed to memory. */
static inline int fn_streams(ptrdiff_t count, size_t size)
{
    return FN_STREAMING && count * (ptrdiff_t)size >= FN_STREAM_BYTES;
}

/* ---- Prefetch ---- */

/* Asks for [p, p + bytes) in L2, a line at a time: a kernel that reads a block twice (its statistics, then its
 * output) issues it for its next block while it writes this one, so that the next block's reads are already
 * under way when it gets there (the hardware prefetchers stop at page edges and idle while the kernel writes). */
static inline void fn_prefetch_l2(const void *p, size_t bytes)
{
    const char *c = p;
    for (size_t i = 0; i < bytes; i += 64)
        __builtin_prefetch(c + i, 0, 2);
}

/* ---- Integer helpers ---- */

static inline ptrdiff_t fn_min(ptrdiff_t a, ptrdiff_t b) { return a < b ? a : b; }

static inline ptrdiff_t fn_max(ptrdiff_t a, ptrdiff_t b) { return a > b ? a : b; }

/* a / b rounded up, for a >= 0 and b > 0. */
static inline ptrdiff_t fn_ceil_div(ptrdiff_t a, ptrdiff_t b) { return (a + b - 1) / b; }

/* Bytes per cache line on the machines the kernels target. */
#define FN_CACHE_LINE 64

/* The first cache-line boundary at or after p, for scratch allocated FN_CACHE_LINE bytes larger. */
static inline void *fn_cache_line_align(void *p)
{
    return (void *)(((uintptr_t)p + FN_CACHE_LINE - 1) & ~(uintptr_t)(FN_CACHE_LINE - 1));
}

/* ---- Element types ---- */

/* FN_NAME(name) is name_f32 or name_f64 inside an *_impl.h (see fn_instantiate.h). */
#define FN_CAT_(a, b) a##_##b
#define FN_CAT(a, b) FN_CAT_(a, b)
#define FN_NAME(name) FN_CAT(name, FN_S)

#endif
