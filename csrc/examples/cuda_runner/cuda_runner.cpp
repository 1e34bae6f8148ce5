// The CUDA runner's host side (see cuda_runner.h for the modes and what this example is): device
// buffers, the program upload, streams, graph capture with conditional nodes. Plain C++ against
// cuda_runtime_api.h: the kernels of fastdiff/kernels/fused_step.cuh are launched through
// launch.h (launch.cu, the one file nvcc compiles), and the calls that differ between CUDA 12 and
// 13 go through cuda_compat.h.
//
// Per call k: [model call k] -> step_kernel (guidance, the program's two rows, the per-block
// partial sums of the gate statistic) -> decide_kernel (the gate's decision for call k+1, written
// to device memory and, inside one graph, to call k+1's conditional handle).
#include "cuda_runner.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <exception>
#include <stdexcept>
#include <string>
#include <utility>

#include "cuda_compat.h"
#include "fastdiff/kernels/view.h"
#include "fastdiff/program.h"
#include "fastdiff/step_math.h"
#include "launch.h"

namespace fastdiff {
namespace cuda {
namespace {

void check(cudaError_t err, const std::string& what) {
  if (err != cudaSuccess) throw SamplerError(cuda_error_text(err, what));
}

// Raised while building the one graph when a call that only conditional nodes need fails with an
// error that means they are unsupported here (conditional_nodes_unsupported): the runner then
// falls back to step graphs, and its note carries this message.
struct NoConditionalNodes : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// What a failure to build a conditional body most often means, added to the errors that name one.
const char* const kBodyRules =
    "; a conditional node's body (a model call, here) may hold only kernels, memsets, memcopies and child "
    "graphs: no host functions, memory allocations or frees, event records or waits; mode step_graphs "
    "captures the model without conditional nodes";

// Checks a call that only conditional nodes need: an unsupported-here error falls back
// (NoConditionalNodes), any other is a failure (SamplerError, with `hint`), never a silent downgrade.
void check_conditional(cudaError_t err, const std::string& what, const char* hint = "") {
  if (err == cudaSuccess) return;
  if (conditional_nodes_unsupported(err)) throw NoConditionalNodes(cuda_error_text(err, what));
  throw SamplerError(cuda_error_text(err, what) + hint);
}

// Zeroed device memory, ordered on `stream` like every later use of it.
template <typename T>
T* device_alloc(std::vector<void*>& owned, cudaStream_t stream, size_t count, const char* what) {
  void* p = nullptr;
  check(cudaMalloc(&p, std::max<size_t>(count, 1) * sizeof(T)), std::string("cudaMalloc (") + what + ")");
  owned.push_back(p);
  check(cudaMemsetAsync(p, 0, std::max<size_t>(count, 1) * sizeof(T), stream),
        std::string("cudaMemsetAsync (") + what + ")");
  return static_cast<T*>(p);
}

void validate(const RunnerOptions& o) {
  if (o.batch < 1 || o.batch > 65535)
    throw SamplerError("cuda runner: batch must be in 1..65535, got " + std::to_string(o.batch));
  check_sample_shape("cuda runner", o.batch, o.sample_shape);
  if (o.gated) {
    if (o.gate.per_sample)
      throw SamplerError(
          "cuda runner: the gate decides per batch on the GPU (GateOptions::per_sample must be false): a captured "
          "graph has fixed shapes and cannot compact the batch to the samples that still need a call; use "
          "per_sample=false, or the CPU Sampler for per-sample skipping");
    check_gate("cuda runner", o.gate);
  }
}

// Ends a capture that an exception interrupted. The partial graph is destroyed when the capture
// owns it (own_graph); a conditional node's body belongs to the node, so it is left to the
// outer graph, which the outer abort destroys.
void abort_capture(cudaStream_t stream, bool own_graph) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &status) == cudaSuccess && status != cudaStreamCaptureStatusNone) {
    cudaGraph_t g = nullptr;
    cudaStreamEndCapture(stream, &g);
    if (own_graph && g != nullptr) cudaGraphDestroy(g);
  }
  cudaGetLastError();  // clear the error the interrupted capture left
}

}  // namespace

std::string cuda_error_text(cudaError_t err, const std::string& call) {
  return "CUDA error in " + call + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
}

bool conditional_nodes_unsupported(cudaError_t err) {
  switch (err) {
    case cudaErrorNotSupported:             // the device or driver has no such node or call
    case cudaErrorCallRequiresNewerDriver:  // the runtime has the call, the driver does not
    case cudaErrorInsufficientDriver:       // the driver is older than the runtime
      return true;
    default:
      return false;
  }
}

const char* mode_name(Mode mode) {
  switch (mode) {
    case Mode::kAuto: return "auto";
    case Mode::kEager: return "eager";
    case Mode::kStepGraphs: return "step_graphs";
    case Mode::kOneGraph: return "one_graph";
  }
  return "?";
}

Mode parse_mode(const std::string& name) {
  for (Mode m : {Mode::kAuto, Mode::kEager, Mode::kStepGraphs, Mode::kOneGraph})
    if (name == mode_name(m)) return m;
  throw SamplerError("unknown CUDA runner mode '" + name + "' (expected auto, eager, step_graphs or one_graph)");
}

Capabilities capabilities() {
  Capabilities c;
  cudaRuntimeGetVersion(&c.runtime_version);
  if (cudaDriverGetVersion(&c.driver_version) != cudaSuccess) c.driver_version = 0;
  const cudaError_t err = cudaGetDeviceCount(&c.device_count);
  if (err != cudaSuccess) {
    c.device_count = 0;
    c.reason = std::string("no CUDA device: cudaGetDeviceCount: ") + cudaGetErrorString(err);
    cudaGetLastError();
  } else if (c.device_count == 0) {
    c.reason = "no CUDA device";
  }
  auto ver = [](int v) { return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10); };
  const std::string needed = ver(FASTDIFF_CUDA_MIN_VERSION);
  if (c.device_count > 0) {
    if (c.runtime_version < FASTDIFF_CUDA_MIN_VERSION)
      c.reason = "conditional graph nodes need a CUDA runtime >= " + needed + " (this runtime: " +
                 ver(c.runtime_version) + ")";
    else if (c.driver_version < FASTDIFF_CUDA_MIN_VERSION)
      c.reason = "conditional graph nodes need a CUDA driver >= " + needed + " (this driver: " +
                 ver(c.driver_version) + ")";
    else
      c.conditional_nodes = true;
  }
  return c;
}

struct CudaRunner::Impl {
  StepPlan plan;
  std::shared_ptr<const Program> program;
  DeviceDenoiser& model;
  RunnerOptions opt;
  Mode mode = Mode::kEager;
  std::string note;
  int steps = 0;
  std::vector<void*> owned;   // device allocations
  std::vector<void*> pinned;  // host allocations
  cudaStream_t stream = nullptr;
  cudaStream_t side = nullptr;  // captures conditional bodies
  kernels::View v{};
  float* x_stage = nullptr;  // the run's x_T, copied where the captured init kernel reads it
  float* times = nullptr;  // [N, batch]
  int* h_skip = nullptr;
  int* h_status = nullptr;
  float* h_w = nullptr;
  std::vector<cudaGraphExec_t> model_exec, step_exec;
  cudaGraphExec_t whole = nullptr;
  bool captured = false;

  Impl(const StepPlan& p, DeviceDenoiser& md, RunnerOptions o) : plan(p), model(md), opt(std::move(o)) {}

  ~Impl() {
    // Work a failed run left queued must finish before its buffers go.
    cudaSetDevice(opt.device);
    if (stream != nullptr) cudaStreamSynchronize(stream);
    if (side != nullptr) cudaStreamSynchronize(side);
    for (auto e : model_exec) cudaGraphExecDestroy(e);
    for (auto e : step_exec) cudaGraphExecDestroy(e);
    if (whole != nullptr) cudaGraphExecDestroy(whole);
    for (void* q : owned) cudaFree(q);
    for (void* q : pinned) cudaFreeHost(q);
    if (side != nullptr) cudaStreamDestroy(side);
    if (stream != nullptr) cudaStreamDestroy(stream);
  }

  template <typename T>
  T* host_alloc(size_t count, const char* what) {
    void* q = nullptr;
    check(cudaMallocHost(&q, std::max<size_t>(count, 1) * sizeof(T)), std::string("cudaMallocHost (") + what + ")");
    pinned.push_back(q);
    return static_cast<T*>(q);
  }

  void model_call(int k, cudaStream_t s) {
    DeviceCall call;
    call.step = k;
    call.n = opt.batch;
    call.sample_shape = &opt.sample_shape;
    call.x = v.basis + static_cast<int64_t>(program->x_row[k]) * v.bm;
    call.t = times + static_cast<int64_t>(k) * opt.batch;
    call.guided = opt.guided;
    call.out = v.raw;
    call.stream = s;
    try {
      model.forward(call);
    } catch (const std::exception& e) {
      throw SamplerError("model call " + std::to_string(k) + " (t=" + std::to_string(plan.times[k]) + ", " +
                         std::to_string(opt.batch) + " samples) failed: " + e.what());
    }
    check(cudaGetLastError(), "model call " + std::to_string(k));
  }

  void enqueue_init(cudaStream_t s) {
    check(launch_init(v, x_stage, static_cast<int>(program->init_row), static_cast<float>(program->init_coef), s),
          "init_kernel");
  }

  // The fused step of call k and, with the gate, the decision for call k+1.
  void enqueue_step(int k, cudaStream_t s, cudaGraphConditionalHandle next, bool set_conditional) {
    check(launch_step(v, k, program->x_row[k], opt.batch, s), "step_kernel (call " + std::to_string(k) + ")");
    if (opt.gated && k + 1 < steps)
      check(launch_decide(v, k, opt.batch, static_cast<float>(2.0 * opt.gate.delta), opt.gate.max_skips,
                          fd_gate_refresh(opt.gate.extrapolate), opt.gate.warmup, next, set_conditional, s),
            "decide_kernel (call " + std::to_string(k) + ")");
  }

  // Captures body() on s and instantiates it. With `conditional` (the graph holds conditional
  // nodes), an instantiation error goes through check_conditional.
  template <typename F>
  cudaGraphExec_t capture(cudaStream_t s, const std::string& what, F&& body, bool conditional = false) {
    check(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture (" + what + ")");
    cudaGraph_t graph = nullptr;
    try {
      body();
      check(cudaStreamEndCapture(s, &graph), "cudaStreamEndCapture (" + what + ")");
    } catch (...) {
      abort_capture(side, false);
      abort_capture(s, true);
      throw;
    }
    cudaGraphExec_t exec = nullptr;
    const cudaError_t err = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    if (conditional)
      check_conditional(err, "cudaGraphInstantiate (" + what + ", with conditional nodes)", kBodyRules);
    else
      check(err, "cudaGraphInstantiate (" + what + ")");
    return exec;
  }

  void capture_step_graphs() {
    for (int k = 0; k < steps; ++k) {
      model_exec.push_back(capture(stream, "model call " + std::to_string(k), [&] { model_call(k, stream); }));
      step_exec.push_back(capture(stream, "step " + std::to_string(k), [&] { enqueue_step(k, stream, 0, false); }));
    }
  }

  // Adds an IF node on `handle` at the capture point of `stream` and captures model call k into
  // its body on the side stream.
  void conditional_model_call(int k, cudaGraphConditionalHandle handle) {
    const std::string call = "model call " + std::to_string(k);
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    cudaGraph_t graph = nullptr;
    const cudaGraphNode_t* deps = nullptr;
    size_t ndeps = 0;
    check(compat::capture_info(stream, &status, &graph, &deps, &ndeps),
          "cudaStreamGetCaptureInfo (one graph, before " + call + ")");
    cudaGraphNodeParams params = {};
    params.type = cudaGraphNodeTypeConditional;
    params.conditional.handle = handle;
    params.conditional.type = cudaGraphCondTypeIf;
    params.conditional.size = 1;
    cudaGraphNode_t node = nullptr;
    check_conditional(compat::add_node(&node, graph, deps, ndeps, &params),
                      "cudaGraphAddNode (conditional IF node of " + call + ")");
    check(compat::set_capture_dependencies(stream, &node, 1),
          "cudaStreamUpdateCaptureDependencies (after the IF node of " + call + ")");
    cudaGraph_t body = params.conditional.phGraph_out[0];
    check_conditional(cudaStreamBeginCaptureToGraph(side, body, nullptr, nullptr, 0, cudaStreamCaptureModeThreadLocal),
                      "cudaStreamBeginCaptureToGraph (the IF node's body, " + call + ")");
    model_call(k, side);
    check_conditional(cudaStreamEndCapture(side, &body), "cudaStreamEndCapture (" + call + " into its IF node's body)",
                      kBodyRules);
  }

  void capture_one_graph() {
    whole = capture(stream, "one graph", [&] {
      std::vector<cudaGraphConditionalHandle> handles(steps, 0);
      if (opt.gated) {
        cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
        cudaGraph_t graph = nullptr;
        check(compat::capture_info(stream, &status, &graph, nullptr, nullptr), "cudaStreamGetCaptureInfo (one graph)");
        for (int k = 1; k < steps; ++k)
          check_conditional(cudaGraphConditionalHandleCreate(&handles[k], graph, 1, cudaGraphCondAssignDefault),
                            "cudaGraphConditionalHandleCreate (model call " + std::to_string(k) + ")");
      }
      enqueue_init(stream);
      for (int k = 0; k < steps; ++k) {
        if (opt.gated && k > 0)
          conditional_model_call(k, handles[k]);
        else
          model_call(k, stream);
        enqueue_step(k, stream, k + 1 < steps ? handles[k + 1] : 0, opt.gated);
      }
    }, opt.gated);
  }

  void ensure_captured() {
    if (captured || mode == Mode::kEager) return;
    if (mode == Mode::kOneGraph) {
      try {
        capture_one_graph();
      } catch (const NoConditionalNodes& e) {
        cudaGetLastError();  // the error is in the note; the step graphs' launch checks start clean
        mode = Mode::kStepGraphs;
        note = std::string("one_graph -> step_graphs (host-flag fallback), conditional nodes unsupported here: ") +
               e.what();
      }
    }
    if (mode == Mode::kStepGraphs) {
      try {
        capture_step_graphs();
      } catch (...) {  // a model call failed while captured: drop the graphs made so far
        for (auto e : model_exec) cudaGraphExecDestroy(e);
        for (auto e : step_exec) cudaGraphExecDestroy(e);
        model_exec.clear();
        step_exec.clear();
        throw;
      }
    }
    captured = true;
  }

  RunResult run(const float* x_T, const float* guidance, float* out);

  // With the gate, the host learns whether call k runs (host-flag modes only).
  bool host_skip(int k, RunResult& r) {
    if (!opt.gated || k == 0) return false;
    ++r.host_syncs;
    check(cudaMemcpyAsync(h_skip + k, v.skip + k, sizeof(int), cudaMemcpyDeviceToHost, stream), "reading skip flag");
    check(cudaStreamSynchronize(stream), "call " + std::to_string(k - 1) + " (stream synchronize)");
    return h_skip[k] != 0;
  }
};

CudaRunner::CudaRunner(const StepPlan& plan, DeviceDenoiser& model, RunnerOptions options) {
  validate(options);
  plan.validate();
  const Capabilities caps = capabilities();
  if (caps.device_count == 0) throw SamplerError("cuda runner: " + caps.reason);
  if (options.device < 0 || options.device >= caps.device_count)
    throw SamplerError("cuda runner: device " + std::to_string(options.device) + " does not exist (" +
                       std::to_string(caps.device_count) + " devices)");
  const bool capturable = model.capturable();
  if ((options.mode == Mode::kStepGraphs || options.mode == Mode::kOneGraph) && !capturable)
    throw SamplerError(std::string("cuda runner: mode ") + mode_name(options.mode) +
                       " captures the model in a CUDA graph, but this DeviceDenoiser says it is not capturable; use "
                       "eager or auto");

  impl_ = std::make_unique<Impl>(plan, model, std::move(options));
  Impl& d = *impl_;
  const RunnerOptions& o = d.opt;
  switch (o.mode) {
    case Mode::kAuto:
      d.mode = capturable ? Mode::kOneGraph : Mode::kEager;
      d.note = capturable ? "auto: one graph" : "auto: the model is not capturable, eager";
      break;
    default:
      d.mode = o.mode;
      d.note = std::string("requested ") + mode_name(o.mode);
  }
  if (d.mode == Mode::kOneGraph && o.gated && !caps.conditional_nodes) {
    d.mode = Mode::kStepGraphs;
    d.note = "one_graph -> step_graphs (host-flag fallback): " + caps.reason;
  }

  check(cudaSetDevice(o.device), "cudaSetDevice");
  check(cudaStreamCreateWithFlags(&d.stream, cudaStreamNonBlocking), "cudaStreamCreate");
  check(cudaStreamCreateWithFlags(&d.side, cudaStreamNonBlocking), "cudaStreamCreate");
  const cudaStream_t s = d.stream;
  d.program = program_for(d.plan);
  const Program& p = *d.program;
  d.steps = static_cast<int>(p.num_steps());
  kernels::View& v = d.v;
  v.m = 1;
  for (int64_t s : o.sample_shape) v.m *= s;
  v.bm = o.batch * v.m;
  v.width = static_cast<int>(p.width);
  v.blocks = static_cast<int>(std::min<int64_t>((v.m + kernels::kThreads - 1) / kernels::kThreads,
                                                 kernels::kMaxBlocksPerSample));
  v.steps = d.steps;
  v.guided = o.guided;
  v.gated = o.gated;
  const size_t bm = static_cast<size_t>(v.bm);
  v.basis = device_alloc<float>(d.owned, s, static_cast<size_t>(p.num_rows) * bm, "latents");
  v.raw = device_alloc<float>(d.owned, s, (o.guided ? 2 : 1) * bm, "model output");
  v.gout = device_alloc<float>(d.owned, s, o.gated ? 2 * bm : 0, "guided outputs");
  v.w = device_alloc<float>(d.owned, s, static_cast<size_t>(o.batch), "guidance");
  d.x_stage = device_alloc<float>(d.owned, s, bm, "x_T");
  v.skip = device_alloc<int>(d.owned, s, static_cast<size_t>(d.steps), "skip flags");
  v.status = device_alloc<int>(d.owned, s, 1, "status");
  v.partial = device_alloc<double>(d.owned, s, static_cast<size_t>(o.batch) * v.blocks, "gate partial sums");
  v.gate = device_alloc<kernels::GateDev>(d.owned, s, 1, "gate state");

  // The program's tables, float32 as the CPU loop uses them.
  const size_t rows = p.dst.size(), cells = p.src.size();
  std::vector<float> gcoef(rows), coef(cells), times(static_cast<size_t>(d.steps * o.batch));
  for (size_t i = 0; i < rows; ++i) gcoef[i] = static_cast<float>(p.gcoef[i]);
  for (size_t i = 0; i < cells; ++i) coef[i] = static_cast<float>(p.coef[i]);
  for (int k = 0; k < d.steps; ++k)
    std::fill_n(times.begin() + static_cast<int64_t>(k) * o.batch, o.batch, static_cast<float>(d.plan.times[k]));
  int* dst = device_alloc<int>(d.owned, s, rows, "program dst");
  int* src = device_alloc<int>(d.owned, s, cells, "program src");
  float* gc = device_alloc<float>(d.owned, s, rows, "program gcoef");
  float* cf = device_alloc<float>(d.owned, s, cells, "program coef");
  const std::vector<float> reuse = reuse_rows(d.plan.times, o.gate.extrapolate);
  float* ru = device_alloc<float>(d.owned, s, reuse.size(), "skip rows");
  d.times = device_alloc<float>(d.owned, s, times.size(), "times");
  check(cudaMemcpyAsync(dst, p.dst.data(), rows * sizeof(int), cudaMemcpyHostToDevice, s), "upload program dst");
  check(cudaMemcpyAsync(src, p.src.data(), cells * sizeof(int), cudaMemcpyHostToDevice, s), "upload program src");
  check(cudaMemcpyAsync(gc, gcoef.data(), rows * sizeof(float), cudaMemcpyHostToDevice, s), "upload program gcoef");
  check(cudaMemcpyAsync(cf, coef.data(), cells * sizeof(float), cudaMemcpyHostToDevice, s), "upload program coef");
  check(cudaMemcpyAsync(ru, reuse.data(), reuse.size() * sizeof(float), cudaMemcpyHostToDevice, s), "upload skip rows");
  check(cudaMemcpyAsync(d.times, times.data(), times.size() * sizeof(float), cudaMemcpyHostToDevice, s),
        "upload times");
  v.dst = dst;
  v.src = src;
  v.gcoef = gc;
  v.coef = cf;
  v.reuse = ru;
  // The memsets and uploads are ordered on the runner's stream, as is every later use of these
  // buffers. Waiting for that stream alone, never the device (cudaDeviceSynchronize would
  // invalidate a capture that another thread's runner is making), reports a failed upload here
  // and lets the host tables go.
  check(cudaStreamSynchronize(s), "uploading the program (stream synchronize)");
  d.h_skip = d.host_alloc<int>(static_cast<size_t>(d.steps), "skip flags");
  d.h_status = d.host_alloc<int>(1, "status");
  d.h_w = d.host_alloc<float>(static_cast<size_t>(o.batch), "guidance");
}

CudaRunner::~CudaRunner() = default;

Mode CudaRunner::mode() const { return impl_->mode; }
const std::string& CudaRunner::mode_note() const { return impl_->note; }
cudaStream_t CudaRunner::stream() const { return impl_->stream; }

RunResult CudaRunner::run(const float* x_T, const float* guidance, float* out) {
  try {
    return impl_->run(x_T, guidance, out);
  } catch (...) {
    // Let work already queued (the pinned guidance upload among it) finish before the next run
    // reuses the buffers; the error is the one being thrown.
    cudaStreamSynchronize(impl_->stream);
    cudaGetLastError();
    throw;
  }
}

RunResult CudaRunner::Impl::run(const float* x_T, const float* guidance, float* out) {
  const RunnerOptions& o = opt;
  if (x_T == nullptr || out == nullptr) throw SamplerError("cuda runner: x_T and out must be device pointers, got null");
  check(cudaSetDevice(o.device), "cudaSetDevice");
  const size_t bytes = static_cast<size_t>(v.bm) * sizeof(float);
  if (o.guided) {
    if (guidance == nullptr) throw SamplerError("cuda runner: this runner is guided; pass `batch` guidance weights");
    check_guidance("cuda runner", guidance, o.batch);
    std::copy_n(guidance, o.batch, h_w);
    check(cudaMemcpyAsync(v.w, h_w, o.batch * sizeof(float), cudaMemcpyHostToDevice, stream), "upload guidance");
  }
  check(cudaMemcpyAsync(x_stage, x_T, bytes, cudaMemcpyDeviceToDevice, stream), "copy x_T");
  ensure_captured();

  RunResult r;
  switch (mode) {
    case Mode::kOneGraph:
      check(cudaGraphLaunch(whole, stream), "cudaGraphLaunch (one graph)");
      ++r.graph_launches;
      break;
    case Mode::kStepGraphs:
      enqueue_init(stream);
      for (int k = 0; k < steps; ++k) {
        if (!host_skip(k, r)) {
          check(cudaGraphLaunch(model_exec[k], stream), "cudaGraphLaunch (model call " + std::to_string(k) + ")");
          ++r.graph_launches;
        }
        check(cudaGraphLaunch(step_exec[k], stream), "cudaGraphLaunch (step " + std::to_string(k) + ")");
        ++r.graph_launches;
      }
      break;
    default:
      enqueue_init(stream);
      for (int k = 0; k < steps; ++k) {
        if (!host_skip(k, r)) model_call(k, stream);
        enqueue_step(k, stream, 0, false);
      }
  }
  const Program& p = *program;
  check(cudaMemcpyAsync(out, v.basis + p.result_row * v.bm, bytes, cudaMemcpyDeviceToDevice, stream),
        "copy result");
  check(cudaMemcpyAsync(h_skip, v.skip, steps * sizeof(int), cudaMemcpyDeviceToHost, stream), "read flags");
  check(cudaMemcpyAsync(h_status, v.status, sizeof(int), cudaMemcpyDeviceToHost, stream), "read status");
  check(cudaStreamSynchronize(stream), std::string("sampling (") + mode_name(mode) +
                                             (mode == Mode::kOneGraph
                                                  ? "; a fault inside one graph cannot be traced to a call: rerun "
                                                    "with mode eager to find it)"
                                                  : ")"));
  ++r.host_syncs;
  if (*h_status >= 0) {
    const int k = *h_status;
    throw SamplerError("model call " + std::to_string(k) + " (t=" + std::to_string(plan.times[k]) +
                       ") returned non-finite values (NaN or Inf) in its guided output");
  }
  r.nfe.assign(o.batch, 0);
  r.skipped.assign(o.batch, {});
  for (int k = 0; k < steps; ++k) {
    const bool skipped = o.gated && h_skip[k] != 0;
    if (!skipped) ++r.unet_calls;
    for (int64_t b = 0; b < o.batch; ++b) {
      if (skipped)
        r.skipped[b].push_back(k);
      else
        ++r.nfe[b];
    }
  }
  return r;
}

}  // namespace cuda
}  // namespace fastdiff
