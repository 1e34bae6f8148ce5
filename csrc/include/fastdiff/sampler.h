// The sampling loop in C++: a StepPlan's program, a Denoiser, the fused step after every call,
// classifier-free guidance and AdaptiveDiffusion's step-skipping gate. This is the CPU
// implementation (float32 latents in host memory); it follows fastdiff.loops.reference and
// fastdiff.ops.step.fused_step_reference operation for operation (float32 arithmetic, each
// product and sum rounded as torch rounds it), so given the same model outputs it returns the
// reference loop's latents (tests/test_loops.py holds them together).
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "fastdiff/plan.h"

namespace fastdiff {

// Thrown for unusable sampling inputs (shapes, guidance, gate settings) and for a model call
// that failed or returned something unusable; the message names the call.
class SamplerError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// One model call: the latents of `n` samples (those listed in `index`, or the whole batch when
// index is null) at model time t. The denoiser writes its raw output to `out`: [n, ...] without
// guidance, [2n, ...] = [unconditional; conditional] with guidance.
struct DenoiserCall {
  int step = 0;                            // call k of the plan
  int64_t n = 0;                           // samples in this call
  const int64_t* index = nullptr;          // their positions in the batch (null: 0..n-1, the whole batch)
  const std::vector<int64_t>* sample_shape = nullptr;  // one latent's shape, e.g. {4, 8, 8}
  const float* x = nullptr;                // [n, ...sample_shape]
  const float* t = nullptr;                // [n] model times
  bool guided = false;
  float* out = nullptr;                    // [(guided ? 2n : n), ...sample_shape]
};

// The model as the sampler sees it. A Denoiser holds its conditioning (for the whole batch;
// `index` selects rows). forward may throw; the sampler reports the failing call.
class Denoiser {
 public:
  virtual ~Denoiser() = default;
  virtual void forward(const DenoiserCall& call) = 0;
};

// AdaptiveDiffusion's gate (fastdiff.gate.GateSpec, whose to_dict() has these fields): skip call
// k+1 when |d_k − 2·d_{k−1} + d_{k−2}| <= 2·delta·d_{k−1}, d_k = mean|x^(k+1) − x^(k)|.
struct GateOptions {
  double delta = 0.01;
  int max_skips = 4;
  int warmup = 3;
  bool per_sample = true;  // false: one decision for the batch from the batch-mean statistic
  // What a skipped call uses (GateSpec.reuse): true "extrapolate" (the line through the last two
  // outputs at the call's time), false "copy" (the last output).
  bool extrapolate = true;
};

// The skip rows (fastdiff.program.Program.reuse_rows), row-major [N * 2]: a skipped call k's
// guided output is rows[2k]·g_{k−1} + rows[2k+1]·g_{k−2}. extrapolate: (1 + r, −r) with
// r = (t_k − t_{k−1}) / (t_{k−1} − t_{k−2}) from call 2 on where the two previous times differ,
// else (1, 0); copy: (1, 0) everywhere.
std::vector<float> reuse_rows(const std::vector<double>& times, bool extrapolate);

// The gate's decision state in a sampling call, one entry per decision group (a sample, or the
// batch); the rule itself is fd_gate_active/fd_gate_observe (fastdiff/step_math.h).
struct GateState {
  GateOptions opt;
  std::vector<float> d1, d2;  // d_{k-1}, d_{k-2}
  std::vector<int> run;       // > 0: skips in a row; <= 0: minus the made calls in a row (fd_gate_observe)
  int call = 1;               // the model call the next statistic decides (call 0 is always made)

  GateState(const GateOptions& options, size_t groups);
  // The skip flags for model call `call` from its statistic d (float32 per group).
  std::vector<char> observe(const std::vector<float>& d);
};

struct SampleRequest {
  const float* x_T = nullptr;              // [batch, ...sample_shape], not modified
  int64_t batch = 0;
  std::vector<int64_t> sample_shape;
  const float* guidance = nullptr;         // [batch] weights w (g = u + w·(c − u)), or null: no guidance
  const GateOptions* gate = nullptr;       // null: no skipping
  // Runs after call k with the next model input (the result after the last call), [batch, ...].
  std::function<void(int, const float*)> callback;
};

struct SampleResult {
  std::vector<float> latents;              // [batch, ...sample_shape]
  std::vector<int> nfe;                    // model calls made per sample
  int unet_calls = 0;                      // batched denoiser invocations
  std::vector<std::vector<int>> skipped;   // per sample, the calls that were skipped
};

// One row a call writes: dst = gcoef·g + Σ coef·basis[src] (float32, from the program).
struct RowTerms {
  int32_t dst = -1;
  float gcoef = 0.0f;
  std::vector<std::pair<int32_t, float>> terms;  // (source row, coefficient)
};

// Input checks shared by Sampler::run and cuda::CudaRunner; each throws SamplerError starting
// with `who` ("sample", "cuda runner").
void check_sample_shape(const char* who, int64_t batch, const std::vector<int64_t>& sample_shape);
void check_guidance(const char* who, const float* guidance, int64_t batch);  // null: no guidance
void check_gate(const char* who, const GateOptions& gate);

class Sampler {
 public:
  // Uses the plan's own program when its file carried one, else the dense program.
  explicit Sampler(StepPlan plan);

  const StepPlan& plan() const { return plan_; }
  const Program& program() const { return *program_; }

  // Thread-safe: run keeps all its state on the stack, so one Sampler serves many threads
  // (the Denoiser must then be thread-safe too, or one per thread).
  SampleResult run(Denoiser& model, const SampleRequest& request) const;

 private:
  StepPlan plan_;
  std::shared_ptr<const Program> program_;
  std::vector<std::array<RowTerms, 2>> rows_;  // per call: the output row and the next-input row
};

}  // namespace fastdiff
