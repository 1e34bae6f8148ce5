// Executor programs: the dense construction and the re-expansion check (the C++ twin of
// fastdiff.program._verify).
#include "fastdiff/program.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace fastdiff {
namespace {

constexpr double kVerifyTol = 1e-8;  // relative to max|coef|, as fastdiff.program.VERIFY_TOL
constexpr int64_t kMinWidth = 8;     // as fastdiff.ops.step.MIN_WIDTH

[[noreturn]] void fail(const std::string& message) { throw PlanError("program", "plan program: " + message); }

}  // namespace

Program dense_program(const StepPlan& plan) {
  const int64_t n = static_cast<int64_t>(plan.num_calls());
  const double c00 = plan.at(0, 0);  // nonzero: validate() guarantees it
  Program p;
  p.origin = "dense";
  p.num_rows = n + 2;  // row 0 = c00·x_T (the input of call 0), rows 1..N = outputs, row N+1 = input
  p.width = std::max<int64_t>(kMinWidth, (n + kMinWidth - 1) / kMinWidth * kMinWidth);
  p.init_row = 0;
  p.init_coef = c00;
  p.result_row = n + 1;
  p.x_row.assign(n, static_cast<int32_t>(n + 1));
  p.x_row[0] = 0;
  p.dst.assign(n * 2, -1);
  p.src.assign(n * 2 * p.width, -1);
  p.coef.assign(n * 2 * p.width, 0.0);
  p.gcoef.assign(n * 2, 0.0);
  for (int64_t k = 0; k < n; ++k) {
    // Row 0: keep out_k (basis b_{k+1}) while a later row uses it.
    bool used_later = false;
    for (int64_t r = k + 2; r <= n; ++r) used_later = used_later || plan.at(r, k + 1) != 0.0;
    if (used_later) {
      p.dst[k * 2] = static_cast<int32_t>(k + 1);
      p.gcoef[k * 2] = 1.0;
    }
    // Row 1: the next input x^(k+1) = coef[k+1][k+1]·g + Σ_{j<=k} coef[k+1][j]·b_j.
    p.dst[k * 2 + 1] = static_cast<int32_t>(n + 1);
    p.gcoef[k * 2 + 1] = plan.at(k + 1, k + 1);
    int64_t col = 0;
    for (int64_t j = 0; j <= k; ++j) {
      const double c = plan.at(k + 1, j);
      if (c == 0.0) continue;
      const size_t at = (k * 2 + 1) * p.width + col++;
      p.src[at] = static_cast<int32_t>(j);  // basis row j holds b_j (row 0 scaled by c00)
      p.coef[at] = j == 0 ? c / c00 : c;
    }
  }
  check_program(p, plan);
  return p;
}

void check_program(const Program& p, const StepPlan& plan) {
  const size_t n = plan.num_calls();
  const size_t d = plan.dim();
  if (p.num_steps() != n)
    fail("it has " + std::to_string(p.num_steps()) + " calls but the plan has " + std::to_string(n));
  if (p.num_rows < 1 || p.width < 1) fail("num_rows and width must be positive");
  const size_t rows = static_cast<size_t>(p.num_rows), width = static_cast<size_t>(p.width);
  if (p.dst.size() != n * 2 || p.gcoef.size() != n * 2 || p.src.size() != n * 2 * width ||
      p.coef.size() != n * 2 * width)
    fail("table sizes do not match " + std::to_string(n) + " calls x 2 rows x width " + std::to_string(width));
  auto row_ok = [&](int64_t r) { return r >= 0 && r < p.num_rows; };
  if (!row_ok(p.init_row) || !row_ok(p.result_row)) fail("init_row/result_row outside 0.." + std::to_string(rows - 1));
  double scale = 0.0;
  for (double c : plan.coef) scale = std::max(scale, std::fabs(c));
  const double tol = kVerifyTol * std::max(scale, 1e-300);

  // Each basis row as a vector over the canonical basis b_0 = x_T, b_{j+1} = out_j.
  std::vector<std::vector<double>> vec(rows);
  auto compare = [&](const std::vector<double>& v, size_t plan_row, const std::string& what) {
    for (size_t j = 0; j < d; ++j) {
      const double err = std::fabs(v[j] - plan.at(plan_row, j));
      if (!(err <= tol))
        fail(what + " differs from coef row " + std::to_string(plan_row) + " at column " + std::to_string(j) +
             " by " + std::to_string(err) + " (the program was compiled for another plan, or is corrupt)");
    }
  };
  vec[p.init_row].assign(d, 0.0);
  vec[p.init_row][0] = p.init_coef;
  for (size_t k = 0; k < n; ++k) {
    const std::string call = "call " + std::to_string(k);
    const int32_t xr = p.x_row[k];
    if (!row_ok(xr) || vec[xr].empty()) fail(call + ": its input row " + std::to_string(xr) + " is not written");
    compare(vec[xr], k, call + "'s input");
    std::vector<double> next[2];
    for (size_t i = 0; i < 2; ++i) {
      const int32_t dst = p.dst_at(k, i);
      if (dst < 0) continue;
      if (!row_ok(dst)) fail(call + ": writes row " + std::to_string(dst) + " outside 0.." + std::to_string(rows - 1));
      std::vector<double> v(d, 0.0);
      v[k + 1] = p.gcoef_at(k, i);
      for (size_t j = 0; j < width; ++j) {
        const int32_t s = p.src_at(k, i, j);
        if (s < 0) continue;
        if (!row_ok(s) || vec[s].empty())
          fail(call + ": reads row " + std::to_string(s) + ", which holds nothing at that point");
        if (i == 1 && s == p.dst_at(k, 0))
          fail(call + ": the next input reads the row the output is written to in the same call");
        for (size_t c = 0; c < d; ++c) v[c] += p.coef_at(k, i, j) * vec[s][c];
      }
      next[i] = std::move(v);
    }
    if (p.dst_at(k, 1) < 0) fail(call + ": writes no next input");
    for (size_t i = 0; i < 2; ++i)
      if (!next[i].empty()) vec[p.dst_at(k, i)] = std::move(next[i]);
  }
  if (vec[p.result_row].empty()) fail("the result row " + std::to_string(p.result_row) + " is never written");
  compare(vec[p.result_row], n, "the result");
}

std::shared_ptr<const Program> program_for(const StepPlan& plan) {
  if (plan.program) return plan.program;
  return std::make_shared<const Program>(dense_program(plan));
}

}  // namespace fastdiff
