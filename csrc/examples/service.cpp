// fastdiff_service: a C++ image service with no Python at run time.
//
// Loads an AOTI package directory (fastdiff export --format aoti: UNet + VAE packages, the
// plan with its compiled program, pre-encoded prompts), then serves `--requests` requests from
// `--threads` worker threads sharing one Sampler and one package (the AOTI loaders keep one
// model instance per thread). Request r samples prompt r % P with seed `--seed` + r and writes
// OUT/request-<r>.png (and, with --save-latents, OUT/request-<r>.safetensors). On the CPU a
// thread has no stream of its own; the GPU build (one CUDA stream per thread) is not built yet.
// Prints one JSON line with the timings; exits 1 if any request failed, 2 on bad arguments.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <ATen/Parallel.h>

#include "fastdiff/aoti.h"
#include "fastdiff/io.h"
#include "fastdiff/sampler.h"

namespace {

const char* kUsage =
    "usage: fastdiff_service PACKAGE_DIR --out DIR [options]\n"
    "  PACKAGE_DIR        written by `fastdiff export --format aoti` (package.json, unet.pt2, vae.pt2,\n"
    "                     plan.json, prompts.safetensors)\n"
    "  --out DIR          where request-<r>.png go (created)\n"
    "  --requests N       requests to serve (default 16)\n"
    "  --threads T        worker threads (default 8)\n"
    "  --batch B          images per request (default 1)\n"
    "  --seed S           request r draws its noise with seed S + r (default 0)\n"
    "  --plan FILE        a StepPlan file instead of the package's (must match the model's schedule)\n"
    "  --skip-delta D     skip UNet calls with the AdaptiveDiffusion gate at threshold D (default: off)\n"
    "  --noise FILE       take x_T from FILE's tensor 'x_T' [requests*B, C, h, w] instead of the seeds\n"
    "  --save-latents     also write request-<r>.safetensors with the final latents ('latents')\n"
    "  --intra-op T       threads each request's kernels may use (default: cores / threads, at least 1)\n";

struct Options {
  std::string package, out, plan, noise;
  int requests = 16, threads = 8, batch = 1, intra_op = 0;
  long seed = 0;
  double skip_delta = -1;
  bool save_latents = false;
};

Options parse(int argc, char** argv) {
  Options o;
  std::vector<std::string> args(argv + 1, argv + argc);
  auto value = [&](size_t& i) -> std::string {
    if (i + 1 >= args.size()) throw std::invalid_argument(args[i] + " needs a value");
    return args[++i];
  };
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--help" || a == "-h") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    } else if (a == "--out") o.out = value(i);
    else if (a == "--requests") o.requests = std::stoi(value(i));
    else if (a == "--threads") o.threads = std::stoi(value(i));
    else if (a == "--batch") o.batch = std::stoi(value(i));
    else if (a == "--seed") o.seed = std::stol(value(i));
    else if (a == "--plan") o.plan = value(i);
    else if (a == "--noise") o.noise = value(i);
    else if (a == "--skip-delta") o.skip_delta = std::stod(value(i));
    else if (a == "--save-latents") o.save_latents = true;
    else if (a == "--intra-op") o.intra_op = std::stoi(value(i));
    else if (!a.empty() && a[0] == '-') throw std::invalid_argument("unknown option " + a);
    else if (o.package.empty()) o.package = a;
    else throw std::invalid_argument("unexpected argument " + a);
  }
  if (o.package.empty() || o.out.empty()) throw std::invalid_argument("PACKAGE_DIR and --out are required");
  if (o.requests < 1 || o.threads < 1 || o.batch < 1)
    throw std::invalid_argument("--requests, --threads and --batch must be >= 1");
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  try {
    opt = parse(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fastdiff_service: %s\n%s", e.what(), kUsage);
    return 2;
  }
  try {
    const auto t0 = std::chrono::steady_clock::now();
    const fastdiff::AOTIPackage package(opt.package, static_cast<size_t>(opt.threads));
    fastdiff::StepPlan plan = package.plan();
    if (!opt.plan.empty()) {
      plan = fastdiff::load_plan(opt.plan);
      package.check_plan(plan);
    }
    const fastdiff::Sampler sampler(plan);
    const auto& m = package.manifest();
    const int64_t latent_numel = m.latent_shape[0] * m.latent_shape[1] * m.latent_shape[2];
    fastdiff::HostTensor noise;
    if (!opt.noise.empty()) {
      noise = fastdiff::load_safetensors(opt.noise).at("x_T");
      const int64_t want = static_cast<int64_t>(opt.requests) * opt.batch * latent_numel;
      if (noise.numel() != want)
        throw fastdiff::IoError("--noise: 'x_T' holds " + std::to_string(noise.numel()) + " values, expected " +
                                std::to_string(want) + " (requests x batch x latent)");
    }
    std::filesystem::create_directories(opt.out);
    const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

    fastdiff::GateOptions gate;
    if (opt.skip_delta >= 0) gate.delta = opt.skip_delta;
    std::atomic<int> next{0};
    std::mutex log_mutex;
    std::vector<double> latency(opt.requests, 0.0);
    std::vector<int> calls(opt.requests, 0);
    int failures = 0;
    const auto start = std::chrono::steady_clock::now();
    // Each worker's kernels get their share of the cores (OpenMP's thread count is per thread).
    const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    const int intra_op = opt.intra_op > 0 ? opt.intra_op : std::max(1, cores / opt.threads);
    auto worker = [&] {
      at::set_num_threads(intra_op);
      for (int r = next++; r < opt.requests; r = next++) {
        const auto begin = std::chrono::steady_clock::now();
        try {
          const size_t prompt = static_cast<size_t>(r) % package.num_prompts();
          std::vector<float> x(static_cast<size_t>(opt.batch * latent_numel));
          if (!opt.noise.empty()) {
            std::copy_n(noise.data.begin() + static_cast<int64_t>(r) * opt.batch * latent_numel, x.size(), x.begin());
          } else {
            std::mt19937_64 rng(static_cast<uint64_t>(opt.seed + r));
            std::normal_distribution<float> normal;
            for (float& v : x) v = normal(rng);
          }
          const bool guided = m.guidance_scale > 1;
          std::vector<float> w(static_cast<size_t>(opt.batch), static_cast<float>(m.guidance_scale));
          at::Tensor cond = package.cond(prompt).expand({opt.batch, -1, -1}).contiguous();
          at::Tensor uncond = guided ? package.uncond().expand({opt.batch, -1, -1}).contiguous() : at::Tensor();
          fastdiff::AOTIDenoiser model(package, cond, uncond);
          fastdiff::SampleRequest req;
          req.x_T = x.data();
          req.batch = opt.batch;
          req.sample_shape = m.latent_shape;
          req.guidance = guided ? w.data() : nullptr;
          req.gate = opt.skip_delta >= 0 ? &gate : nullptr;
          fastdiff::SampleResult result = sampler.run(model, req);
          calls[r] = result.unet_calls;
          std::vector<int64_t> shape{opt.batch};
          shape.insert(shape.end(), m.latent_shape.begin(), m.latent_shape.end());
          if (opt.save_latents) {
            fastdiff::HostTensor t{shape, result.latents};
            fastdiff::save_safetensors(opt.out + "/request-" + std::to_string(r) + ".safetensors", {{"latents", t}});
          }
          if (m.has_vae) {
            at::Tensor latents = at::from_blob(result.latents.data(), shape, at::kFloat);
            at::Tensor images = package.decode(latents).contiguous();
            const int c = static_cast<int>(images.size(1)), h = static_cast<int>(images.size(2)),
                      wd = static_cast<int>(images.size(3));
            for (int b = 0; b < opt.batch; ++b) {
              const std::string name = opt.out + "/request-" + std::to_string(r) +
                                       (opt.batch > 1 ? "-" + std::to_string(b) : "") + ".png";
              fastdiff::write_png(name, wd, h, fastdiff::to_rgb8(images[b].data_ptr<float>(), c, h, wd));
            }
          }
        } catch (const std::exception& e) {
          std::lock_guard<std::mutex> lock(log_mutex);
          ++failures;
          std::fprintf(stderr, "fastdiff_service: request %d failed: %s\n", r, e.what());
        }
        latency[r] = std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count();
      }
    };
    std::vector<std::thread> pool;
    for (int i = 0; i < opt.threads; ++i) pool.emplace_back(worker);
    for (auto& t : pool) t.join();
    const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    double mean = 0, worst = 0;
    int unet_calls = 0;
    for (int r = 0; r < opt.requests; ++r) {
      mean += latency[r] / opt.requests;
      worst = std::max(worst, latency[r]);
      unet_calls += calls[r];
    }
    std::printf(
        "{\"model\": \"%s\", \"requests\": %d, \"threads\": %d, \"batch\": %d, \"failed\": %d, \"load_s\": %.3f, "
        "\"total_s\": %.3f, \"images_per_s\": %.2f, \"mean_latency_ms\": %.1f, \"max_latency_ms\": %.1f, "
        "\"unet_calls\": %d, \"intra_op_threads\": %d, \"images\": %s}\n",
        m.model.c_str(), opt.requests, opt.threads, opt.batch, failures, load_s, total,
        opt.requests * opt.batch / total, mean * 1e3, worst * 1e3, unet_calls, intra_op, m.has_vae ? "true" : "false");
    return failures ? 1 : 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fastdiff_service: %s\n", e.what());
    return 1;
  }
}
