/* The one way foldnorm's C code is written once for both element types.
 *
 * A file NAME_impl.h holds type-generic code written with
 *   FN_T           the element type of the tensors (float or double),
 *   FN_NAME(name)  name with the type's suffix (name_f32, name_f64), from fn_platform.h,
 *   FN_IS_F32      1 for float: where the float32 fast paths (float32 lanes checked against, and backed by,
 *                  the exact float64 code) and float-only shortcuts are compiled in,
 * and the file that uses it instantiates it once per element type with
 *   #define FN_IMPL "NAME_impl.h"
 *   #include "fn_instantiate.h"
 * The impl file keeps its own line numbers in diagnostics and debuggers, and uses plain `#pragma omp`.
 * This file has no include guard: it is included once per impl file.
 */
#ifndef FN_IMPL
#error "define FN_IMPL (the *_impl.h to instantiate) before including fn_instantiate.h"
#endif

#define FN_T float
#define FN_S f32
#define FN_IS_F32 1
#include FN_IMPL
#undef FN_T
#undef FN_S
#undef FN_IS_F32

#define FN_T double
#define FN_S f64
#define FN_IS_F32 0
#include FN_IMPL
#undef FN_T
#undef FN_S
#undef FN_IS_F32

#undef FN_IMPL
