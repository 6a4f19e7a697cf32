/* The activations the normalization kernels fuse into their apply passes (y = act(norm(x))), their
 * gradients, and the vector exp behind SiLU.
 *
 * Everything here is an FN_INLINE building block over a run of values already in L1 (a piece or a row the
 * kernel has just written or is about to read): the kernels call them from their FN_VECTOR_KERNEL dispatch
 * points, so the activation and the exp are compiled, and vectorized, for every vector target.  The loops
 * are elementwise, with no reduction and no dependence on where a run starts or ends, so a value's result
 * depends on the value alone: never on alignment, the tail or the thread count.
 *
 * The exp: x = k ln2 + r with |r| <= ln2 / 2 (Cody-Waite, ln2 in two parts), e^r by its Taylor polynomial
 * (degree 7 for float, 13 for double, both below a tenth of an ulp of truncation error), then times 2^k built
 * from the exponent bits in two halves, so that results down to the smallest denormal and up to overflow are
 * rounded once.  k is read from the bits of x * log2(e) + 1.5 * 2^(mantissa bits), which rounds it to an
 * integer without a float-to-int conversion (none of which vectorizes for double before AVX-512).  x is
 * clamped first to where exp is 0 or inf anyway, which also makes -inf give 0 and inf give inf; NaN
 * propagates through the arithmetic.  Accuracy: within 2 ulp of float64's exp rounded to the type (the tests
 * sweep every float32 exponent densely).
 */
#ifndef FOLDNORM_FN_ACTIVATION_H
#define FOLDNORM_FN_ACTIVATION_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "fn_api.h"
#include "fn_platform.h"

#define FN_IMPL "fn_activation_impl.h"
#include "fn_instantiate.h"

#endif
