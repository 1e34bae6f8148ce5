// pybind11 binding fastdiff._C: the only file that knows about Python. It exposes the C++ plan
// reader and the CPU sampling loop (fastdiff::Sampler, the loop 'cpp' of fastdiff.loops) over
// NumPy arrays; a Python callable serves as the Denoiser (no torch dependency at build time).
// It checks arguments, dispatches and converts errors; nothing else.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

#include "fastdiff/plan.h"
#include "fastdiff/sampler.h"

namespace py = pybind11;

namespace {

py::dict plan_to_dict(const fastdiff::StepPlan& plan) {
  const size_t d = plan.dim();
  py::array_t<double> times(static_cast<py::ssize_t>(plan.times.size()));
  std::copy(plan.times.begin(), plan.times.end(), times.mutable_data());
  py::array_t<double> coef({static_cast<py::ssize_t>(d), static_cast<py::ssize_t>(d)});
  std::copy(plan.coef.begin(), plan.coef.end(), coef.mutable_data());
  py::dict out;
  out["version"] = plan.version;
  out["prediction_type"] = plan.prediction_type;
  out["times"] = times;
  out["coef"] = coef;
  out["schedule_fingerprint"] =
      plan.schedule_fingerprint.empty() ? py::object(py::none()) : py::object(py::str(plan.schedule_fingerprint));
  out["num_train_timesteps"] =
      plan.num_train_timesteps > 0 ? py::object(py::int_(plan.num_train_timesteps)) : py::object(py::none());
  return out;
}

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

// A Python callable as the Denoiser: fn(x, t, index) -> raw output, x float32 [n, ...] and t
// float32 [n] NumPy arrays viewing the sampler's buffers (valid during the call only), index an
// int64 [n] array of sample positions or None for the whole batch. Any object NumPy can read as
// float32 (a CPU torch tensor, an ndarray) is accepted as the result.
class PyDenoiser : public fastdiff::Denoiser {
 public:
  explicit PyDenoiser(py::function fn) : fn_(std::move(fn)) {}

  void forward(const fastdiff::DenoiserCall& call) override {
    py::gil_scoped_acquire gil;
    std::vector<py::ssize_t> shape{static_cast<py::ssize_t>(call.n)};
    for (int64_t s : *call.sample_shape) shape.push_back(static_cast<py::ssize_t>(s));
    py::capsule owner(call.x, [](void*) {});  // the sampler owns the memory
    py::array_t<float> x(shape, const_cast<float*>(call.x), owner);
    py::array_t<float> t({static_cast<py::ssize_t>(call.n)}, const_cast<float*>(call.t), owner);
    py::object index = py::none();
    if (call.index != nullptr) {
      py::array_t<int64_t> idx(static_cast<py::ssize_t>(call.n));
      std::copy_n(call.index, call.n, idx.mutable_data());
      index = idx;
    }
    py::object result = fn_(x, t, index);
    std::vector<py::ssize_t> expect = shape;
    const int64_t rows = call.guided ? 2 * call.n : call.n;
    expect[0] = static_cast<py::ssize_t>(rows);
    auto arr = FloatArray::ensure(result);
    if (!arr) {
      PyErr_Clear();
      throw py::value_error("returned " + std::string(py::str(py::type::of(result).attr("__name__"))) +
                            ", expected a float32 array or CPU tensor");
    }
    std::vector<py::ssize_t> got(arr.shape(), arr.shape() + arr.ndim());
    if (got != expect) {
      auto fmt = [](const std::vector<py::ssize_t>& v) {
        std::string s = "(";
        for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
        return s + (v.size() == 1 ? ",)" : ")");
      };
      throw py::value_error("returned shape " + fmt(got) + "; expected " + fmt(expect) +
                            (call.guided ? " (the raw output, [uncond; cond] under guidance)" : ""));
    }
    std::copy_n(arr.data(), static_cast<size_t>(arr.size()), call.out);
  }

