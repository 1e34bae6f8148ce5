"""Guided distillation quality (issue 21): digits students against the classifier-free-guided
teacher, at equal UNet evaluations.

Rows (one per method, guidance weight w and UNet evaluations per image):
- teacher: CFG DDIM at 64 steps (128 evaluations: the reference the students aim at), and the
  training-free plans with CFG at 2 evaluations per step: DPM-Solver++(2M), the shipped OLSS
  plans (1- and 2-step OLSS plans are calibrated here with the shipped plans' command, as none
  ships) and the shipped USF plans;
- students: the stage-1 (guided) student with DDIM at 64 steps (64 evaluations) and the
  progressive students at their own steps (16, 8, 4, 2, 1 evaluations), deterministic, and with
  the paper's stochastic sampler on twice their steps (32, 16, 8, 4, 2 evaluations: a DDIM step
  of twice the length, then one back with fresh noise).
Each row: the digits classifier's accuracy and the feature Fréchet distance (FD) to the real
digits over 1000 samples (100 per class, held-out noise seed 11), and the wall time per image.

The students come from $FASTDIFF_STUDENTS (a directory with guided/ and steps-M/ student
directories, as `fastdiff distill` writes them), else engines/digits/students; without them the
cases skip, naming the commands that make them. bench/report.py renders
bench/results/distill_quality.{md,png} (the frontier: FD vs UNet evaluations).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

WEIGHTS = (1.5, 2.0, 3.0)
SAMPLES_PER_CLASS = 100
SEED = 11
TEACHER_STEPS = 64
STUDENT_STEPS = (16, 8, 4, 2, 1)
CFG_EVALS = (2, 4, 8, 16)  # training-free plans with guidance: 2 UNet evaluations per step
USF_SHIPPED = (4, 8)  # the digits USF plans (engines/digits/plans/usf-N.json) at those evaluations


def _students() -> Path:
    from fastdiff.models.loading import engines_dir

    return Path(os.environ.get("FASTDIFF_STUDENTS") or engines_dir() / "digits" / "students")


_engines: dict = {}


def _engine(weights=None):
    import fastdiff

    key = str(weights)
    if key not in _engines:
        _engines[key] = fastdiff.build_engine("digits", device="cpu", dtype="float32", weights=weights)
    return _engines[key]


def _olss_plan(engine, steps: int):
    """The shipped OLSS plan for `steps`, else one calibrated like the shipped ones (cached here)."""
    if steps in engine.shipped_plans("olss"):
        return engine.plan_for("olss", steps)
    from fastdiff.calibration import olss
    from fastdiff.models.registry import calibration_prompts

    key = ("olss", steps)
    if key not in _engines:
        prompts = calibration_prompts("digits", 128, seed=0)
        _engines[key] = olss.calibrate(engine, prompts, steps, teacher="ddim:100", path="searched", progress=False)
    return _engines[key]


def _cases():
    cases = [("teacher", "ddim", TEACHER_STEPS * 2)]
    cases += [("teacher", solver, evals) for solver in ("dpmpp_2m", "olss") for evals in CFG_EVALS]
    cases += [("teacher", "usf", evals) for evals in CFG_EVALS if evals // 2 in USF_SHIPPED]
    cases += [("guided", "ddim", TEACHER_STEPS)]
    cases += [(f"steps-{m}", "distilled", m) for m in STUDENT_STEPS]
    cases += [(f"steps-{m}", "distilled_stochastic", 2 * m) for m in STUDENT_STEPS]
    return [(who, solver, evals, w) for who, solver, evals in cases for w in WEIGHTS]


@pytest.mark.parametrize("who, solver, evals, w", _cases(), ids=lambda v: str(v))
def test_distill_quality(benchmark, who, solver, evals, w):
    pytest.importorskip("sklearn")
    pytest.importorskip("scipy")
    from fastdiff.testing import digits_accuracy, digits_fd

    if who == "teacher":
        engine = _engine()
        steps = evals // 2
        plan = _olss_plan(engine, steps) if solver == "olss" else engine.plan_for(solver, steps)
    else:
        directory = _students() / who
        if not (directory / "unet" / "config.json").is_file():
            pytest.skip(
                f"no digits student {directory}: make it with `fastdiff distill --model digits --stage guided --out "
                f"{_students() / 'guided'}` and `... --stage progressive --weights {_students() / 'guided'} --out "
                f"{_students()}`"
            )
        engine = _engine(directory)
        plan = engine.plan_for(solver, evals)
    labels = [d for d in range(10) for _ in range(SAMPLES_PER_CLASS)]
    holder = {}

    def run():
        start = time.perf_counter()
        holder["out"] = engine.sample([str(d) for d in labels], plan=plan, guidance_scale=w, seed=SEED)
        holder["seconds"] = time.perf_counter() - start

    benchmark.group = "distill-quality"
    benchmark.pedantic(run, rounds=1, iterations=1)
    out = holder["out"]
    assert out.unet_calls == plan.num_calls
    benchmark.extra_info.update(
        {
            "method": f"teacher+{solver}" if who == "teacher" else who + (" stochastic" if plan.stochastic else ""),
            "solver": solver,
            "w": w,
            "unet_evaluations": evals,
            "steps": plan.num_calls,
            "accuracy": digits_accuracy(out.images, labels),
            "fd": digits_fd(out.images),
            "seconds_per_image": holder["seconds"] / len(labels),
            "samples": len(labels),
        }
    )
