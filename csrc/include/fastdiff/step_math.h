// The fused step's per-element arithmetic, shared by the CPU sampler (csrc/runtime/sampler.cpp)
// and its CUDA twin (fastdiff/kernels/fused_step.cuh), so both run the same float operations in
// the same order as torch (fastdiff.ops.step.fused_step_reference):
//   g = u + w·(c − u)            (classifier-free guidance)
//   v = gcoef·g;  v = v + coef_j·src_j  for each column j of the program row.
// Every product and sum is rounded on its own: on the device with __fmul_rn/__fadd_rn/__fsub_rn
// (which the compiler never contracts into an FMA); on the host every target that compiles this
// header is built with -ffp-contract=off (CMakeLists.txt), since GCC contracts a*b + c into an
// FMA in C++ wherever the target has one (aarch64, -march=native on x86).
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define FASTDIFF_HD __host__ __device__ __forceinline__
#else
#define FASTDIFF_HD inline
#endif

namespace fastdiff {

FASTDIFF_HD float fd_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

FASTDIFF_HD float fd_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

FASTDIFF_HD float fd_sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

// Guided output g = u + w·(c − u).
FASTDIFF_HD float fd_guide(float u, float c, float w) { return fd_add(u, fd_mul(w, fd_sub(c, u))); }

// One accumulation of a program row: v + coef·src.
FASTDIFF_HD float fd_axpy(float v, float coef, float src) { return fd_add(v, fd_mul(coef, src)); }

// A skipped call's guided output from the last two (the skip row (a, b), fastdiff::reuse_rows):
// a·g_{k−1} + b·g_{k−2}, rounded as torch rounds a * last + b * older.
FASTDIFF_HD float fd_reuse(float a, float last, float b, float older) { return fd_axpy(fd_mul(a, last), b, older); }

// The gate's warm-up, as fastdiff.gate applies it: whether the decision for model call
// `call` may skip it. Calls 0..warmup-1 are always made, and the rule needs d_{k-2}, so never
// before call 3 (call 0 always runs). Spelled without std::max so the device can call it.
FASTDIFF_HD bool fd_gate_active(int call, int warmup) { return call >= (warmup > 3 ? warmup : 3); }

// AdaptiveDiffusion's decision for one group (fastdiff.gate.GateSpec.decide): given the
// new statistic d and the group's history (d1 = previous, d2 = the one before; run > 0: skips in
// a row, run <= 0: minus the made calls in a row, at most `refresh`), whether the next call is
// skipped; updates the history. `active` is fd_gate_active for this call (false during warm-up).
// threshold_scale = float(2·delta). A run of skips starts only after `refresh` made calls in a
// row (fd_gate_refresh). Spelled without std::min/max so the device can call it.
FASTDIFF_HD bool fd_gate_observe(float d, float& d1, float& d2, int& run, bool active, float threshold_scale,
                                 int max_skips, int refresh) {
  bool skip = false;
  if (active) {
    const float third = fabsf(fd_add(fd_sub(d, fd_mul(2.0f, d1)), d2));
    const bool may = run > 0 ? run < max_skips : (run <= -refresh && max_skips > 0);
    skip = third <= fd_mul(threshold_scale, d1) && may;
  }
  d2 = d1;
  d1 = d;
  if (skip) {
    run = (run > 0 ? run : 0) + 1;
  } else {
    const int made = (run < 0 ? run : 0) - 1;
    run = made < -refresh ? -refresh : made;
  }
  return skip;
}

// GateSpec.refresh: the made calls in a row a run of skips must follow, 2 when skipped calls
// extrapolate (each run's line then passes through two made outputs), 1 when they copy.
FASTDIFF_HD int fd_gate_refresh(bool extrapolate) { return extrapolate ? 2 : 1; }

}  // namespace fastdiff
