// StepPlan: the one representation of every deterministic explicit sampler (see DESIGN.md §1).
//
// With N model calls, times[k] is the model time of call k and coef is an (N+1)x(N+1)
// lower-triangular matrix over the basis b_0 = x_T, b_{j+1} = out_j (raw model output of call j):
//   input of call k  x^(k) = sum_{j<=k} coef[k][j] * b_j,   result = sum_j coef[N][j] * b_j.
// This header reads and validates the versioned JSON file written by fastdiff.plan.StepPlan.save;
// error codes and messages are the same as the Python validator's (tests hold them equal).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace fastdiff {

inline constexpr const char* kPlanFormat = "fastdiff.stepplan";
inline constexpr int kPlanVersion = 1;

// A plan file or plan that cannot be used. code() is a short stable category
// ("json", "format", "version", "field", "shape", "nonfinite", "triangular", "first_row",
// "prediction_type", "time_range", "program"); what() says exactly what is wrong and what was expected.
class PlanError : public std::runtime_error {
 public:
  PlanError(std::string code, const std::string& message)
      : std::runtime_error(message), code_(std::move(code)) {}
  const std::string& code() const { return code_; }

 private:
  std::string code_;
};

// The compiled Program: the fused-step tables of fastdiff.program.Program (see
// fastdiff/program.h). Per call k, at most two basis rows are written, each a combination of the
// guided model output g and live basis rows.
struct Program {
  int64_t num_rows = 0;          // basis rows (latents the loop keeps)
  int64_t width = 0;             // columns per table row
  int64_t init_row = 0;          // basis[init_row] = init_coef * x_T before call 0
  double init_coef = 1.0;
  int64_t result_row = 0;        // the result after the last call
  std::vector<int32_t> x_row;    // [N] basis row holding the input of call k
  std::vector<int32_t> dst;      // [N*2] rows written by call k (-1: none); 0 = output slot, 1 = next input
  std::vector<int32_t> src;      // [N*2*width] source rows (-1: unused)
  std::vector<double> coef;      // [N*2*width]
  std::vector<double> gcoef;     // [N*2] coefficient of g
  std::string origin;            // "file" (the plan file's compiled program) or "dense" (built here)

  size_t num_steps() const { return x_row.size(); }
  int32_t dst_at(size_t k, size_t i) const { return dst[k * 2 + i]; }
  int32_t src_at(size_t k, size_t i, size_t j) const { return src[(k * 2 + i) * width + j]; }
  double coef_at(size_t k, size_t i, size_t j) const { return coef[(k * 2 + i) * width + j]; }
  double gcoef_at(size_t k, size_t i) const { return gcoef[k * 2 + i]; }
};

struct StepPlan {
  std::vector<double> times;          // [N] model time of each call, model units
  std::vector<double> coef;           // [(N+1)*(N+1)] row-major, lower-triangular
  std::string prediction_type;        // "epsilon" | "v_prediction" | "sample"
  std::string schedule_fingerprint;   // empty when the plan names no schedule
  int64_t num_train_timesteps = 0;    // 0 when unknown
  int version = kPlanVersion;
  // The compiled program when the file carries one ("program", written by
  // fastdiff.program.save); parse_plan checks that it re-expands to coef.
  std::shared_ptr<const Program> program;

  size_t num_calls() const { return times.size(); }
  size_t dim() const { return times.size() + 1; }
  double at(size_t row, size_t col) const { return coef[row * dim() + col]; }

  // Throws PlanError on any inconsistency (shapes, non-finite values, upper-triangular entries,
  // a first row that ignores x_T, unknown prediction type, times outside the schedule).
  void validate() const;
};

// Parse the JSON text of a plan file and validate it. Throws PlanError.
StepPlan parse_plan(const std::string& text);

// Read and parse a plan file. Throws PlanError (code "io" when the file cannot be read).
StepPlan load_plan(const std::string& path);

}  // namespace fastdiff
