// fastdiff_bench_cuda: one sampling call through the CUDA runner example (cuda_runner.h) in each
// mode (eager, per-step graphs with the host flag, one graph with conditional nodes), with and
// without the gate, side by side in one process. The model is the toy denoiser of the tests
// launching --kernels kernels per call (a stand-in for a UNet's launch count, not its
// arithmetic), so the differences are the loop's own costs: launches, host synchronisations,
// graph launches.
//
//   fastdiff_bench_cuda --plan tests/data/programs/dpmpp_2m_20.json --json out.json
//       [--shape 4,64,64] [--batch 2] [--kernels 200] [--repeats 30] [--delta 0.05]
//
// Prints one line per configuration and writes them as JSON. Exits 77 without a CUDA device.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "../../tests/cuda_toy.cuh"
#include "cuda_runner/cuda_runner.h"
#include "fastdiff/plan.h"

namespace {

struct Args {
  std::string plan = "tests/data/programs/dpmpp_2m_20.json";
  std::string json;
  std::vector<int64_t> shape = {4, 64, 64};
  int64_t batch = 2;
  int kernels = 200;
  int repeats = 30;
  double delta = 0.05;
};

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr,
               "%s\nusage: fastdiff_bench_cuda [--plan FILE] [--json OUT] [--shape C,H,W] [--batch N] "
               "[--kernels K] [--repeats R] [--delta D]\n"
               "  --plan     StepPlan file (default tests/data/programs/dpmpp_2m_20.json)\n"
               "  --json     write the results here\n"
               "  --shape    one latent's shape (default 4,64,64)\n"
               "  --batch    samples per call (default 2, classifier-free guidance doubles the model batch)\n"
               "  --kernels  kernels the toy model launches per call (default 200)\n"
               "  --repeats  timed sampling calls per configuration (default 30, after 3 warm-up calls)\n"
               "  --delta    the gate's threshold for the gated rows (default 0.05)\n",
               why.c_str());
  std::exit(2);
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    if (k == "--help" || k == "-h") usage("time the CUDA runner's modes");
    if (i + 1 >= argc) usage("missing value for " + k);
    const std::string v = argv[++i];
    try {
      if (k == "--plan") {
        a.plan = v;
      } else if (k == "--json") {
        a.json = v;
      } else if (k == "--shape") {
        a.shape.clear();
        std::stringstream ss(v);
        std::string part;
        while (std::getline(ss, part, ',')) a.shape.push_back(std::stoll(part));
      } else if (k == "--batch") {
        a.batch = std::stoll(v);
      } else if (k == "--kernels") {
        a.kernels = std::stoi(v);
      } else if (k == "--repeats") {
        a.repeats = std::stoi(v);
      } else if (k == "--delta") {
        a.delta = std::stod(v);
      } else {
        usage("unknown option " + k);
      }
    } catch (const std::logic_error&) {
      usage("bad value '" + v + "' for " + k);
    }
  }
  if (a.batch < 1 || a.kernels < 1 || a.repeats < 1 || a.shape.empty()) usage("batch, kernels, repeats must be >= 1");
  return a;
}

}  // namespace

int main(int argc, char** argv) {
  const Args args = parse(argc, argv);
  const auto caps = fastdiff::cuda::capabilities();
  if (caps.device_count == 0) {
    std::printf("SKIP: %s\n", caps.reason.c_str());
    return 77;
  }
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  const fastdiff::StepPlan plan = fastdiff::load_plan(args.plan);
  int64_t m = 1;
  for (int64_t s : args.shape) m *= s;
  const size_t n = static_cast<size_t>(args.batch * m);
  float *x = nullptr, *out = nullptr;
  if (cudaMalloc(&x, n * sizeof(float)) != cudaSuccess || cudaMalloc(&out, n * sizeof(float)) != cudaSuccess) {
    std::fprintf(stderr, "cudaMalloc failed\n");
    return 1;
  }
  std::vector<float> xh(n);
  for (size_t i = 0; i < n; ++i) xh[i] = static_cast<float>((i * 2654435761u) % 2000) / 1000.0f - 1.0f;
  cudaMemcpy(x, xh.data(), n * sizeof(float), cudaMemcpyHostToDevice);
  cudaDeviceSynchronize();
  const std::vector<float> guidance(static_cast<size_t>(args.batch), 7.5f);

  std::ostringstream rows;
  double eager_ms[2] = {0.0, 0.0};
  for (bool gated : {false, true})
    for (auto mode : {fastdiff::cuda::Mode::kEager, fastdiff::cuda::Mode::kStepGraphs, fastdiff::cuda::Mode::kOneGraph}) {
      fastdiff_toy::ToyCuda toy(args.kernels);
      fastdiff::cuda::RunnerOptions o;
      o.batch = args.batch;
      o.sample_shape = args.shape;
      o.guided = true;
      o.gated = gated;
      o.gate.per_sample = false;
      o.gate.delta = args.delta;
      o.mode = mode;
      fastdiff::cuda::CudaRunner runner(plan, toy, o);
      fastdiff::cuda::RunResult r;
      for (int i = 0; i < 3; ++i) r = runner.run(x, guidance.data(), out);  // capture + warm-up
      std::vector<double> ms;
      for (int i = 0; i < args.repeats; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        r = runner.run(x, guidance.data(), out);
        ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      }
      std::sort(ms.begin(), ms.end());
      const double median = ms[ms.size() / 2];
      if (mode == fastdiff::cuda::Mode::kEager) eager_ms[gated] = median;
      const double steps = static_cast<double>(plan.num_calls());
      char line[512];
      std::snprintf(line, sizeof line,
                    "{\"mode\": \"%s\", \"requested\": \"%s\", \"note\": \"%s\", \"gated\": %s, \"ms_median\": %.4f, "
                    "\"ms_min\": %.4f, \"us_per_step\": %.2f, \"vs_eager\": %.4f, \"unet_calls\": %d, "
                    "\"graph_launches\": %d, \"host_syncs\": %d}",
                    fastdiff::cuda::mode_name(runner.mode()), fastdiff::cuda::mode_name(mode), runner.mode_note().c_str(),
                    gated ? "true" : "false", median, ms.front(), 1000.0 * median / steps, median / eager_ms[gated],
                    r.unet_calls, r.graph_launches, r.host_syncs);
      std::printf("%s\n", line);
      rows << (rows.tellp() > 0 ? ",\n    " : "    ") << line;
    }
  std::ostringstream doc;
  doc << "{\n  \"device\": \"" << prop.name << "\", \"runtime\": " << caps.runtime_version
      << ", \"driver\": " << caps.driver_version << ", \"conditional_nodes\": " << (caps.conditional_nodes ? "true" : "false")
      << ",\n  \"plan\": \"" << args.plan << "\", \"steps\": " << plan.num_calls() << ", \"batch\": " << args.batch
      << ", \"kernels_per_call\": " << args.kernels << ", \"repeats\": " << args.repeats << ", \"delta\": " << args.delta
      << ", \"shape\": [";
  for (size_t i = 0; i < args.shape.size(); ++i) doc << (i ? ", " : "") << args.shape[i];
  doc << "],\n  \"results\": [\n" << rows.str() << "\n  ]\n}\n";
  if (!args.json.empty()) std::ofstream(args.json) << doc.str();
  cudaFree(x);
  cudaFree(out);
  return 0;
}
