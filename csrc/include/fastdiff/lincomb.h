// CPU reference of the StepPlan linear-combination update:
//   dst[i] = sum_j coefs[j] * srcs[j][i]
// accumulated in double for every element, then rounded once to the destination type.
// dst may be one of srcs (the update is elementwise, so in-place use is well defined).
// This is the slow, obviously correct twin of the fused device kernels; tests hold the Python
// reference (fastdiff.ops.lincomb) and this one equal.
#pragma once

#include <cstddef>

namespace fastdiff {

template <typename T>
void lincomb(T* dst, const T* const* srcs, const double* coefs, size_t num_terms, size_t numel);

extern template void lincomb<float>(float*, const float* const*, const double*, size_t, size_t);
extern template void lincomb<double>(double*, const double* const*, const double*, size_t, size_t);

}  // namespace fastdiff
