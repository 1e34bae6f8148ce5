// The CUDA runner's kernel launches (fastdiff/kernels/fused_step.cuh) as plain functions, so the
// runner's host side (cuda_runner.cpp) builds with any C++ compiler; launch.cu, compiled by nvcc,
// holds the only <<<>>> of the runner. Each enqueues one kernel on `stream` and returns
// cudaGetLastError() (a bad launch configuration; faults inside the kernel surface later).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda_compat.h"
#include "fastdiff/kernels/view.h"

namespace fastdiff {
namespace cuda {

// Latent row init_row = init_coef·x_T; resets the skip flags, the status and the gate state.
cudaError_t launch_init(const kernels::View& v, const float* x_T, int init_row, float init_coef,
                        cudaStream_t stream);

// The fused step of model call k (x_row: the row the call's input was read from).
cudaError_t launch_step(const kernels::View& v, int k, int x_row, int64_t batch, cudaStream_t stream);

// The gate's decision for call k+1, into View::skip and, when set_conditional, into `next`
// (call k+1's conditional handle, inside one graph). refresh: fd_gate_refresh.
cudaError_t launch_decide(const kernels::View& v, int k, int64_t batch, float threshold_scale, int max_skips,
                          int refresh, int warmup, cudaGraphConditionalHandle next, bool set_conditional,
                          cudaStream_t stream);

}  // namespace cuda
}  // namespace fastdiff
