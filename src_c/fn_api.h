/* What every foldnorm kernel entry point has in common: its status, its argument order, its types.
 *
 * Each family header (batch_norm.h, group_norm.h, layer_norm.h) declares a pair of entry points per kernel,
 * NAME_f32 for float tensors and NAME_f64 for double tensors, and every one of them follows these rules:
 *
 * - Arguments come in this order: the tensors read (x; or dy, x for a backward), the tensor written (y, or
 *   dx), the shape, the per-channel, per-group or per-row values read (statistics, then parameters), eps,
 *   the values written (statistics, or parameter gradients), num_threads.
 * - Tensors (x, y, dy, dx) are C-contiguous arrays of the element type.  Everything else, parameters
 *   (weight, bias), statistics (mean, var, invstd, invrms) and parameter gradients (dweight, dbias), is a
 *   C-contiguous array of double for both element types: statistics are accumulated and written in double,
 *   and read as given.
 * - weight and bias may be NULL, for 1 and 0.
 * - A kernel with an activation takes it right after eps (a backward pass: right after the parameters); its
 *   backward pass recomputes the pre-activation from x, so it reads bias too.
 * - num_threads threads at most share the work, which is cut into units fixed by the shape alone and whose
 *   partial results are merged in a fixed order: every result is bit-identical for any num_threads.
 * - The return value is an fn_status: FN_OK, or FN_NOMEM when the scratch memory the kernel needs cannot be
 *   allocated (its outputs are then unspecified).
 */
#ifndef FOLDNORM_FN_API_H
#define FOLDNORM_FN_API_H

typedef enum {
    FN_OK = 0,
    FN_NOMEM = 1,
} fn_status;

/* The activation a kernel applies after the normalization, y = act(norm(x)), and whose gradient its backward
 * pass takes (fn_activation.h). */
typedef enum {
    FN_ACT_NONE = 0,
    FN_ACT_RELU = 1,
    FN_ACT_SILU = 2,
} fn_activation;

#endif
