/* fn_activation.h's building blocks for one element type (see fn_instantiate.h). */
#ifndef FN_T
#error "fn_activation_impl.h is instantiated by fn_activation.h"
#endif

#if FN_IS_F32
typedef int32_t FN_NAME(fn_act_bits);
typedef uint32_t FN_NAME(fn_act_ubits);
#define FN_EXP_MANT 23
#define FN_EXP_BIAS 127
#define FN_EXP_ROUND 0x1.8p23f
#define FN_EXP_LO (-104.0f) /* exp(x) rounds to 0 below it */
#define FN_EXP_HI 89.0f     /* and overflows above it */
#define FN_LN2_HI 0.693359375f /* ln 2 to 9 bits: k * FN_LN2_HI is exact for every k the clamp allows */
#define FN_LN2_LO (-2.12194440e-4f)
#define FN_SILU_BIG 0x1p20f
#else
typedef int64_t FN_NAME(fn_act_bits);
typedef uint64_t FN_NAME(fn_act_ubits);
#define FN_EXP_MANT 52
#define FN_EXP_BIAS 1023
#define FN_EXP_ROUND 0x1.8p52
#define FN_EXP_LO (-746.0)
#define FN_EXP_HI 710.0
#define FN_LN2_HI 0x1.62e42fee00000p-1 /* fdlibm's split: k * FN_LN2_HI is exact for |k| < 2048 */
#define FN_LN2_LO 0x1.a39ef35793c76p-33
#define FN_SILU_BIG 0x1p60
#endif

FN_INLINE FN_T FN_NAME(fn_from_bits)(FN_NAME(fn_act_bits) b)
{
    FN_T v;
    memcpy(&v, &b, sizeof v);
    return v;
}

FN_INLINE FN_NAME(fn_act_bits) FN_NAME(fn_to_bits)(FN_T v)
{
    FN_NAME(fn_act_bits) b;
    memcpy(&b, &v, sizeof b);
    return b;
}

/* cond ? a : b, as a blend of bits: GCC does not turn a ?: whose value feeds floating-point arithmetic
 * into a vector select for targets without a blend instruction (it keeps a branch around operations that
 * might trap), whereas masks vectorize everywhere. */
FN_INLINE FN_T FN_NAME(fn_pick)(int cond, FN_T a, FN_T b)
{
    const FN_NAME(fn_act_bits) mask = -(FN_NAME(fn_act_bits))cond;
    return FN_NAME(fn_from_bits)((FN_NAME(fn_to_bits)(a) & mask) | (FN_NAME(fn_to_bits)(b) & ~mask));
}

/* |x| in the element type (fabs would widen float to double). */
FN_INLINE FN_T FN_NAME(fn_abs)(FN_T x)
{
    return FN_NAME(fn_from_bits)(FN_NAME(fn_to_bits)(x) & ~FN_NAME(fn_to_bits)((FN_T)-0.0));
}

/* e^r for |r| <= ln2 / 2: its Taylor polynomial (degree 7 for float, 13 for double). */
FN_INLINE FN_T FN_NAME(fn_exp_poly)(FN_T r)
{
#if FN_IS_F32
    FN_T p = 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
#else
    FN_T p = 1.0 / 6227020800.0;
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
#endif
    return p;
}

/* e^x of one value: the loops below call it per element and vectorize it. */
FN_INLINE FN_T FN_NAME(fn_exp1)(FN_T x)
{
    FN_T v = FN_NAME(fn_pick)(x < FN_EXP_LO, FN_EXP_LO, x);
    v = FN_NAME(fn_pick)(v > FN_EXP_HI, FN_EXP_HI, v);
    const FN_T t = v * (FN_T)1.44269504088896340736 + FN_EXP_ROUND;
    const FN_T kf = t - FN_EXP_ROUND;
    const FN_NAME(fn_act_bits) k = FN_NAME(fn_to_bits)(t) - FN_NAME(fn_to_bits)(FN_EXP_ROUND);
    const FN_T r = (v - kf * FN_LN2_HI) - kf * FN_LN2_LO;
    const FN_T p = FN_NAME(fn_exp_poly)(r);
    /* 2^k as 2^(k/2) * 2^(k - k/2): each half is a normal number for every k the clamp allows.  k/2 rounds
     * down by a logical shift of k + 2048 (no 64-bit arithmetic shift before AVX-512). */
    const FN_NAME(fn_act_bits) k1 = (FN_NAME(fn_act_bits))((FN_NAME(fn_act_ubits))(k + 2048) >> 1) - 1024;
    const FN_NAME(fn_act_bits) k2 = k - k1;
    const FN_T s1 = FN_NAME(fn_from_bits)((k1 + FN_EXP_BIAS) << FN_EXP_MANT);
    const FN_T s2 = FN_NAME(fn_from_bits)((k2 + FN_EXP_BIAS) << FN_EXP_MANT);
    return (p * s1) * s2;
}

/* y = e^x over a run (the tests reach it through the activation module). */
FN_INLINE void FN_NAME(fn_exp_run)(const FN_T *restrict x, FN_T *restrict y, ptrdiff_t n)
{
    for (ptrdiff_t i = 0; i < n; i++)
        y[i] = FN_NAME(fn_exp1)(x[i]);
}

