"""OLSS quality: error vs a reference on samples held out from calibration, for OLSS (planned and
uniform path, open and closed loop) and DDIM, DPM-Solver++(2M), UniPC, DEIS at N = 3..10 and 20.

- gmm: the exact 64-d Gaussian mixture; reference = the exact ODE solution; teacher DDIM-1000.
- tiny-shapes, digits (skipped when not shipped): reference = a 1000-step run from the same x_T;
  teacher DDIM-100 on 64 calibration prompts (seed 0); 32 held-out prompts and noise (seed 1);
  olss_shipped is the model's shipped plan (engines/<model>/plans, 256 calibration prompts).

The error (extra_info rel_error) is what the suite is for; the timed part is sampling the
held-out set with the plan. bench/report.py renders bench/results/olss_quality.{md,png}.
"""

import pytest

from fastdiff.testing import olss_quality as oq

LABELS = ("teacher", *oq.BASELINES, *oq.OLSS_VARIANTS, "olss_shipped")
_study = oq.cached_study


@pytest.mark.parametrize("steps", oq.STEPS, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("label", LABELS)
@pytest.mark.parametrize("study", ["gmm", "tiny-shapes", "digits"])
def test_olss_quality(benchmark, cpu_engine, study, label, steps):
    if label == "teacher" and steps != oq.STEPS[0]:
        pytest.skip("the teacher has one row (its own step count)")
    s = _study(study, cpu_engine)
    if label == "olss_shipped" and (s.engine is None or steps not in s.engine.shipped_plans("olss")):
        pytest.skip(f"{study} ships no OLSS plan for {steps} steps")
    row, plan = s.measure(label, steps)
    benchmark.group = f"olss-quality-{study}"
    benchmark.extra_info.update(row)
    benchmark.pedantic(s.run, args=(plan,), rounds=1, iterations=1)
