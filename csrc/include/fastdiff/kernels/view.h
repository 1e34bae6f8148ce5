// What the fused-step kernels (fastdiff/kernels/fused_step.cuh) share with the host that drives
// them: the launch shape, the gate's state on the device and one View of device pointers and
// sizes. Plain C++ with no CUDA header, so host code that any C++ compiler builds can fill a View
// and hand it to the launch wrappers (csrc/examples/cuda_runner/launch.h).
#pragma once

#include <cstdint>

namespace fastdiff {
namespace kernels {

constexpr int kThreads = 256;
constexpr int kMaxBlocksPerSample = 128;

// The gate's state on the device (one decision group: the batch).
struct GateDev {
  float d1;
  float d2;
  int run;
  int calls;
};

// Device pointers and sizes the kernels share.
struct View {
  float* basis;         // [num_rows, batch*m]
  float* raw;           // [(guided ? 2 : 1) * batch, m]
  float* gout;          // [2, batch*m] last two guided outputs, call k's in half k % 2 (gated only)
  float* w;             // [batch] guidance weights
  const int* dst;       // [N*2]
  const float* gcoef;   // [N*2]
  const int* src;       // [N*2*width]
  const float* coef;    // [N*2*width]
  const float* reuse;   // [N*2] skip rows: a skipped call's g = reuse[2k]·g_{k−1} + reuse[2k+1]·g_{k−2}
  int* skip;            // [N] 1: call k skipped
  int* status;          // first call with non-finite guided output, or -1
  double* partial;      // [batch, blocks] gate statistic partial sums
  GateDev* gate;
  int64_t m;
  int64_t bm;
  int width;
  int blocks;
  int steps;
  bool guided;
  bool gated;
};

}  // namespace kernels
}  // namespace fastdiff
