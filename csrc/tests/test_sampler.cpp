// The C++ sampling loop on its own (no Python): the plan file's compiled program and the dense
// program agree, the gate keeps its rules, errors name what failed, and one Sampler serves many
// threads. Its agreement with the reference loop is tested from Python (tests/test_loops.py).
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "check.h"
#include "fastdiff/plan.h"
#include "fastdiff/program.h"
#include "fastdiff/sampler.h"

namespace {

using fastdiff_test::max_rel;
using fastdiff_test::noise;

// raw = A·x·(t/1000) per channel pair, cond = 0.9·raw + 0.01: a linear model with some mixing.
class LinearDenoiser : public fastdiff::Denoiser {
 public:
  int calls = 0;
  int fail_at = -1;
  void forward(const fastdiff::DenoiserCall& call) override {
    if (call.step == fail_at) throw std::runtime_error("out of cheese");
    ++calls;
    const auto& shape = *call.sample_shape;
    const int64_t c = shape[0];
    int64_t hw = 1;
    for (size_t i = 1; i < shape.size(); ++i) hw *= shape[i];
    const int64_t m = c * hw;
    for (int64_t s = 0; s < call.n; ++s) {
      const float scale = call.t[s] / 1000.0f;
      for (int64_t i = 0; i < c; ++i)
        for (int64_t p = 0; p < hw; ++p) {
          float acc = 0.0f;
          for (int64_t j = 0; j < c; ++j)
            acc += 0.3f * std::sin(static_cast<float>(i * 3 + j)) * call.x[s * m + j * hw + p];
          const float y = acc * scale;
          call.out[s * m + i * hw + p] = y;
          if (call.guided) call.out[(call.n + s) * m + i * hw + p] = 0.9f * y + 0.01f;
        }
    }
  }
};

template <typename F>
std::string plan_error_code(F&& f) {
  try {
    f();
  } catch (const fastdiff::PlanError& e) {
    return e.code();
  }
  return "none";
}

void check_programs(const std::string& dir) {
  fastdiff::StepPlan plan = fastdiff::load_plan(dir + "/unipc_6.json");
  CHECK(plan.program && plan.program->origin == "file", "the file's program was not read");
  fastdiff::StepPlan bare = plan;
  bare.program.reset();
  fastdiff::Sampler compiled(plan), dense(bare);
  CHECK(dense.program().origin == "dense", "origin %s", dense.program().origin.c_str());
  CHECK(dense.program().num_rows == 8, "dense rows %lld", static_cast<long long>(dense.program().num_rows));
  CHECK(compiled.program().num_rows < dense.program().num_rows, "the compiled program keeps fewer latents");

  const int64_t batch = 3;
  fastdiff::SampleRequest req;
  req.batch = batch;
  req.sample_shape = {4, 5, 7};
  std::vector<float> x = noise(batch * 140, 1), w = {1.5f, 3.0f, 7.5f};
  req.x_T = x.data();
  req.guidance = w.data();
  LinearDenoiser m1, m2;
  const auto a = compiled.run(m1, req);
  const auto b = dense.run(m2, req);
  CHECK(m1.calls == 6 && a.unet_calls == 6 && a.nfe == std::vector<int>(3, 6), "calls %d", m1.calls);
  const double err = max_rel(a.latents, b.latents);
  CHECK(err < 1e-5, "compiled vs dense program: %g relative", err);
  bool finite = true;
  for (float v : a.latents) finite = finite && std::isfinite(v);
  CHECK(finite, "non-finite latents");

  for (const char* name : {"bad_coef.json", "bad_other_plan.json", "bad_size.json"}) {
    const std::string code = plan_error_code([&] { fastdiff::load_plan(dir + "/" + name); });
    CHECK(code == "program", "%s: code %s", name, code.c_str());
  }
}

void check_gate(const std::string& dir) {
  fastdiff::Sampler sampler(fastdiff::load_plan(dir + "/unipc_6.json"));
  const int64_t batch = 3;
  std::vector<float> x = noise(batch * 140, 2);
  fastdiff::SampleRequest req;
  req.batch = batch;
  req.sample_shape = {4, 5, 7};
  req.x_T = x.data();
  for (bool per_sample : {true, false}) for (bool extrapolate : {false, true}) {
    fastdiff::GateOptions gate;
    gate.delta = 1e3;  // skip wherever the rules allow it
    gate.max_skips = 1;
    gate.per_sample = per_sample;
    gate.extrapolate = extrapolate;
    req.gate = &gate;
    LinearDenoiser model;
    const auto r = sampler.run(model, req);
    // calls 0..2 are always made; then (max_skips = 1) copy: skip, make, skip; extrapolate: skip,
    // make, make (a run of skips follows two made calls: fd_gate_refresh)
    const std::vector<int> want = extrapolate ? std::vector<int>({3}) : std::vector<int>({3, 5});
    for (int64_t b = 0; b < batch; ++b) {
      CHECK(r.skipped[b] == want, "sample %lld skipped %zu calls", static_cast<long long>(b), r.skipped[b].size());
      CHECK(r.nfe[b] == 6 - static_cast<int>(want.size()), "nfe %d", r.nfe[b]);
    }
    CHECK(r.unet_calls == 6 - static_cast<int>(want.size()), "unet_calls %d", r.unet_calls);
    gate.delta = 0.0;  // never skip a non-constant trajectory
    const auto none = sampler.run(model, req);
    CHECK(none.nfe == std::vector<int>(3, 6), "delta 0 skipped calls");
  }
}

void check_errors(const std::string& dir) {
  fastdiff::Sampler sampler(fastdiff::load_plan(dir + "/unipc_6.json"));
  std::vector<float> x = noise(140, 3);
  fastdiff::SampleRequest req;
  req.batch = 1;
  req.sample_shape = {4, 5, 7};
  req.x_T = x.data();
  LinearDenoiser model;
  model.fail_at = 2;
  std::string message;
  try {
    sampler.run(model, req);
  } catch (const fastdiff::SamplerError& e) {
    message = e.what();
  }
  CHECK(message.find("model call 2") != std::string::npos && message.find("out of cheese") != std::string::npos,
        "message: %s", message.c_str());
  req.batch = 0;
  message.clear();
  try {
    sampler.run(model, req);
  } catch (const fastdiff::SamplerError& e) {
    message = e.what();
  }
  CHECK(message.find("batch must be >= 1") != std::string::npos, "message: %s", message.c_str());
}

void check_threads(const std::string& dir) {
  const fastdiff::Sampler sampler(fastdiff::load_plan(dir + "/unipc_6.json"));
  const int threads = 8;
  std::vector<std::vector<float>> noises, results(threads);
  for (int i = 0; i < threads; ++i) noises.push_back(noise(2 * 140, 10 + i));
  auto one = [&](int i) {
    fastdiff::SampleRequest req;
    req.batch = 2;
    req.sample_shape = {4, 5, 7};
    req.x_T = noises[i].data();
    LinearDenoiser model;  // one per thread
    return sampler.run(model, req).latents;
  };
  std::vector<std::thread> pool;
  for (int i = 0; i < threads; ++i) pool.emplace_back([&, i] { results[i] = one(i); });
  for (auto& t : pool) t.join();
  for (int i = 0; i < threads; ++i) CHECK(results[i] == one(i), "thread %d differs from a sequential run", i);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: test_sampler <tests/data/programs>\n");
    return 2;
  }
  const std::string dir = argv[1];
  check_programs(dir);
  check_gate(dir);
  check_errors(dir);
  check_threads(dir);
  TEST_MAIN_END();
}
