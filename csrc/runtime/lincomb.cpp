#include "fastdiff/lincomb.h"

namespace fastdiff {

template <typename T>
void lincomb(T* dst, const T* const* srcs, const double* coefs, size_t num_terms, size_t numel) {
  for (size_t i = 0; i < numel; ++i) {
    double acc = 0.0;
    for (size_t j = 0; j < num_terms; ++j) acc += coefs[j] * static_cast<double>(srcs[j][i]);
    dst[i] = static_cast<T>(acc);
  }
}

template void lincomb<float>(float*, const float* const*, const double*, size_t, size_t);
template void lincomb<double>(double*, const double* const*, const double*, size_t, size_t);

}  // namespace fastdiff
