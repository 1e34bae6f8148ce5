"""Stochastic plans (DESIGN §1: fresh-noise columns): the StepPlan's noise, its file (version 2),
the Program that adds noise[k]·ε_k after call k, and the reference loop running it, held against
the canonical form evaluated directly; bad noise and readers that cannot run it are refused."""

import json

import numpy as np
import pytest
import torch

from fastdiff.loops import reference
from fastdiff.plan import STOCHASTIC_PLAN_VERSION, PlanError, StepPlan
from fastdiff.program import ProgramError, dumps, load
from fastdiff.program import compile as compile_program
from fastdiff.solvers.common import SolverError, Trace

COEF = np.array([[1.0, 0, 0], [0.9, -0.1, 0], [0.5, 0.25, -0.25]])


def toy(sd_schedule, calls=3):
    """An ancestral-style toy: x ← a·x + b·out + s·ε after every call (ε also after the last)."""
    trace = Trace(calls, stochastic=True)
    x = trace.x_T()
    for k in range(calls):
        out = trace.call(x, 900.0 - 300 * k)
        x = (0.9 - 0.1 * k) * x - (0.2 + 0.05 * k) * out + (0.3 - 0.1 * k) * trace.noise()
    return trace.finish(x, sd_schedule, solver="toy", steps=calls, options={}, out_sigma=0.0, diffusers_class="none")


def test_trace_keeps_noise_columns(sd_schedule):
    plan = toy(sd_schedule)
    assert plan.stochastic and plan.noise.shape == (4, 3)
    assert plan.noise[1, 0] == pytest.approx(0.3) and plan.noise[2, 0] == pytest.approx(0.3 * 0.8)
    assert np.all(np.triu(plan.noise) == 0)
    trace = Trace(2)
    trace.call(trace.x_T(), 500.0)
    with pytest.raises(SolverError, match="deterministic"):
        trace.noise()
    trace = Trace(2, stochastic=True)
    with pytest.raises(SolverError, match="once after a model call"):
        trace.noise()
    trace.call(trace.x_T(), 500.0)
    trace.noise()
    with pytest.raises(SolverError, match="once after a model call"):
        trace.noise()


def test_file_is_version_2_and_round_trips(sd_schedule, tmp_path):
    plan = toy(sd_schedule)
    path = plan.save(tmp_path / "s.json")
    doc = json.loads(path.read_text())
    assert doc["version"] == STOCHASTIC_PLAN_VERSION and len(doc["noise"]) == 4
    loaded = StepPlan.load(path)
    assert loaded == plan and loaded.hash() == plan.hash() and np.array_equal(loaded.noise, plan.noise)
    deterministic = StepPlan(
        plan.times, plan.coef, plan.prediction_type, schedule_fingerprint=plan.schedule_fingerprint
    )
    assert deterministic != plan and deterministic.hash() != plan.hash()
    assert np.array_equal(plan.with_metadata(a=1).noise, plan.noise)
    program = compile_program(plan)
    (tmp_path / "p.json").write_text(dumps(program))
    again = load(tmp_path / "p.json")
    assert np.array_equal(again.noise, program.noise) and again.max_error < 1e-12
    doc = json.loads((tmp_path / "p.json").read_text())
    doc["program"]["noise"][1] *= 2  # a corrupt cache: the re-expansion finds it
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(ProgramError, match="differs from coef row 2"):
        load(tmp_path / "bad.json")
    del doc["program"]["noise"]
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(ProgramError, match="one is stochastic"):
        load(tmp_path / "bad.json")


@pytest.mark.parametrize(
    "noise, code, match",
    [
        (np.zeros((3, 3)), "shape", r"noise has shape \(3, 3\), expected \(3, 2\)"),
        ([[0, 0], [np.nan, 0], [0, 0]], "nonfinite", r"noise\[1\]\[0\] is not finite \(nan\)"),
        ([[0, 0], [0.1, 0.2], [0, 0]], "triangular", r"noise\[1\]\[1\] is nonzero: the noise drawn after call 1"),
        (np.zeros((3, 2)), "field", "all zeros"),
    ],
)
def test_bad_noise_is_refused(noise, code, match):
    with pytest.raises(PlanError, match=match) as info:
        StepPlan([700.0, 300.0], COEF, "epsilon", noise=noise)
    assert info.value.code == code


