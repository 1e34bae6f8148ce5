// A toy denoiser with a CPU twin and a CUDA twin computing the same float32 values (the same
// element function, fastdiff/step_math.h roundings), for holding the CUDA runner to the CPU
// sampler (csrc/tests/test_cuda_sampler.cu) and for timing the runner's modes
// (csrc/examples/cuda_runner/bench.cu). `kernels` > 1 launches that many kernels per call (the
// extra ones do small busy work on a scratch buffer), standing in for a UNet's many launches.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_runner/cuda_runner.h"
#include "fastdiff/sampler.h"
#include "fastdiff/step_math.h"

namespace fastdiff_toy {

// Element e of one sample at model time t: u = 0.8·x + t·1e-4, c = u + 0.05·((e mod 7) − 3).
FASTDIFF_HD void toy_eval(float x, float t, int64_t e, float* u, float* c) {
  using fastdiff::fd_add;
  using fastdiff::fd_mul;
  *u = fd_add(fd_mul(0.8f, x), fd_mul(t, 1e-4f));
  *c = fd_add(*u, fd_mul(0.05f, static_cast<float>(e % 7) - 3.0f));
}

class ToyCpu : public fastdiff::Denoiser {
 public:
  void forward(const fastdiff::DenoiserCall& call) override {
    int64_t m = 1;
    for (int64_t s : *call.sample_shape) m *= s;
    for (int64_t s = 0; s < call.n; ++s)
      for (int64_t e = 0; e < m; ++e) {
        float u, c;
        toy_eval(call.x[s * m + e], call.t[s], e, &u, &c);
        call.out[s * m + e] = u;
        if (call.guided) call.out[(call.n + s) * m + e] = c;
      }
  }
};

__global__ void toy_kernel(const float* __restrict__ x, const float* __restrict__ t, float* __restrict__ out, int64_t n,
                           int64_t m, int guided, int nan_index) {
  const int64_t total = n * m;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t s = i / m, e = i % m;
    float u, c;
    toy_eval(x[i], t[s], e, &u, &c);
    if (i == nan_index) u = NAN;
    out[i] = u;
    if (guided) out[total + i] = c;
  }
}

__global__ void busy_kernel(float* scratch, int64_t size, float a) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < size;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    scratch[i] = scratch[i] * a + 1.0f;
}

class ToyCuda : public fastdiff::cuda::DeviceDenoiser {
 public:
  explicit ToyCuda(int kernels = 1, bool capturable = true, int64_t scratch = 1 << 16)
      : kernels_(kernels), capturable_(capturable), scratch_size_(scratch) {
    if (kernels_ > 1) {
      if (cudaMalloc(&scratch_, scratch_size_ * sizeof(float)) != cudaSuccess)
        throw std::runtime_error("ToyCuda: cudaMalloc failed");
      zero_scratch();
    }
  }
  ~ToyCuda() override {
    if (scratch_ != nullptr) cudaFree(scratch_);
  }
  int fail_at = -1;  // forward throws at this call
  int nan_at = -1;   // this call writes a NaN into its output
  int forwards = 0;  // forward() invocations (captures count once per capture)

  bool capturable() const override { return capturable_; }

  void forward(const fastdiff::cuda::DeviceCall& call) override {
    ++forwards;
    if (call.step == fail_at) throw std::runtime_error("out of cheese");
    int64_t m = 1;
    for (int64_t s : *call.sample_shape) m *= s;
    for (int i = 1; i < kernels_; ++i)
      busy_kernel<<<static_cast<unsigned>((scratch_size_ + 255) / 256), 256, 0, call.stream>>>(scratch_, scratch_size_,
                                                                                                0.5f);
    const int64_t total = call.n * m;
    const unsigned grid = static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, 4096));
    toy_kernel<<<grid, 256, 0, call.stream>>>(call.x, call.t, call.out, call.n, m, call.guided ? 1 : 0,
                                              call.step == nan_at ? 5 : -1);
  }

 private:
  int kernels_;
  bool capturable_;
  int64_t scratch_size_;
  float* scratch_ = nullptr;

  // On a stream of its own, waited for there: the runner's streams do not wait for the legacy
  // stream, and a device-wide synchronisation would invalidate another thread's capture.
  void zero_scratch() {
    cudaStream_t s = nullptr;
    bool ok = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) == cudaSuccess;
    ok = ok && cudaMemsetAsync(scratch_, 0, scratch_size_ * sizeof(float), s) == cudaSuccess;
    ok = ok && cudaStreamSynchronize(s) == cudaSuccess;
    if (s != nullptr) cudaStreamDestroy(s);
    if (!ok) {
      cudaFree(scratch_);
      throw std::runtime_error("ToyCuda: zeroing the scratch buffer failed");
    }
  }
};

}  // namespace fastdiff_toy
