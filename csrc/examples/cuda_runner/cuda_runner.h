// EXAMPLE, not a product path: an example of driving a fastdiff Program on a CUDA device. It is not
// part of the fastdiff library (fastdiff_core) nor of the Python package (fastdiff._C); only its
// ctest (csrc/tests/test_cuda_sampler.cu) and its bench (bench.cu) link it. It has never run on a
// GPU yet: it has only been compiled (sm_80, sm_90; the host side also against the CUDA 12.3 and
// 12.4 headers, csrc/tools/check_cuda_headers.sh), and its device checks skip without a device.
// The product loops are in python/fastdiff/loops: reference, graph, and cpp (the CPU C++ Sampler,
// fastdiff/sampler.h).
//
// The runner is the CUDA twin of fastdiff::Sampler. The fused step (guidance, the program's two
// rows, the gate statistic) is one kernel per call built from the same per-element code as the
// CPU loop (fastdiff/step_math.h); the gate's decision is made by a kernel, so the skip flag never
// has to leave the device. The kernels are fastdiff/kernels/fused_step.cuh, launched by the thin
// wrappers of launch.h (launch.cu, the runner's only nvcc-compiled file); this file and
// cuda_runner.cpp are the host side (modes, capture, conditional nodes, streams) and build with a
// plain C++ compiler. It builds with CUDA >= 12.3 (cuda_compat.h says why); one graph with the
// gate also needs a 12.3 runtime and driver, and falls back to step graphs on an older driver.
//
// A CudaRunner owns one stream, the latents of one request shape and, depending on its mode, the
// captured graphs:
//   kEager       every kernel and model call launched from the host; with the gate, the host
//                reads the skip flag after each call (one synchronisation per step).
//   kStepGraphs  one CUDA graph per model call and one per fused step; with the gate, the host
//                reads the flag between them (the host-flag fallback).
//   kOneGraph    the whole sampling call is one graph launch. With the gate, each model call sits
//                in a conditional IF node whose handle the decision kernel sets on the device
//                (cudaGraphSetConditional, CUDA >= 12.3 runtime and driver): zero host
//                synchronisation until the result is read.
//   kAuto        kOneGraph when the model is capturable (with the gate: and conditional nodes
//                work), kEager when the model cannot be captured. mode()/mode_note() say what was
//                chosen and why.
// kOneGraph with the gate falls back to kStepGraphs, and mode_note() says why, only when
// conditional nodes are unsupported here: the runtime or driver is older than 12.3, or a call
// that only conditional nodes need (creating a handle or an IF node, capturing a model call into
// the node's body, instantiating the graph) fails with an error that means so
// (conditional_nodes_unsupported; the note names the call and the error). Any other failure of
// those calls, e.g. a model call whose work a conditional body cannot hold (host functions,
// allocations, event records or waits; a body holds kernels, memsets, memcopies and child graphs)
// or a capture another call invalidated, is thrown as a SamplerError naming the call and the CUDA
// error, as is a model whose own code throws.
//
// Decisions are per batch (GateOptions::per_sample must be false): a captured graph has fixed
// shapes, so it cannot compact a batch to the samples that still need a call the way the CPU
// sampler does.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "fastdiff/plan.h"
#include "fastdiff/sampler.h"

namespace fastdiff {
namespace cuda {

// One model call on the device. x: [n, ...sample_shape]; t: [n] model times (device memory that
// holds this call's times for the runner's lifetime, so a captured graph may read it); out:
// [n] or [2n] = [unconditional; conditional] rows. Work must be issued on `stream` only.
struct DeviceCall {
  int step = 0;
  int64_t n = 0;
  const std::vector<int64_t>* sample_shape = nullptr;
  const float* x = nullptr;
  const float* t = nullptr;
  bool guided = false;
  float* out = nullptr;
  cudaStream_t stream = nullptr;
};

class DeviceDenoiser {
 public:
  virtual ~DeviceDenoiser() = default;
  // Issue the call's work on call.stream. May throw (the runner names the call).
  virtual void forward(const DeviceCall& call) = 0;
  // True when forward only enqueues capturable work on call.stream (no host synchronisation,
  // no allocation that a graph would not replay, same pointers every time).
  virtual bool capturable() const { return false; }
};

enum class Mode { kAuto, kEager, kStepGraphs, kOneGraph };
const char* mode_name(Mode mode);
Mode parse_mode(const std::string& name);  // "auto" | "eager" | "step_graphs" | "one_graph"; throws SamplerError

// What this process can use; never throws.
struct Capabilities {
  int runtime_version = 0;    // cudaRuntimeGetVersion, e.g. 13000
  int driver_version = 0;     // cudaDriverGetVersion (0: no driver)
  int device_count = 0;
  bool conditional_nodes = false;  // runtime and driver >= 12.3 and a device present
  std::string reason;              // why devices or conditional nodes are unavailable ("" when both are)
};
Capabilities capabilities();

// "CUDA error in <call>: <cudaGetErrorName> (<cudaGetErrorString>)": how the runner's errors and
// its fallback note name a failed CUDA call.
std::string cuda_error_text(cudaError_t err, const std::string& call);

// True for the errors that mean conditional graph nodes cannot be used with this runtime, driver
// or device (cudaErrorNotSupported, cudaErrorCallRequiresNewerDriver, cudaErrorInsufficientDriver):
// from a call that only conditional nodes need, kOneGraph then falls back to kStepGraphs. Every
// other error (cudaErrorStreamCaptureInvalidated, cudaErrorStreamCaptureUnsupported,
// cudaErrorInvalidValue, ...) is a failure and is thrown.
bool conditional_nodes_unsupported(cudaError_t err);

struct RunnerOptions {
  int64_t batch = 1;
  std::vector<int64_t> sample_shape;  // e.g. {4, 64, 64}
  bool guided = false;                // the model returns [uncond; cond] rows, guidance weights per run
  bool gated = false;                 // AdaptiveDiffusion gate with `gate` (per_sample must be false)
  GateOptions gate;
  Mode mode = Mode::kAuto;
  int device = 0;
};

struct RunResult {
  std::vector<int> nfe;                    // per sample (equal across the batch: decisions are per batch)
  int unet_calls = 0;
  std::vector<std::vector<int>> skipped;   // per sample, the skipped calls
  int graph_launches = 0;                  // cudaGraphLaunch calls this run made
  int host_syncs = 0;                      // stream synchronisations this run made (reading the result included)
};

class CudaRunner {
 public:
  // Validates the plan and the options, allocates the device buffers and uploads the program.
  // Graphs are captured on the first run. Throws SamplerError (CUDA errors included, named).
  CudaRunner(const StepPlan& plan, DeviceDenoiser& model, RunnerOptions options);
  ~CudaRunner();
  CudaRunner(const CudaRunner&) = delete;
  CudaRunner& operator=(const CudaRunner&) = delete;

  // x_T and out: device pointers to [batch, ...sample_shape] float32 (out may alias x_T). x_T
  // must be complete when run is called: the runner's stream does not wait for other streams
  // (synchronise the stream that wrote it, e.g. cudaMemcpyAsync on your stream, then
  // cudaStreamSynchronize of that stream; not cudaDeviceSynchronize, which would invalidate a
  // capture another thread's runner is making);
  // guidance: host pointer to `batch` weights (required when guided, else ignored).
  // Returns after the result is in `out`. One run at a time per runner (a runner is not
  // thread-safe; use one runner per thread, each has its own stream).
  RunResult run(const float* x_T, const float* guidance, float* out);

  Mode mode() const;
  const std::string& mode_note() const;
  cudaStream_t stream() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace cuda
}  // namespace fastdiff