 private:
  py::function fn_;
};

// GateOptions from fastdiff.gate.GateSpec.to_dict(): exactly its five keys.
fastdiff::GateOptions gate_from_dict(const py::object& gate, const std::string& method) {
  if (!py::isinstance<py::dict>(gate))
    throw py::type_error(method + ": gate must be GateSpec.to_dict() (a dict) or None");
  const auto g = gate.cast<py::dict>();
  const char* keys[] = {"delta", "max_skips", "warmup", "per_sample", "reuse"};
  for (auto item : g) {
    const std::string key = py::str(item.first);
    if (std::find(std::begin(keys), std::end(keys), key) == std::end(keys))
      throw py::value_error(method + ": unknown gate option '" + key + "' (GateSpec.to_dict() has delta, max_skips, "
                            "warmup, per_sample, reuse)");
  }
  for (const char* key : keys)
    if (!g.contains(key)) throw py::value_error(method + ": gate option '" + key + "' is missing (pass GateSpec.to_dict())");
  fastdiff::GateOptions o;
  o.delta = g["delta"].cast<double>();
  o.max_skips = g["max_skips"].cast<int>();
  o.warmup = g["warmup"].cast<int>();
  o.per_sample = g["per_sample"].cast<bool>();
  const std::string reuse = py::str(g["reuse"]);
  if (reuse != "extrapolate" && reuse != "copy")
    throw py::value_error(method + ": gate option reuse must be 'extrapolate' or 'copy', got '" + reuse + "'");
  o.extrapolate = reuse == "extrapolate";
  fastdiff::check_gate(method.c_str(), o);
  return o;
}

// The gate's decisions for a sequence of statistics: stats [K, G] (the statistic after call k
// for each decision group) -> flags [K, G], flags[k] deciding call k + 1 (what the sampler does
// between calls; for holding the rule identical across implementations).
py::array_t<int8_t> gate_decisions(py::array_t<float, py::array::c_style | py::array::forcecast> stats,
                                   const py::object& gate) {
  if (!stats || stats.ndim() != 2) throw py::value_error("gate_decisions: stats must be a float32 array [calls, groups]");
  const fastdiff::GateOptions options = gate_from_dict(gate, "gate_decisions");
  const auto calls = stats.shape(0), groups = stats.shape(1);
  fastdiff::GateState state(options, static_cast<size_t>(groups));
  py::array_t<int8_t> flags({calls, groups});
  for (py::ssize_t k = 0; k < calls; ++k) {
    const std::vector<float> d(stats.data(k, 0), stats.data(k, 0) + groups);
    const std::vector<char> skip = state.observe(d);
    std::copy(skip.begin(), skip.end(), flags.mutable_data(k, 0));
  }
  return flags;
}

// x_T as a float32 C-contiguous array (kept alive by the caller) and the request over it.
fastdiff::SampleRequest request_for(const FloatArray& x_T, const char* method) {
  if (!x_T || x_T.ndim() < 2)
    throw py::value_error(std::string(method) + ": x_T must be a float32 array [batch, ...] with at least 2 dimensions");
  fastdiff::SampleRequest req;
  req.x_T = x_T.data();
  req.batch = x_T.shape(0);
  req.sample_shape.assign(x_T.shape() + 1, x_T.shape() + x_T.ndim());
  return req;
}

// Runs the sampler without the GIL; returns the latents as an array of x_T's shape.
std::pair<py::array_t<float>, fastdiff::SampleResult> sample(const fastdiff::Sampler& sampler, fastdiff::Denoiser& model,
                                                             const fastdiff::SampleRequest& req, const FloatArray& x_T) {
  fastdiff::SampleResult r;
  {
    py::gil_scoped_release release;
    r = sampler.run(model, req);
  }
  py::array_t<float> latents(std::vector<py::ssize_t>(x_T.shape(), x_T.shape() + x_T.ndim()));
  std::copy(r.latents.begin(), r.latents.end(), latents.mutable_data());
  return {latents, std::move(r)};
}

py::dict run_sampler(const fastdiff::Sampler& sampler, py::function fn, py::array x_T_any, py::object guidance,
                     py::object gate, py::object callback) {
  const FloatArray x_T = FloatArray::ensure(x_T_any);
  fastdiff::SampleRequest req = request_for(x_T, "Sampler.run");
  FloatArray w;
  if (!guidance.is_none()) {
    w = FloatArray::ensure(guidance);
    if (!w || w.ndim() != 1 || w.shape(0) != req.batch)
      throw py::value_error("Sampler.run: guidance must be a float32 array of " + std::to_string(req.batch) +
                            " weights (one per sample) or None");
    req.guidance = w.data();
  }
  fastdiff::GateOptions gate_options;
  if (!gate.is_none()) {
    gate_options = gate_from_dict(gate, "Sampler.run");
    req.gate = &gate_options;
  }
  if (!callback.is_none()) {
    py::function cb = callback;
    const std::vector<py::ssize_t> shape(x_T.shape(), x_T.shape() + x_T.ndim());
    req.callback = [cb, shape](int k, const float* x) {
      py::gil_scoped_acquire gil;
      py::capsule owner(x, [](void*) {});
      cb(k, py::array_t<float>(shape, const_cast<float*>(x), owner));
    };
  }
  PyDenoiser model(fn);
  auto [latents, r] = sample(sampler, model, req, x_T);
  py::dict out;
  out["latents"] = latents;
  out["nfe"] = r.nfe;
  out["unet_calls"] = r.unet_calls;
  out["skipped"] = r.skipped;
  return out;
}

// The model returns its input (twice under guidance): a C++ denoiser of negligible cost, so that
// a timed run measures the loop alone (bench/test_runtime_cpu.py).
class IdentityDenoiser : public fastdiff::Denoiser {
 public:
  void forward(const fastdiff::DenoiserCall& call) override {
    int64_t m = 1;
    for (int64_t s : *call.sample_shape) m *= s;
    const size_t n = static_cast<size_t>(call.n * m);
    std::copy_n(call.x, n, call.out);
    if (call.guided) std::copy_n(call.x, n, call.out + n);
  }
};

py::array run_identity(const fastdiff::Sampler& sampler, py::array x_T_any, py::object guidance) {
  const FloatArray x_T = FloatArray::ensure(x_T_any);
  fastdiff::SampleRequest req = request_for(x_T, "Sampler.run_identity");
  std::vector<float> w;
  if (!guidance.is_none()) {
    w.assign(static_cast<size_t>(req.batch), guidance.cast<float>());
    req.guidance = w.data();
  }
  IdentityDenoiser model;
  return sample(sampler, model, req, x_T).first;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastdiff C++ core: the StepPlan file reader/validator and the CPU sampling loop";

  // C++ PlanError surfaces as fastdiff.plan.PlanError with the same code and message.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const fastdiff::PlanError& e) {
      py::object cls = py::module_::import("fastdiff.plan").attr("PlanError");
      py::object err = cls(e.what(), py::arg("code") = e.code());
      PyErr_SetObject(cls.ptr(), err.ptr());
    }
  });

  m.def("parse_plan", [](const std::string& text) { return plan_to_dict(fastdiff::parse_plan(text)); },
        py::arg("text"), "Parse and validate StepPlan JSON text; returns a dict. Raises PlanError.");
  m.def("load_plan", [](const std::string& path) { return plan_to_dict(fastdiff::load_plan(path)); },
        py::arg("path"), "Read, parse and validate a StepPlan file; returns a dict. Raises PlanError.");
  py::register_exception<fastdiff::SamplerError>(m, "SamplerError", PyExc_RuntimeError);

  py::class_<fastdiff::Sampler>(m, "Sampler",
                                "The C++ sampling loop over a StepPlan (CPU, float32). Sampler(plan_json_text).")
      .def(py::init([](const std::string& text) { return fastdiff::Sampler(fastdiff::parse_plan(text)); }),
           py::arg("plan_json"))
      .def_property_readonly("program_origin", [](const fastdiff::Sampler& s) { return s.program().origin; },
                             "'file' (the plan file's compiled program) or 'dense' (built by the C++ runtime)")
      .def_property_readonly("num_rows", [](const fastdiff::Sampler& s) { return s.program().num_rows; },
                             "latents the program keeps")
      .def_property_readonly("num_calls", [](const fastdiff::Sampler& s) { return s.plan().num_calls(); })
      .def("run", &run_sampler, py::arg("fn"), py::arg("x_T"), py::arg("guidance") = py::none(),
           py::arg("gate") = py::none(), py::arg("callback") = py::none(),
           "Sample: fn(x, t, index) -> raw output ([uncond; cond] with guidance). Returns a dict with "
           "latents, nfe, unet_calls, skipped. gate: fastdiff.gate.GateSpec.to_dict() or None.")
      .def("run_identity", &run_identity, py::arg("x_T"), py::arg("guidance") = py::none(),
           "Sample with a C++ model that returns its input (a float guidance scale or None): the loop's own "
           "cost, with no Python in it. Returns the latents.");

  m.def("gate_decisions", &gate_decisions, py::arg("stats"), py::arg("gate"),
        "The C++ gate's skip flags int8 [K, G] for statistics float32 [K, G] (row k: after call k, deciding "
        "call k + 1); gate: GateSpec.to_dict().");

  m.attr("PLAN_VERSION") = fastdiff::kPlanVersion;
  m.attr("PLAN_FORMAT") = fastdiff::kPlanFormat;
#ifdef FASTDIFF_COMPILER
  m.attr("COMPILER") = FASTDIFF_COMPILER;
#endif
}
