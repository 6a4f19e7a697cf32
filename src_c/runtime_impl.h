/* runtime.h's activation entry points for one element type (see fn_instantiate.h), instantiated by runtime.c:
 * each runs a building block of fn_activation.h piece by piece through an L1 buffer, as the kernels run them
 * (which also lets y or g be x). */
#ifndef FN_T
#error "runtime_impl.h is instantiated by runtime.c"
#endif

#define FN_ACTIVATION_PIECE 1024

FN_VECTOR_KERNEL void FN_NAME(fn_exp_values)(const FN_T *x, FN_T *y, ptrdiff_t n)
{
    FN_T piece[FN_ACTIVATION_PIECE];
    for (ptrdiff_t i = 0; i < n; i += FN_ACTIVATION_PIECE) {
        const ptrdiff_t len = fn_min(n - i, FN_ACTIVATION_PIECE);
        FN_NAME(fn_exp_run)(x + i, piece, len);
        memcpy(y + i, piece, (size_t)len * sizeof *y);
    }
}

FN_VECTOR_KERNEL void FN_NAME(fn_activate_values)(const FN_T *x, FN_T *y, ptrdiff_t n, fn_activation act)
{
    FN_T piece[FN_ACTIVATION_PIECE];
    for (ptrdiff_t i = 0; i < n; i += FN_ACTIVATION_PIECE) {
        const ptrdiff_t len = fn_min(n - i, FN_ACTIVATION_PIECE);
        memcpy(piece, x + i, (size_t)len * sizeof *x);
        FN_NAME(fn_activate_run)(piece, len, act);
        memcpy(y + i, piece, (size_t)len * sizeof *y);
    }
}

FN_VECTOR_KERNEL void FN_NAME(fn_activation_grad_values)(const FN_T *dy, const FN_T *x, FN_T *g, ptrdiff_t n,
                                                         fn_activation act)
{
    FN_T piece[FN_ACTIVATION_PIECE];
    for (ptrdiff_t i = 0; i < n; i += FN_ACTIVATION_PIECE) {
        const ptrdiff_t len = fn_min(n - i, FN_ACTIVATION_PIECE);
        memcpy(piece, x + i, (size_t)len * sizeof *x);
        FN_NAME(fn_activation_grad_run)(dy + i, piece, len, act);
        memcpy(g + i, piece, (size_t)len * sizeof *g);
    }
}

#undef FN_ACTIVATION_PIECE
