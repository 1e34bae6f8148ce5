// CPU sampling loop (the loop 'cpp' of fastdiff.loops). Mirrors fastdiff.loops.reference and
// fastdiff.ops.step.fused_step_reference: float32 arithmetic in torch's operation order
//   g = u + w·(c − u);  row = gcoef·g, then row = row + coef_j·basis[src_j] for each column j
// so that, given the same model outputs, the latents agree with the reference loop's to float32
// rounding of the gate statistic's mean (the only reduction, used only for skip decisions).
#include "fastdiff/sampler.h"

#include <algorithm>
#include <cmath>
#include <exception>
#include <numeric>
#include <string>
#include <utility>

#include "fastdiff/program.h"
#include "fastdiff/step_math.h"

namespace fastdiff {
namespace {

void check_request(const SampleRequest& r) {
  if (r.x_T == nullptr) throw SamplerError("sample: x_T is null");
  check_sample_shape("sample", r.batch, r.sample_shape);
  check_guidance("sample", r.guidance, r.batch);
  if (r.gate != nullptr) check_gate("sample", *r.gate);
}

}  // namespace

GateState::GateState(const GateOptions& options, size_t groups)
    : opt(options), d1(groups, 0.0f), d2(groups, 0.0f), run(groups, 0) {}

std::vector<char> GateState::observe(const std::vector<float>& d) {
  const bool active = fd_gate_active(call++, opt.warmup);
  const float threshold_scale = static_cast<float>(2.0 * opt.delta);
  std::vector<char> skip(d.size(), 0);
  for (size_t g = 0; g < d.size(); ++g)
    skip[g] = fd_gate_observe(d[g], d1[g], d2[g], run[g], active, threshold_scale, opt.max_skips,
                              fd_gate_refresh(opt.extrapolate));
  return skip;
}

void check_sample_shape(const char* who, int64_t batch, const std::vector<int64_t>& sample_shape) {
  const std::string w(who);
  if (batch < 1) throw SamplerError(w + ": batch must be >= 1, got " + std::to_string(batch));
  if (sample_shape.empty()) throw SamplerError(w + ": sample_shape is empty (expected e.g. {4, 64, 64})");
  for (int64_t s : sample_shape)
    if (s < 1) throw SamplerError(w + ": sample_shape has a non-positive dimension " + std::to_string(s));
}

void check_guidance(const char* who, const float* guidance, int64_t batch) {
  if (guidance == nullptr) return;
  for (int64_t b = 0; b < batch; ++b)
    if (!std::isfinite(guidance[b]))
      throw SamplerError(std::string(who) + ": guidance weight " + std::to_string(b) + " is not finite");
}

std::vector<float> reuse_rows(const std::vector<double>& times, bool extrapolate) {
  const size_t n = times.size();
  std::vector<float> rows(2 * n, 0.0f);
  for (size_t k = 0; k < n; ++k) {
    double a = 1.0, b = 0.0;
    if (extrapolate && k >= 2) {
      const double span = times[k - 1] - times[k - 2];
      const double scale = std::max({std::fabs(times[k - 1]), std::fabs(times[k - 2]), 1.0});
      if (std::fabs(span) > 1e-9 * scale) {
        const double r = (times[k] - times[k - 1]) / span;
        a = 1.0 + r;
        b = -r;
      }
    }
    rows[2 * k] = static_cast<float>(a);
    rows[2 * k + 1] = static_cast<float>(b);
  }
  return rows;
}

void check_gate(const char* who, const GateOptions& g) {
  const std::string w(who);
  if (!(g.delta >= 0.0) || !std::isfinite(g.delta))
    throw SamplerError(w + ": gate delta must be a finite number >= 0, got " + std::to_string(g.delta));
  if (g.max_skips < 0 || g.warmup < 0) throw SamplerError(w + ": gate max_skips and warmup must be >= 0");
}

Sampler::Sampler(StepPlan plan) : plan_(std::move(plan)) {
  plan_.validate();
  program_ = program_for(plan_);
  const Program& p = *program_;
  rows_.resize(p.num_steps());
  for (size_t k = 0; k < p.num_steps(); ++k)
    for (size_t i = 0; i < 2; ++i) {
      RowTerms& rt = rows_[k][i];
      rt.dst = p.dst_at(k, i);
      if (rt.dst < 0) continue;
      rt.gcoef = static_cast<float>(p.gcoef_at(k, i));
      for (int64_t j = 0; j < p.width; ++j)
        if (p.src_at(k, i, j) >= 0) rt.terms.emplace_back(p.src_at(k, i, j), static_cast<float>(p.coef_at(k, i, j)));
    }
}

SampleResult Sampler::run(Denoiser& model, const SampleRequest& req) const {
  check_request(req);
  const Program& p = *program_;
  const size_t steps = p.num_steps();
  const int64_t batch = req.batch;
  int64_t m = 1;
  for (int64_t s : req.sample_shape) m *= s;
  const bool guided = req.guidance != nullptr;
  const bool gated = req.gate != nullptr;
  const size_t bm = static_cast<size_t>(batch * m);

  std::vector<float> basis(static_cast<size_t>(p.num_rows) * bm);
  std::vector<float> raw((guided ? 2 : 1) * bm);
  std::vector<float> out(gated ? 2 * bm : 0);   // each sample's last two guided outputs, call k's in half k % 2
  const std::vector<float> reuse = gated ? reuse_rows(plan_.times, req.gate->extrapolate) : std::vector<float>();
  std::vector<float> xin, tin(static_cast<size_t>(batch));  // compacted inputs
  std::vector<float> stat(gated ? batch : 0);
  std::vector<float> scratch_g(static_cast<size_t>(m)), scratch[2] = {std::vector<float>(m), std::vector<float>(m)};
  auto row = [&](int64_t r) { return basis.data() + static_cast<size_t>(r) * bm; };

  const float init = static_cast<float>(p.init_coef);
  float* init_row = row(p.init_row);
  for (size_t i = 0; i < bm; ++i) init_row[i] = req.x_T[i] * init;

  SampleResult result;
  result.nfe.assign(batch, 0);
  result.skipped.assign(batch, {});
  std::unique_ptr<GateState> gate;
  if (gated) gate = std::make_unique<GateState>(*req.gate, req.gate->per_sample ? batch : 1);
  std::vector<char> skip(batch, 0);
  std::vector<int64_t> index, rows(batch);

  for (size_t k = 0; k < steps; ++k) {
    const float t = static_cast<float>(plan_.times[k]);
    float* x = row(p.x_row[k]);
    index.clear();
    for (int64_t b = 0; b < batch; ++b)
      if (!skip[b]) index.push_back(b);
    const int64_t n = static_cast<int64_t>(index.size());
    for (int64_t b = 0, r = 0; b < batch; ++b) rows[b] = skip[b] ? -1 : r++;

    if (n > 0) {
      DenoiserCall call;
      call.step = static_cast<int>(k);
      call.n = n;
      call.sample_shape = &req.sample_shape;
      call.guided = guided;
      call.out = raw.data();
      std::fill(tin.begin(), tin.begin() + n, t);
      call.t = tin.data();
      if (n == batch) {
        call.x = x;
      } else {
        xin.resize(static_cast<size_t>(n * m));
        for (int64_t r = 0; r < n; ++r) std::copy_n(x + index[r] * m, m, xin.data() + r * m);
        call.x = xin.data();
        call.index = index.data();
      }
      try {
        model.forward(call);
      } catch (const std::exception& e) {
        throw SamplerError("model call " + std::to_string(k) + " (t=" + std::to_string(plan_.times[k]) +
                           ", " + std::to_string(n) + " samples) failed: " + e.what());
      }
      ++result.unet_calls;
    }
    for (int64_t b = 0; b < batch; ++b) {
      if (skip[b])
        result.skipped[b].push_back(static_cast<int>(k));
      else
        ++result.nfe[b];
    }

    // The fused step. Per sample, whole-vector loops (vectorised by the compiler; per element the same float
    // operations in the same order as torch), into scratch rows, then stored: both rows are
    // computed from the values before the call.
    const auto& rt = rows_[k];
    float* const out_k = gated ? out.data() + (k % 2) * bm : nullptr;         // g_k goes here, over g_{k-2}
    const float* const out_last = gated ? out.data() + ((k + 1) % 2) * bm : nullptr;  // g_{k-1}
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t r = rows[b];
      const size_t off = static_cast<size_t>(b * m);
      const float* g = nullptr;
      if (r >= 0 && !guided && !gated) {
        g = raw.data() + r * m;
      } else if (r >= 0) {
        const float* __restrict u = raw.data() + r * m;
        float* __restrict gb = gated ? out_k + off : scratch_g.data();
        if (guided) {
          const float* __restrict c = raw.data() + (n + r) * m;
          const float w = req.guidance[b];
          for (int64_t e = 0; e < m; ++e) gb[e] = fd_guide(u[e], c[e], w);
        } else {
          std::copy_n(u, m, gb);
        }
        g = gb;
      } else {
        // Skipped: the skip row's prediction a·g_{k-1} + b·g_{k-2}, stored over g_{k-2}.
        const float a = reuse[2 * k], c = reuse[2 * k + 1];
        float* __restrict gb = out_k + off;
        const float* __restrict last = out_last + off;
        for (int64_t e = 0; e < m; ++e) gb[e] = fd_reuse(a, last[e], c, gb[e]);
        g = gb;
      }
      for (size_t i = 0; i < 2; ++i) {
        if (rt[i].dst < 0) continue;
        float* __restrict v = scratch[i].data();
        const float gc = rt[i].gcoef;
        for (int64_t e = 0; e < m; ++e) v[e] = fd_mul(gc, g[e]);
        for (const auto& term : rt[i].terms) {
          const float* __restrict src = row(term.first) + off;
          const float c = term.second;
          for (int64_t e = 0; e < m; ++e) v[e] = fd_axpy(v[e], c, src[e]);
        }
      }
      if (gated) {
        const float* __restrict xb = x + off;
        const float* __restrict v1 = scratch[1].data();
        double acc = 0.0;
        for (int64_t e = 0; e < m; ++e) acc += std::fabs(v1[e] - xb[e]);
        stat[b] = static_cast<float>(acc / static_cast<double>(m));
      }
      if (rt[0].dst >= 0) std::copy_n(scratch[0].data(), m, row(rt[0].dst) + off);
      std::copy_n(scratch[1].data(), m, row(rt[1].dst) + off);
    }

    if (gated && k + 1 < steps) {
      std::vector<char> flags;
      if (req.gate->per_sample) {
        flags = gate->observe(stat);
      } else {
        const double mean = std::accumulate(stat.begin(), stat.end(), 0.0) / static_cast<double>(batch);
        flags = gate->observe({static_cast<float>(mean)});
      }
      for (int64_t b = 0; b < batch; ++b) skip[b] = req.gate->per_sample ? flags[b] : flags[0];
    }
    if (req.callback) req.callback(static_cast<int>(k), row(p.dst_at(k, 1)));
  }
  const float* res = row(p.result_row);
  result.latents.assign(res, res + bm);
  return result;
}

}  // namespace fastdiff
