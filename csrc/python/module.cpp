// pybind11 binding fastdiff._C: the only file that knows about Python. It exposes the C++ plan
// reader and the CPU reference lincomb over NumPy arrays (no torch dependency at build time).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "fastdiff/lincomb.h"
#include "fastdiff/plan.h"

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

template <typename T>
void lincomb_typed(py::array dst_any, const std::vector<py::array>& srcs_any, const std::vector<double>& coefs) {
  auto dst = py::array_t<T, py::array::c_style>::ensure(dst_any);
  if (!dst || !dst_any.writeable() || !(dst_any.flags() & py::array::c_style))
    throw py::value_error("lincomb: dst must be a writeable C-contiguous array");
  std::vector<py::array_t<T, py::array::c_style>> keep;
  std::vector<const T*> ptrs;
  for (size_t j = 0; j < srcs_any.size(); ++j) {
    const py::array& s = srcs_any[j];
    if (s.dtype().not_equal(dst_any.dtype()))
      throw py::value_error("lincomb: srcs[" + std::to_string(j) + "] has dtype " +
                            std::string(py::str(s.dtype())) + " but dst has " + std::string(py::str(dst_any.dtype())));
    if (s.size() != dst_any.size())
      throw py::value_error("lincomb: srcs[" + std::to_string(j) + "] has " + std::to_string(s.size()) +
                            " elements but dst has " + std::to_string(dst_any.size()));
    if (!(s.flags() & py::array::c_style))
      throw py::value_error("lincomb: srcs[" + std::to_string(j) + "] must be C-contiguous");
    keep.push_back(py::array_t<T, py::array::c_style>::ensure(s));
    ptrs.push_back(keep.back().data());
  }
  T* out = dst.mutable_data();
  py::gil_scoped_release release;
  fastdiff::lincomb<T>(out, ptrs.data(), coefs.data(), coefs.size(), static_cast<size_t>(dst_any.size()));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastdiff C++ core: StepPlan file reader/validator and the CPU reference lincomb";

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
  m.def(
      "lincomb",
      [](py::array dst, const std::vector<py::array>& srcs, const std::vector<double>& coefs) {
        if (srcs.size() != coefs.size())
          throw py::value_error("lincomb: " + std::to_string(srcs.size()) + " srcs but " +
                                std::to_string(coefs.size()) + " coefs");
        if (dst.dtype().equal(py::dtype::of<float>())) return lincomb_typed<float>(dst, srcs, coefs);
        if (dst.dtype().equal(py::dtype::of<double>())) return lincomb_typed<double>(dst, srcs, coefs);
        throw py::value_error("lincomb: dtype " + std::string(py::str(dst.dtype())) +
                              " is not supported by the CPU reference (float32, float64)");
      },
      py::arg("dst"), py::arg("srcs"), py::arg("coefs"),
      "dst[i] = sum_j coefs[j] * srcs[j][i], accumulated in double; dst may be one of srcs.");

  m.attr("PLAN_VERSION") = fastdiff::kPlanVersion;
  m.attr("PLAN_FORMAT") = fastdiff::kPlanFormat;
#ifdef FASTDIFF_COMPILER
  m.attr("COMPILER") = FASTDIFF_COMPILER;
#endif
}