def test_file_version_and_noise_field_must_agree(sd_schedule):
    doc = toy(sd_schedule).to_dict()
    with pytest.raises(PlanError, match="a version 1 plan cannot have a 'noise' field"):
        StepPlan.from_dict({**doc, "version": 1})
    with pytest.raises(PlanError, match="a version 2 plan must have a 'noise' field"):
        StepPlan.from_dict({k: v for k, v in doc.items() if k != "noise"})
    with pytest.raises(PlanError, match=r"noise\[2\]\[1\] must be a number, found 'x'"):
        StepPlan.from_dict({**doc, "noise": [row if i != 2 else [0.1, "x", 0] for i, row in enumerate(doc["noise"])]})
    with pytest.raises(PlanError, match="unknown plan version 3") as info:
        StepPlan.from_dict({**doc, "version": 3})
    assert info.value.code == "version"


def test_noise_that_skips_the_next_input_cannot_be_compiled():
    plan = StepPlan([700.0, 300.0], COEF, "epsilon", noise=[[0, 0], [0, 0], [0.1, 0]])
    with pytest.raises(ProgramError, match=r"noise drawn after call 0 first enters row 2"):
        compile_program(plan)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch", [1, 3])
def test_reference_loop_adds_the_noise_of_the_canonical_form(sd_schedule, dtype, batch):
    plan = toy(sd_schedule, calls=4)
    program = compile_program(plan)
    g = torch.Generator().manual_seed(batch)
    x_T = torch.randn(batch, 2, 5, 3, generator=g, dtype=torch.float64)
    eps = [torch.randn(batch, 2, 5, 3, generator=g, dtype=torch.float64) for _ in range(4)]

    def raw_fn(x, t, index):
        return torch.tanh(x) * (t.view(-1, 1, 1, 1) / 1000) + 0.1

    asked = []

    def noise(k, x):
        asked.append(k)
        return eps[k].to(x.dtype)

    got = reference.run(program, raw_fn, x_T.to(dtype), noise=noise, impl="torch").latents
    # the canonical form, evaluated directly in float64: x^(k) = Σ coef[k, j]·b_j + Σ noise[k, m]·ε_m
    basis = [x_T]
    for k in range(5):
        x = sum(plan.coef[k, j] * basis[j] for j in range(k + 1)) + sum(plan.noise[k, m] * eps[m] for m in range(k))
        if k < 4:
            basis.append(raw_fn(x, torch.full((batch,), plan.times[k]), None))
    assert asked == [0, 1, 2, 3]
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got.double(), x, rtol=tol, atol=tol)


def test_loops_that_cannot_run_noise_refuse_it(sd_schedule):
    from fastdiff.gate import GateSpec
    from fastdiff.loops import cpp

    program = compile_program(toy(sd_schedule))
    x_T = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="skip gate cannot run a stochastic plan"):
        reference.run(program, lambda x, t, i: x, x_T, gate=GateSpec())
    with pytest.raises(ValueError, match=r"noise\(0, x\) returned \(2, 2\)"):
        reference.run(program, lambda x, t, i: x, x_T, noise=lambda k, x: torch.zeros(2, 2))
    with pytest.raises(ValueError, match="loop 'cpp' runs deterministic plans only"):
        cpp.run(program, lambda x, t, i: x, x_T)


def test_cpp_reader_names_stochastic_plans(sd_schedule):
    try:
        from fastdiff import _C
    except ImportError as exc:
        pytest.skip(f"C++ extension fastdiff._C not built: {exc}")
    with pytest.raises(PlanError, match="plan version 2 is a stochastic plan") as info:
        _C.parse_plan(toy(sd_schedule).dumps())
    assert info.value.code == "version"
