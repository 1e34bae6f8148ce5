// Reads tests/data/plans/cases.json: every "good" file must load, every "bad" file must be
// rejected with the PlanError code the manifest names (the Python reader is held to the same
// manifest by tests/test_plan_files.py).
#include <cmath>
#include <fstream>
#include <sstream>
#include <string>

#include "check.h"
#include "fastdiff/plan.h"
#include "json.h"

namespace {

std::string read(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

void check_known_plan(const std::string& dir) {
  // minimal.json: two calls, hand-written values
  fastdiff::StepPlan p = fastdiff::load_plan(dir + "/good/minimal.json");
  CHECK(p.num_calls() == 2, "num_calls %zu", p.num_calls());
  CHECK(p.times[0] == 500.0 && p.times[1] == 250.0, "times %g %g", p.times[0], p.times[1]);
  CHECK(p.at(1, 1) == -0.1 && p.at(2, 2) == -0.25, "coef %g %g", p.at(1, 1), p.at(2, 2));
  CHECK(p.prediction_type == "epsilon", "prediction_type %s", p.prediction_type.c_str());
  CHECK(p.num_train_timesteps == 0 && p.schedule_fingerprint.empty(), "schedule should be unknown");
}

void check_io_error() {
  try {
    fastdiff::load_plan("/nonexistent/plan.json");
    CHECK(false, "missing file was accepted");
  } catch (const fastdiff::PlanError& e) {
    CHECK(e.code() == "io", "code %s", e.code().c_str());
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: test_plan <tests/data/plans>\n");
    return 2;
  }
  const std::string dir = argv[1];
  fastdiff::json::Value manifest = fastdiff::json::parse(read(dir + "/cases.json"));
  for (const auto& good : manifest.find("good")->array) {
    try {
      fastdiff::StepPlan plan = fastdiff::load_plan(dir + "/good/" + good.string);
      CHECK(plan.dim() * plan.dim() == plan.coef.size(), "%s: coef size", good.string.c_str());
    } catch (const fastdiff::PlanError& e) {
      CHECK(false, "%s rejected: [%s] %s", good.string.c_str(), e.code().c_str(), e.what());
    }
  }
  int bad_count = 0;
  for (const auto& [name, code] : manifest.find("bad")->object) {
    ++bad_count;
    try {
      fastdiff::load_plan(dir + "/bad/" + name);
      CHECK(false, "%s was accepted, expected PlanError %s", name.c_str(), code.string.c_str());
    } catch (const fastdiff::PlanError& e) {
      CHECK(e.code() == code.string, "%s: code %s, expected %s (%s)", name.c_str(), e.code().c_str(),
            code.string.c_str(), e.what());
    }
  }
  CHECK(bad_count >= 20, "only %d bad cases in the manifest", bad_count);
  check_known_plan(dir);
  check_io_error();
  TEST_MAIN_END();
}