/* min(a, b) with a's NaN kept. */
FN_INLINE FN_T FN_NAME(fn_min_keep_nan)(FN_T a, FN_T b)
{
    return FN_NAME(fn_pick)(a > b, b, a);
}

/* magnitude (>= 0) with the sign of x. */
FN_INLINE FN_T FN_NAME(fn_with_sign_of)(FN_T magnitude, FN_T x)
{
    const FN_NAME(fn_act_bits) sign = FN_NAME(fn_to_bits)((FN_T)-0.0);
    return FN_NAME(fn_from_bits)((FN_NAME(fn_to_bits)(x) & sign) | FN_NAME(fn_to_bits)(magnitude));
}

/* e^-a for a >= 0 (or NaN), what the sigmoid needs: fn_exp1's steps and bits, with one clamp, and 2^k
 * (k <= 0) as the normal number 2^(k + 64) times 2^-64, which rounds a denormal result once. */
FN_INLINE FN_T FN_NAME(fn_exp_neg1)(FN_T a)
{
    const FN_T v = FN_NAME(fn_min_keep_nan)(a, -FN_EXP_LO);
    const FN_T t = FN_EXP_ROUND - v * (FN_T)1.44269504088896340736;
    const FN_T kf = t - FN_EXP_ROUND;
    const FN_NAME(fn_act_bits) k = FN_NAME(fn_to_bits)(t) - FN_NAME(fn_to_bits)(FN_EXP_ROUND);
    const FN_T r = (-v - kf * FN_LN2_HI) - kf * FN_LN2_LO;
    const FN_T p = FN_NAME(fn_exp_poly)(r);
    const FN_T scale =
        FN_NAME(fn_from_bits)((FN_NAME(fn_act_bits))((FN_NAME(fn_act_ubits))(k + 64 + FN_EXP_BIAS) << FN_EXP_MANT));
    return (p * scale) * (FN_T)0x1p-64;
}

/* SiLU of one value, x * sigmoid(x) with sigmoid from e = exp(-|x|), which never overflows: 1 / (1 + e) for
 * x >= 0, e / (1 + e) below, so that silu(x) keeps its digits where it is tiny (x near -100).  silu(-inf) is
 * its limit, -0. */
FN_INLINE FN_T FN_NAME(fn_silu1)(FN_T x)
{
    const FN_T e = FN_NAME(fn_exp_neg1)(FN_NAME(fn_abs)(x));
    const FN_T d = 1 / (1 + e);
    const FN_T sigmoid = FN_NAME(fn_pick)(x < 0, e * d, d);
    return FN_NAME(fn_pick)(x < -FN_SILU_BIG, (FN_T)-0.0, x * sigmoid);
}

/* SiLU's derivative, sigmoid(x) * (1 + x * (1 - sigmoid(x))) = sigmoid(x) + x * sigmoid(x) * sigmoid(-x),
 * with sigmoid(x) * sigmoid(-x) = e / (1 + e)^2 for either sign; x is clamped to where that product is 0
 * already, so that infinities give the limits 0 and 1. */
FN_INLINE FN_T FN_NAME(fn_silu_grad1)(FN_T x)
{
    const FN_T a = FN_NAME(fn_abs)(x);
    const FN_T e = FN_NAME(fn_exp_neg1)(a);
    const FN_T d = 1 / (1 + e);
    const FN_T ed = e * d;
    const FN_T sigmoid = FN_NAME(fn_pick)(x < 0, ed, d);
    const FN_T v = FN_NAME(fn_with_sign_of)(FN_NAME(fn_min_keep_nan)(a, FN_SILU_BIG), x);
    return sigmoid + v * (ed * d);
}

/* y = act(y) over a run, in place.  ReLU keeps NaN (NaN < 0 is false), as torch's does. */
FN_INLINE void FN_NAME(fn_activate_run)(FN_T *restrict y, ptrdiff_t n, fn_activation act)
{
    if (act == FN_ACT_RELU)
        for (ptrdiff_t i = 0; i < n; i++)
            y[i] = FN_NAME(fn_pick)(y[i] < 0, 0, y[i]);
    else if (act == FN_ACT_SILU)
        for (ptrdiff_t i = 0; i < n; i++)
            y[i] = FN_NAME(fn_silu1)(y[i]);
}

/* g = dy * act'(pre) over a run, written over pre: the gradient arriving at the normalization's output from
 * the gradient dy of the activation's.  ReLU's derivative at 0 is 0, as torch's. */
FN_INLINE void FN_NAME(fn_activation_grad_run)(const FN_T *restrict dy, FN_T *restrict pre, ptrdiff_t n,
                                               fn_activation act)
{
    if (act == FN_ACT_RELU)
        for (ptrdiff_t i = 0; i < n; i++)
            pre[i] = FN_NAME(fn_pick)(pre[i] > 0, dy[i], 0);
    else if (act == FN_ACT_SILU)
        for (ptrdiff_t i = 0; i < n; i++)
            pre[i] = dy[i] * FN_NAME(fn_silu_grad1)(pre[i]);
}

#undef FN_EXP_MANT
#undef FN_EXP_BIAS
#undef FN_EXP_ROUND
#undef FN_EXP_LO
#undef FN_EXP_HI
#undef FN_LN2_HI
#undef FN_LN2_LO
#undef FN_SILU_BIG
