// StepPlan file reader and validator. Every message here has a twin in python/fastdiff/plan.py;
// tests/test_plan_cpp.py feeds both the same files and compares code and message.
#include "fastdiff/plan.h"

#include "fastdiff/io.h"
#include "fastdiff/program.h"

#include <cmath>
#include <sstream>

#include "json.h"

namespace fastdiff {
namespace {

using json::Value;

std::string describe(const Value& v) {
  if (v.kind == Value::Kind::String) return "'" + v.string + "'";
  if (v.kind == Value::Kind::Null) return "null";
  return std::string(v.kind == Value::Kind::Array || v.kind == Value::Kind::Object ? "an " : "a ") +
         Value::kind_name(v.kind);
}

std::string nonfinite_name(double x) {
  if (std::isnan(x)) return "nan";
  return x > 0 ? "inf" : "-inf";
}

bool is_number(const Value& v) { return v.kind == Value::Kind::Number; }

std::vector<double> number_array(const Value& v, const std::string& field) {
  if (v.kind != Value::Kind::Array)
    throw PlanError("field", "plan field '" + field + "' must be an array of numbers, found " + describe(v));
  std::vector<double> out;
  out.reserve(v.array.size());
  for (size_t i = 0; i < v.array.size(); ++i) {
    if (!is_number(v.array[i]))
      throw PlanError("field", field + "[" + std::to_string(i) + "] must be a number, found " +
                                   describe(v.array[i]));
    out.push_back(v.array[i].number);
  }
  return out;
}

const Value& required(const Value& doc, const std::string& key) {
  const Value* v = doc.find(key);
  if (v == nullptr) throw PlanError("field", "plan field '" + key + "' is missing");
  return *v;
}

[[noreturn]] void program_error(const std::string& message) {
  throw PlanError("program", "plan program: " + message);
}

const Value& program_field(const Value& prog, const std::string& key) {
  const Value* v = prog.find(key);
  if (v == nullptr) program_error("field '" + key + "' is missing");
  return *v;
}

int64_t program_int(const Value& v, const std::string& what) {
  if (!is_number(v) || !v.is_integer) program_error(what + " must be an integer, found " + describe(v));
  if (std::fabs(v.number) > 2147483647.0) {  // table entries are int32; a larger cast is undefined
    std::ostringstream s;
    s.precision(0);
    s << std::fixed << v.number;
    program_error(what + " is out of range, found " + s.str());
  }
  return static_cast<int64_t>(v.number);
}

double program_number(const Value& v, const std::string& what) {
  if (!is_number(v)) program_error(what + " must be a number, found " + describe(v));
  if (!std::isfinite(v.number)) program_error(what + " is not finite (" + nonfinite_name(v.number) + ")");
  return v.number;
}

// A nested array of the given shape, flattened row-major; leaves read with `leaf`.
template <typename T, typename Leaf>
std::vector<T> program_array(const Value& v, const std::string& name, const std::vector<size_t>& shape, Leaf leaf) {
  std::vector<T> out;
  auto walk = [&](auto&& self, const Value& node, size_t depth, const std::string& where) -> void {
    if (depth == shape.size()) {
      out.push_back(static_cast<T>(leaf(node, where)));
      return;
    }
    if (node.kind != Value::Kind::Array || node.array.size() != shape[depth])
      program_error(where + " must be an array of " + std::to_string(shape[depth]) + " entries, found " +
                    (node.kind == Value::Kind::Array ? std::to_string(node.array.size()) + " entries" : describe(node)));
    for (size_t i = 0; i < node.array.size(); ++i)
      self(self, node.array[i], depth + 1, where + "[" + std::to_string(i) + "]");
  };
  walk(walk, v, 0, name);
  return out;
}

std::shared_ptr<const Program> parse_program(const Value& prog, size_t n) {
  if (prog.kind != Value::Kind::Object) program_error("'program' must be an object, found " + describe(prog));
  auto p = std::make_shared<Program>();
  p->origin = "file";
  p->num_rows = program_int(program_field(prog, "num_rows"), "num_rows");
  p->width = program_int(program_field(prog, "width"), "width");
  if (p->num_rows < 1 || p->width < 1 || p->width > 4096)
    program_error("num_rows and width must be in 1..4096, found " + std::to_string(p->num_rows) + " and " +
                  std::to_string(p->width));
  p->init_row = program_int(program_field(prog, "init_row"), "init_row");
  p->init_coef = program_number(program_field(prog, "init_coef"), "init_coef");
  p->result_row = program_int(program_field(prog, "result_row"), "result_row");
  const size_t w = static_cast<size_t>(p->width);
  auto as_int = [](const Value& v, const std::string& where) { return program_int(v, where); };
  auto as_num = [](const Value& v, const std::string& where) { return program_number(v, where); };
  p->x_row = program_array<int32_t>(program_field(prog, "x_row"), "x_row", {n}, as_int);
  p->dst = program_array<int32_t>(program_field(prog, "dst"), "dst", {n, 2}, as_int);
  p->src = program_array<int32_t>(program_field(prog, "src"), "src", {n, 2, w}, as_int);
  p->coef = program_array<double>(program_field(prog, "coef"), "coef", {n, 2, w}, as_num);
  p->gcoef = program_array<double>(program_field(prog, "gcoef"), "gcoef", {n, 2}, as_num);
  return p;
}

}  // namespace

void StepPlan::validate() const {
  const size_t n = times.size();
  if (n == 0) throw PlanError("shape", "plan has no model calls: 'times' is empty");
  const size_t d = n + 1;
  if (coef.size() != d * d)
    throw PlanError("shape", "plan coef has " + std::to_string(coef.size()) + " entries, expected " +
                                 std::to_string(d * d) + " = (times + 1)^2");
  for (size_t k = 0; k < n; ++k)
    if (!std::isfinite(times[k]))
      throw PlanError("nonfinite", "times[" + std::to_string(k) + "] is not finite (" +
                                       nonfinite_name(times[k]) + ")");
  for (size_t i = 0; i < d; ++i)
    for (size_t j = 0; j < d; ++j)
      if (!std::isfinite(at(i, j)))
        throw PlanError("nonfinite", "coef[" + std::to_string(i) + "][" + std::to_string(j) +
                                         "] is not finite (" + nonfinite_name(at(i, j)) + ")");
  for (size_t i = 0; i < d; ++i)
    for (size_t j = i + 1; j < d; ++j)
      if (at(i, j) != 0.0)
        throw PlanError("triangular",
                        "coef is not lower-triangular: coef[" + std::to_string(i) + "][" +
                            std::to_string(j) +
                            "] is nonzero above the diagonal (row k may only use x_T and the "
                            "outputs of calls before k)");
  if (at(0, 0) == 0.0)
    throw PlanError("first_row", "coef[0][0] is 0: the first model input must depend on x_T");
  if (prediction_type != "epsilon" && prediction_type != "v_prediction" && prediction_type != "sample")
    throw PlanError("prediction_type", "unknown prediction_type '" + prediction_type +
                                           "': expected one of epsilon, v_prediction, sample");
  if (num_train_timesteps > 0) {
    const double t_max = static_cast<double>(num_train_timesteps - 1);
    for (size_t k = 0; k < n; ++k)
      if (times[k] < 0.0 || times[k] > t_max)
        throw PlanError("time_range", "times[" + std::to_string(k) +
                                          "] is outside the schedule's time range [0, " +
                                          std::to_string(num_train_timesteps - 1) + "]");
  }
}

constexpr size_t kMaxPlanBytes = size_t(64) << 20;  // a 1000-call plan is about 20 MB

StepPlan parse_plan(const std::string& text) {
  if (text.size() > kMaxPlanBytes)
    throw PlanError("size", "plan file is " + std::to_string(text.size()) +
                                " bytes; this fastdiff reads plans of at most 67108864 bytes (64 MiB)");
  Value doc;
  try {
    doc = json::parse(text);
  } catch (const json::ParseError& e) {
    throw PlanError("json", std::string("plan file is not valid JSON: ") + e.what());
  }
  if (doc.kind != Value::Kind::Object)
    throw PlanError("format", "plan file must hold a JSON object, found " + describe(doc));

  const Value* format = doc.find("format");
  if (format == nullptr)
    throw PlanError("format", "not a fastdiff StepPlan file: it has no 'format' field (expected 'fastdiff.stepplan')");
  if (format->kind != Value::Kind::String || format->string != kPlanFormat)
    throw PlanError("format", "not a fastdiff StepPlan file: 'format' is " + describe(*format) +
                                  ", expected 'fastdiff.stepplan'");

  const Value* version = doc.find("version");
  if (version == nullptr)
    throw PlanError("version", "plan file has no 'version' field (this fastdiff reads version 1)");
  if (!is_number(*version) || !version->is_integer)
    throw PlanError("version", "plan 'version' must be an integer, found " + describe(*version));
  if (version->number == 2)
    throw PlanError("version",
                    "plan version 2 is a stochastic plan (it adds fresh noise): the C++ runtime runs deterministic "
                    "plans (version 1) only; sample it in Python with loop 'reference'");
  if (version->number != kPlanVersion) {
    std::ostringstream v;
    v.precision(0);
    v << std::fixed << version->number;
    throw PlanError("version", "unknown plan version " + v.str() +
                                   ": this fastdiff reads version 1 (deterministic plans) and version 2 (stochastic "
                                   "plans, Python only)");
  }

  StepPlan plan;
  const Value& pred = required(doc, "prediction_type");
  if (pred.kind != Value::Kind::String)
    throw PlanError("field", "plan field 'prediction_type' must be a string, found " + describe(pred));
  plan.prediction_type = pred.string;

  plan.times = number_array(required(doc, "times"), "times");

  const Value& coef = required(doc, "coef");
  if (coef.kind != Value::Kind::Array)
    throw PlanError("field", "plan field 'coef' must be an array of rows, found " + describe(coef));
  for (size_t i = 0; i < coef.array.size(); ++i) {
    const Value& row = coef.array[i];
    if (row.kind != Value::Kind::Array)
      throw PlanError("field", "coef row " + std::to_string(i) + " must be an array of numbers, found " + describe(row));
    for (size_t j = 0; j < row.array.size(); ++j)
      if (!is_number(row.array[j]))
        throw PlanError("field", "coef[" + std::to_string(i) + "][" + std::to_string(j) +
                                     "] must be a number, found " + describe(row.array[j]));
  }

  if (const Value* schedule = doc.find("schedule"); schedule != nullptr && schedule->kind != Value::Kind::Null) {
    if (schedule->kind != Value::Kind::Object)
      throw PlanError("field", "plan field 'schedule' must be an object or null, found " + describe(*schedule));
    if (const Value* fp = schedule->find("fingerprint"); fp != nullptr && fp->kind != Value::Kind::Null) {
      if (fp->kind != Value::Kind::String)
        throw PlanError("field", "schedule 'fingerprint' must be a string or null, found " + describe(*fp));
      plan.schedule_fingerprint = fp->string;
    }
    if (const Value* nt = schedule->find("num_train_timesteps"); nt != nullptr && nt->kind != Value::Kind::Null) {
      if (!is_number(*nt) || !nt->is_integer || nt->number < 1)
        throw PlanError("field", "schedule 'num_train_timesteps' must be a positive integer or null, found " + describe(*nt));
      plan.num_train_timesteps = static_cast<int64_t>(nt->number);
    }
  }
  if (const Value* meta = doc.find("metadata"); meta != nullptr && meta->kind != Value::Kind::Object)
    throw PlanError("field", "plan field 'metadata' must be an object, found " + describe(*meta));

  const size_t n = plan.times.size();
  if (n == 0) throw PlanError("shape", "plan has no model calls: 'times' is empty");
  if (coef.array.size() != n + 1)
    throw PlanError("shape", "plan has " + std::to_string(coef.array.size()) + " coef rows but " +
                                 std::to_string(n) + " times (expected " + std::to_string(n + 1) +
                                 " = times + 1)");
  plan.coef.reserve((n + 1) * (n + 1));
  for (size_t i = 0; i <= n; ++i) {
    const Value& row = coef.array[i];
    if (row.array.size() != n + 1)
      throw PlanError("shape", "coef row " + std::to_string(i) + " has " + std::to_string(row.array.size()) +
                                   " entries, expected " + std::to_string(n + 1));
    for (const Value& x : row.array) plan.coef.push_back(x.number);
  }
  plan.validate();
  if (const Value* prog = doc.find("program"); prog != nullptr && prog->kind != Value::Kind::Null) {
    plan.program = parse_program(*prog, n);
    check_program(*plan.program, plan);
  }
  return plan;
}

StepPlan load_plan(const std::string& path) {
  std::string text;
  if (!read_file(path, text)) throw PlanError("io", "cannot open plan file '" + path + "'");
  return parse_plan(text);
}

}  // namespace fastdiff
