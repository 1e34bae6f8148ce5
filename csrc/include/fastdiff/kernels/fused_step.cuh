// The fused step of a fastdiff Program on a CUDA device, and the gate's decision, as kernels: no
// torch, no host library, only the CUDA runtime and fastdiff/step_math.h. A loop drives them per
// model call k: [model call k] -> step_kernel -> decide_kernel (with the gate, for call k+1).
//
//   init_kernel    grid: any 1-D grid, kThreads per block (a grid-stride loop over batch·m).
//                  Latent row init_row = init_coef·x_T; block 0 also resets the skip flags, the
//                  status and the gate state (call 0 is always made).
//   step_kernel    grid (blocks, batch), kThreads per block (the block reduction needs exactly
//                  kThreads, a power of two): sample b = blockIdx.y, its m elements strided over
//                  the blocks. The guided output g = u + w_b·(c − u) (or, when call k was skipped,
//                  the previous one), the program's two rows of call k (gcoef·g plus coef·src over
//                  the row's columns, both from the values before this call), and with the gate
//                  the per-block partial sums of |row 1 − x_row| (in double) into View::partial.
//                  The first call whose guided output is not finite is recorded in View::status.
//   decide_kernel  <<<1, 1>>>: the batch statistic (per-sample means in double, rounded to
//                  float, then their mean: the CPU sampler with per_sample = false), the gate's
//                  decision for call k+1 into View::skip and, inside one graph, into call k+1's
//                  conditional handle.
//
// The per-element arithmetic is fastdiff/step_math.h, the same code the CPU sampler runs, so given
// the same model outputs the latents are bit-identical to the CPU sampler's; the statistic's sum
// runs in double in a different order (a tree per block), which can change a decision only when
// the float-rounded statistic lands exactly on a rounding boundary.
//
// The View, the gate state and the launch shape (kThreads) are in fastdiff/kernels/view.h, which
// host code without a CUDA compiler can include. The kernels are `static` so that more than one
// translation unit may include this header.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "fastdiff/kernels/view.h"
#include "fastdiff/step_math.h"

namespace fastdiff {
namespace kernels {

static __global__ void init_kernel(View v, const float* __restrict__ x_T, int init_row, float init_coef) {
  float* row = v.basis + static_cast<int64_t>(init_row) * v.bm;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < v.bm;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    row[i] = fd_mul(x_T[i], init_coef);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    for (int k = 0; k < v.steps; ++k) v.skip[k] = 0;
    *v.status = -1;
    *v.gate = GateDev{0.0f, 0.0f, 0, 1};  // call 0 is always made
  }
}

// grid (blocks, batch): sample b = blockIdx.y, its elements strided over the blocks.
static __global__ void step_kernel(View v, int k, int x_row) {
  __shared__ double red[kThreads];
  const int64_t b = blockIdx.y;
  const bool skipped = v.gated && v.skip[k] != 0;
  const int dst0 = v.dst[k * 2], dst1 = v.dst[k * 2 + 1];
  const float gc0 = v.gcoef[k * 2], gc1 = v.gcoef[k * 2 + 1];
  const int* src0 = v.src + static_cast<int64_t>(k * 2) * v.width;
  const int* src1 = src0 + v.width;
  const float* coef0 = v.coef + static_cast<int64_t>(k * 2) * v.width;
  const float* coef1 = coef0 + v.width;
  const float wb = v.guided ? v.w[b] : 0.0f;
  double local = 0.0;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < v.m;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t off = b * v.m + e;
    float g;
    float* const g_k = v.gout + (k % 2) * v.bm + off;  // receives g_k over g_{k−2} (gated only)
    if (skipped) {
      // The skip row's prediction from the last two guided outputs.
      g = fd_reuse(v.reuse[2 * k], v.gout[((k + 1) % 2) * v.bm + off], v.reuse[2 * k + 1], *g_k);
      *g_k = g;
    } else {
      const float u = v.raw[off];
      g = v.guided ? fd_guide(u, v.raw[v.bm + off], wb) : u;
      if (v.gated) *g_k = g;
      if (!isfinite(g)) atomicCAS(v.status, -1, k);
    }
    // Both rows from the values before this call (each element is read, then written, by one thread).
    float r0 = 0.0f;
    if (dst0 >= 0) {
      r0 = fd_mul(gc0, g);
      for (int j = 0; j < v.width; ++j)
        if (src0[j] >= 0) r0 = fd_axpy(r0, coef0[j], v.basis[src0[j] * v.bm + off]);
    }
    float r1 = fd_mul(gc1, g);
    for (int j = 0; j < v.width; ++j)
      if (src1[j] >= 0) r1 = fd_axpy(r1, coef1[j], v.basis[src1[j] * v.bm + off]);
    if (v.gated) local += static_cast<double>(fabsf(fd_sub(r1, v.basis[x_row * v.bm + off])));
    if (dst0 >= 0) v.basis[dst0 * v.bm + off] = r0;
    v.basis[dst1 * v.bm + off] = r1;
  }
  if (!v.gated) return;
  red[threadIdx.x] = local;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) v.partial[b * v.blocks + blockIdx.x] = red[0];
}

// One thread: the batch statistic (per-sample means in double, rounded to float, then their
// mean, as the CPU sampler with per_sample = false), the gate's decision for call k+1.
static __global__ void decide_kernel(View v, int k, int64_t batch, float threshold_scale, int max_skips,
                                     int refresh, int warmup, cudaGraphConditionalHandle next,
                                     int set_conditional) {
  double mean = 0.0;
  for (int64_t b = 0; b < batch; ++b) {
    double acc = 0.0;
    for (int i = 0; i < v.blocks; ++i) acc += v.partial[b * v.blocks + i];
    mean += static_cast<double>(static_cast<float>(acc / static_cast<double>(v.m)));
  }
  const float d = static_cast<float>(mean / static_cast<double>(batch));
  GateDev& g = *v.gate;
  const bool active = fd_gate_active(g.calls, warmup);
  ++g.calls;
  const bool skip = fd_gate_observe(d, g.d1, g.d2, g.run, active, threshold_scale, max_skips, refresh);
  v.skip[k + 1] = skip ? 1 : 0;
  if (set_conditional) cudaGraphSetConditional(next, skip ? 0u : 1u);
}

}  // namespace kernels
}  // namespace fastdiff
