// Launch shapes of the fused-step kernels (see launch.h); the kernels are in
// fastdiff/kernels/fused_step.cuh.
#include "launch.h"

#include <algorithm>

#include "fastdiff/kernels/fused_step.cuh"

namespace fastdiff {
namespace cuda {

cudaError_t launch_init(const kernels::View& v, const float* x_T, int init_row, float init_coef,
                        cudaStream_t stream) {
  const int grid = static_cast<int>(std::min<int64_t>((v.bm + kernels::kThreads - 1) / kernels::kThreads, 1024));
  kernels::init_kernel<<<grid, kernels::kThreads, 0, stream>>>(v, x_T, init_row, init_coef);
  return cudaGetLastError();
}

cudaError_t launch_step(const kernels::View& v, int k, int x_row, int64_t batch, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(v.blocks), static_cast<unsigned>(batch));
  kernels::step_kernel<<<grid, kernels::kThreads, 0, stream>>>(v, k, x_row);
  return cudaGetLastError();
}

cudaError_t launch_decide(const kernels::View& v, int k, int64_t batch, float threshold_scale, int max_skips,
                          int refresh, int warmup, cudaGraphConditionalHandle next, bool set_conditional,
                          cudaStream_t stream) {
  kernels::decide_kernel<<<1, 1, 0, stream>>>(v, k, batch, threshold_scale, max_skips, refresh, warmup, next,
                                               set_conditional ? 1 : 0);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastdiff
