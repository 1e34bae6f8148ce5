// The CUDA runner (the example in csrc/examples/cuda_runner) against the CPU sampler (same plan,
// same toy model with a CPU and a CUDA twin): every mode (eager, per-step graphs with the host
// flag, one graph with conditional nodes), with and without guidance and the gate, batch 3 at an
// odd sample shape, graph replays, errors named with their call, and one runner per thread.
//
// The host-side checks (the toy's CPU twin makes the gate skip calls, option errors, which CUDA
// errors fall back from one graph and which are thrown) run everywhere. Without a CUDA device the
// device checks cannot run: the test prints why and exits 77, which CTest reports as skipped
// (SKIP_RETURN_CODE), not passed.
#include <cuda_runtime.h>

#include <cstdio>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "check.h"
#include "cuda_runner/cuda_runner.h"
#include "cuda_toy.cuh"
#include "fastdiff/plan.h"
#include "fastdiff/sampler.h"

namespace {

using fastdiff::cuda::Mode;
using fastdiff_test::max_rel;
using fastdiff_test::noise;

const std::vector<int64_t> kShape = {3, 7, 5};  // 105 elements: no multiple of a block
constexpr int64_t kBatch = 3;
const std::vector<float> kGuidance = {1.0f, 4.5f, 7.5f};

fastdiff::GateOptions batch_gate() {
  fastdiff::GateOptions g;
  g.delta = 0.05;
  g.max_skips = 2;
  g.per_sample = false;  // the CUDA runner decides per batch
  return g;
}

fastdiff::SampleResult cpu_reference(const fastdiff::StepPlan& plan, const std::vector<float>& x, bool guided,
                                     bool gated) {
  fastdiff::Sampler sampler(plan);
  fastdiff::SampleRequest req;
  req.batch = kBatch;
  req.sample_shape = kShape;
  req.x_T = x.data();
  if (guided) req.guidance = kGuidance.data();
  const fastdiff::GateOptions gate = batch_gate();
  if (gated) req.gate = &gate;
  fastdiff_toy::ToyCpu model;
  return sampler.run(model, req);
}

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const fastdiff::SamplerError& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

void check_host(const fastdiff::StepPlan& plan) {
  const auto x = noise(kBatch * 105, 7);
  const auto r = cpu_reference(plan, x, true, true);
  // The comparisons below mean something only if the toy makes the gate skip some calls.
  const size_t skipped = r.skipped[0].size();
  CHECK(skipped > 0 && skipped < plan.num_calls(), "the gate skipped %zu of %zu calls", skipped, plan.num_calls());
  std::printf("host: cpu reference, 20-step dpmpp_2m, gate per batch: nfe %d\n", r.nfe[0]);

  fastdiff::cuda::RunnerOptions o;
  o.batch = kBatch;
  o.sample_shape = kShape;
  o.gated = true;
  o.gate = batch_gate();
  o.gate.per_sample = true;
  struct NoModel : fastdiff::cuda::DeviceDenoiser {
    void forward(const fastdiff::cuda::DeviceCall&) override {}
  } none;
  CHECK(contains(error_of([&] { fastdiff::cuda::CudaRunner(plan, none, o); }), "per_sample must be false"),
        "a per-sample gate was not refused");
  o.gated = false;
  o.batch = 0;
  CHECK(contains(error_of([&] { fastdiff::cuda::CudaRunner(plan, none, o); }), "batch must be in 1..65535"), "batch 0");
  o.batch = 1;
  o.sample_shape = {4, 0, 8};
  CHECK(contains(error_of([&] { fastdiff::cuda::CudaRunner(plan, none, o); }), "non-positive dimension"),
        "zero dimension");
  CHECK(contains(error_of([] { fastdiff::cuda::parse_mode("fast"); }), "one_graph"), "unknown mode");
  CHECK(fastdiff::cuda::parse_mode("step_graphs") == Mode::kStepGraphs, "parse_mode");
}

// Only errors meaning "conditional nodes are unsupported here" fall back from one graph to step
// graphs; a capture that failed for any other reason is thrown, named.
void check_capture_errors() {
  using fastdiff::cuda::conditional_nodes_unsupported;
  for (cudaError_t err : {cudaErrorNotSupported, cudaErrorCallRequiresNewerDriver, cudaErrorInsufficientDriver})
    CHECK(conditional_nodes_unsupported(err), "%s should fall back to step graphs", cudaGetErrorName(err));
  for (cudaError_t err : {cudaSuccess, cudaErrorStreamCaptureInvalidated, cudaErrorStreamCaptureUnsupported,
                          cudaErrorStreamCaptureImplicit, cudaErrorStreamCaptureWrongThread, cudaErrorInvalidValue,
                          cudaErrorIllegalAddress, cudaErrorMemoryAllocation})
    CHECK(!conditional_nodes_unsupported(err), "%s must be thrown, not a fallback", cudaGetErrorName(err));
  const std::string text =
      fastdiff::cuda::cuda_error_text(cudaErrorStreamCaptureInvalidated, "cudaStreamEndCapture (model call 3)");
  CHECK(contains(text, "cudaStreamEndCapture (model call 3)") && contains(text, "cudaErrorStreamCaptureInvalidated"),
        "the error names neither the call nor the CUDA error: '%s'", text.c_str());
}

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(fastdiff::cuda::cuda_error_text(err, what));
}

// Device memory with a stream of its own: copies are ordered on that stream and waited for there,
// never with cudaDeviceSynchronize, which would invalidate the capture another thread's runner
// may be making (check_threads).
struct DeviceBuffer {
  float* p = nullptr;
  cudaStream_t stream = nullptr;
  explicit DeviceBuffer(size_t n) {
    check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate (test buffer)");
    const cudaError_t err = cudaMalloc(&p, n * sizeof(float));
    if (err != cudaSuccess) cudaStreamDestroy(stream);
    check_cuda(err, "cudaMalloc (test buffer)");
  }
  ~DeviceBuffer() {
    cudaFree(p);
    cudaStreamDestroy(stream);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  // Complete on return, as CudaRunner::run requires of x_T (its stream does not wait for this one).
  void upload(const std::vector<float>& v) {
    check_cuda(cudaMemcpyAsync(p, v.data(), v.size() * sizeof(float), cudaMemcpyHostToDevice, stream), "upload");
    check_cuda(cudaStreamSynchronize(stream), "upload (stream synchronize)");
  }
  std::vector<float> download(size_t n) const {
    std::vector<float> v(n);
    check_cuda(cudaMemcpyAsync(v.data(), p, n * sizeof(float), cudaMemcpyDeviceToHost, stream), "download");
    check_cuda(cudaStreamSynchronize(stream), "download (stream synchronize)");
    return v;
  }
};

fastdiff::cuda::RunnerOptions options(bool guided, bool gated, Mode mode) {
  fastdiff::cuda::RunnerOptions o;
  o.batch = kBatch;
  o.sample_shape = kShape;
  o.guided = guided;
  o.gated = gated;
  o.gate = batch_gate();
  o.mode = mode;
  return o;
}

constexpr unsigned kParitySeeds[] = {11u, 12u};

// The gated parity runs below compare decisions only if the CPU sampler skips some calls in them:
// checked in the host part (main), before the device part, so a toy or plan that stops skipping
// fails without a GPU too.
void check_parity_skips(const std::string& name, const fastdiff::StepPlan& plan) {
  size_t skipped = 0;
  for (bool guided : {false, true})
    for (unsigned seed : kParitySeeds)
      skipped += cpu_reference(plan, noise(kBatch * 105, seed), guided, true).skipped[0].size();
  CHECK(skipped > 0, "%s: the gated parity runs skip no call, so they compare no skip decision", name.c_str());
  std::printf("host: %s gated parity inputs skip %zu calls\n", name.c_str(), skipped);
}

// Runs the runner twice (the second run replays the captured graphs) against the CPU sampler.
void check_parity(const std::string& name, const fastdiff::StepPlan& plan, bool conditional_nodes) {
  const size_t n = kBatch * 105;
  for (bool guided : {false, true})
    for (bool gated : {false, true})
      for (Mode mode : {Mode::kEager, Mode::kStepGraphs, Mode::kOneGraph, Mode::kAuto}) {
        fastdiff_toy::ToyCuda toy(3);
        fastdiff::cuda::CudaRunner runner(plan, toy, options(guided, gated, mode));
        DeviceBuffer x(n), out(n);
        for (unsigned seed : kParitySeeds) {
          const auto xh = noise(n, seed);
          const auto ref = cpu_reference(plan, xh, guided, gated);
          x.upload(xh);
          const auto r = runner.run(x.p, guided ? kGuidance.data() : nullptr, out.p);
          const auto got = out.download(n);
          const double err = max_rel(ref.latents, got);
          std::printf("%s guided=%d gated=%d %s (%s): nfe %d, max rel diff %.3g, %d graph launches, %d syncs\n",
                      name.c_str(), guided, gated, fastdiff::cuda::mode_name(runner.mode()),
                      runner.mode_note().c_str(), r.nfe[0], err, r.graph_launches, r.host_syncs);
          CHECK(err <= 1e-6, "%s: latents differ from the CPU sampler by %g relative", name.c_str(), err);
          // Identical decisions: the statistic's double sum runs in another order on the GPU, which
          // could flip one only if its float rounding landed exactly on a boundary.
          CHECK(r.nfe == ref.nfe && r.skipped == ref.skipped && r.unet_calls == ref.unet_calls,
                "%s: skips differ (gpu nfe %d, cpu %d)", name.c_str(), r.nfe[0], ref.nfe[0]);
          const int steps = static_cast<int>(plan.num_calls());
          if (runner.mode() == Mode::kOneGraph) {
            CHECK(r.host_syncs == 1 && r.graph_launches == 1, "one graph: %d syncs, %d launches", r.host_syncs,
                  r.graph_launches);
          } else if (runner.mode() == Mode::kStepGraphs) {
            CHECK(r.graph_launches == r.unet_calls + steps, "step graphs: %d launches", r.graph_launches);
            CHECK(r.host_syncs == (gated ? steps : 1), "step graphs: %d syncs", r.host_syncs);
          } else {
            CHECK(r.graph_launches == 0, "eager launched graphs");
          }
          if (mode == Mode::kOneGraph || mode == Mode::kAuto)
            CHECK(runner.mode() == Mode::kOneGraph || (gated && !conditional_nodes),
                  "one graph was not used: %s", runner.mode_note().c_str());
        }
        // graphs capture the model once per call, never per run
        if (runner.mode() != Mode::kEager && !contains(runner.mode_note(), "fallback"))
          CHECK(toy.forwards == static_cast<int>(plan.num_calls()), "forward ran %d times", toy.forwards);
      }
}

void check_errors(const fastdiff::StepPlan& plan) {
  const size_t n = kBatch * 105;
  DeviceBuffer x(n), out(n);
  x.upload(noise(n, 3));
  for (Mode mode : {Mode::kEager, Mode::kStepGraphs, Mode::kOneGraph}) {
    fastdiff_toy::ToyCuda toy(2);
    fastdiff::cuda::CudaRunner runner(plan, toy, options(true, true, mode));
    toy.fail_at = 2;
    const std::string failed = error_of([&] { runner.run(x.p, kGuidance.data(), out.p); });
    CHECK(contains(failed, "model call 2") && contains(failed, "out of cheese"), "%s: error '%s'",
          fastdiff::cuda::mode_name(mode), failed.c_str());
    toy.fail_at = -1;  // the runner stays usable: the interrupted capture was dropped
    const auto r = runner.run(x.p, kGuidance.data(), out.p);
    const double err = max_rel(cpu_reference(plan, noise(n, 3), true, true).latents, out.download(n));
    CHECK(err <= 1e-6, "%s: after a failed call, %g relative", fastdiff::cuda::mode_name(mode), err);
    (void)r;
  }
  for (Mode mode : {Mode::kEager, Mode::kOneGraph}) {
    fastdiff_toy::ToyCuda toy(1);
    toy.nan_at = 3;
    fastdiff::cuda::CudaRunner runner(plan, toy, options(true, false, mode));
    const std::string bad = error_of([&] { runner.run(x.p, kGuidance.data(), out.p); });
    CHECK(contains(bad, "model call 3") && contains(bad, "non-finite"), "NaN error '%s'", bad.c_str());
    CHECK(contains(error_of([&] { runner.run(x.p, nullptr, out.p); }), "guidance weights"), "missing guidance");
  }
  fastdiff_toy::ToyCuda eager_only(1, false);
  CHECK(contains(error_of([&] { fastdiff::cuda::CudaRunner(plan, eager_only, options(false, true, Mode::kOneGraph)); }),
                 "not capturable"),
        "a non-capturable model was captured");
  fastdiff::cuda::CudaRunner automatic(plan, eager_only, options(false, true, Mode::kAuto));
  CHECK(automatic.mode() == Mode::kEager, "auto with a non-capturable model: %s", automatic.mode_note().c_str());
}

// One runner (and stream) per thread, all sampling at once.
void check_threads(const fastdiff::StepPlan& plan) {
  const size_t n = kBatch * 105;
  std::vector<double> errs(4, 1.0);
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i)
    threads.emplace_back([&, i] {
      try {
        fastdiff_toy::ToyCuda toy(2);
        fastdiff::cuda::CudaRunner runner(plan, toy, options(true, true, Mode::kAuto));
        DeviceBuffer x(n), out(n);
        const auto xh = noise(n, 100 + i);
        x.upload(xh);
        double worst = 0.0;
        for (int rep = 0; rep < 3; ++rep) {
          runner.run(x.p, kGuidance.data(), out.p);
          worst = std::max(worst, max_rel(cpu_reference(plan, xh, true, true).latents, out.download(n)));
        }
        errs[i] = worst;
      } catch (const std::exception& e) {  // an exception must not escape a thread (std::terminate)
        std::fprintf(stderr, "thread %d: %s\n", i, e.what());
      }
    });
  for (auto& t : threads) t.join();
  for (int i = 0; i < 4; ++i) CHECK(errs[i] <= 1e-6, "thread %d: %g relative", i, errs[i]);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: test_cuda_sampler tests/data/programs\n");
    return 2;
  }
  const std::string dir = argv[1];
  const fastdiff::StepPlan long_plan = fastdiff::load_plan(dir + "/dpmpp_2m_20.json");
  const fastdiff::StepPlan short_plan = fastdiff::load_plan(dir + "/unipc_6.json");
  check_host(long_plan);
  check_parity_skips("dpmpp_2m_20", long_plan);
  check_parity_skips("unipc_6", short_plan);
  check_capture_errors();
  if (fastdiff_test::failures) TEST_MAIN_END();

  const auto caps = fastdiff::cuda::capabilities();
  std::printf("cuda runtime %d, driver %d, %d devices, conditional nodes %s %s\n", caps.runtime_version,
              caps.driver_version, caps.device_count, caps.conditional_nodes ? "yes" : "no", caps.reason.c_str());
  if (caps.device_count == 0) {
    std::printf("SKIP: the device checks need a CUDA device (%s); the host checks passed\n", caps.reason.c_str());
    return 77;
  }
  check_parity("dpmpp_2m_20", long_plan, caps.conditional_nodes);
  check_parity("unipc_6", short_plan, caps.conditional_nodes);
  check_errors(long_plan);
  check_threads(long_plan);
  TEST_MAIN_END();
}
