"""The C++ sampling loop (fastdiff._C.Sampler via fastdiff.runtime) against the Python executor:
same latents given the same model, same gate decisions, the plan's program carried over, and
clear errors for corrupt programs, bad model outputs and bad arguments."""

import threading

import numpy as np
import pytest
import torch

from fastdiff import solvers
from fastdiff.executor import ModelOutputError, run_fused
from fastdiff.gate import AdaptiveGate
from fastdiff.plan import PlanError
from fastdiff.runtime import run_fused_cpp, sampler_for, why_unavailable
from tests.conftest import odd_latents

pytestmark = pytest.mark.skipif(why_unavailable() is not None, reason=f"C++ runtime: {why_unavailable()}")

W = torch.randn(3, 3, generator=torch.Generator().manual_seed(5)) * 0.4


def linear_raw(x, t, index, guided=True):
    """A linear model with channel mixing and a time dependence; [uncond; cond] when guided."""
    y = torch.einsum("ij,bjhw->bihw", W, x) * (t[:, None, None, None] / 1000) + 0.05 * torch.tanh(x)
    return torch.cat([y, 0.8 * y + 0.02]) if guided else y


def rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("name,steps", [("ddim", 5), ("dpmpp_2m", 8), ("unipc", 7), ("euler", 6), ("deis", 9)])
@pytest.mark.parametrize("guided", [True, False])
def test_matches_the_python_executor(sd_schedule, name, steps, guided):
    plan = solvers.build_variant(name, sd_schedule, steps)
    x_T = odd_latents(batch=3)
    w = torch.tensor([1.5, 3.0, 7.5]) if guided else None

    def raw(x, t, index):
        return linear_raw(x, t, index, guided)

    ref = run_fused(plan, raw, x_T, guidance=w, impl="torch")
    got = run_fused_cpp(plan, raw, x_T, guidance=w)
    assert rel(got.latents, ref.latents) <= 1e-6
    assert got.nfe == ref.nfe == [steps] * 3 and got.unet_calls == ref.unet_calls == steps
    assert sampler_for(plan).program_origin == "file"
    assert sampler_for(plan).num_rows == plan.step_tables().num_rows


@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("delta", [0.05, 0.5])
def test_gate_decisions_match(sd_schedule, per_sample, delta):
    plan = solvers.build_variant("dpmpp_2m", sd_schedule, 16)
    x_T = odd_latents(batch=3, seed=4)
    x_T[1] *= 3.0  # samples with different trajectories decide differently (at delta 0.05)
    w = torch.tensor([2.0, 5.0, 1.5])
    ref = run_fused(plan, linear_raw, x_T, guidance=w, gate=AdaptiveGate(delta=delta, per_sample=per_sample))
    got = run_fused_cpp(plan, linear_raw, x_T, guidance=w, gate=AdaptiveGate(delta=delta, per_sample=per_sample))
    assert got.skipped == ref.skipped and got.nfe == ref.nfe and got.unet_calls == ref.unet_calls
    assert rel(got.latents, ref.latents) <= 1e-6
    assert sum(len(s) for s in ref.skipped) > 0  # the comparison covered skipped calls
    if per_sample and delta == 0.05:
        assert len({tuple(s) for s in ref.skipped}) > 1  # and compacted batches


def test_compacted_calls_see_the_selected_samples(sd_schedule):
    plan = solvers.build_variant("dpmpp_2m", sd_schedule, 16)
    seen = []

    def raw(x, t, index):
        k = int(np.argmin(np.abs(plan.times - float(t[0]))))
        seen.append((k, list(range(3)) if index is None else index.tolist()))
        assert x.shape[0] == t.shape[0] == (3 if index is None else len(index))
        return linear_raw(x, t, index)

    x_T = odd_latents(batch=3, seed=4)
    x_T[1] *= 3.0
    got = run_fused_cpp(plan, raw, x_T, guidance=torch.tensor([2.0, 5.0, 1.5]), gate=AdaptiveGate(delta=0.05))
    assert any(len(computed) < 3 for _, computed in seen)
    made = dict(seen)
    for b in range(3):
        assert got.skipped[b] == [k for k in range(plan.nfe) if b not in made.get(k, [])]


def test_dense_program_when_the_file_has_none(sd_schedule):
    from fastdiff import _C

    plan = solvers.build_variant("unipc", sd_schedule, 6)
    dense = _C.Sampler(plan.dumps())
    assert dense.program_origin == "dense" and dense.num_rows == plan.nfe + 2
    x_T = odd_latents(batch=2)
    w = np.array([3.0, 4.0], dtype=np.float32)

    def fn(x, t, index):
        return linear_raw(torch.from_numpy(x), torch.from_numpy(t), index).numpy()

    out = dense.run(fn, x_T.numpy(), w)
    ref = run_fused(plan, linear_raw, x_T, guidance=torch.from_numpy(w))
    assert rel(torch.from_numpy(out["latents"]), ref.latents) <= 1e-5


def test_callback_sees_every_next_input(sd_schedule):
    plan = solvers.build_variant("ddim", sd_schedule, 4)
    x_T = odd_latents(batch=2)
    a, b = [], []
    w = torch.full((2,), 3.0)
    run_fused(plan, linear_raw, x_T, guidance=w, callback=lambda k, t, x: a.append((k, x.clone())))
    run_fused_cpp(plan, linear_raw, x_T, guidance=w, callback=lambda k, t, x: b.append((k, x.clone())))
    assert [k for k, _ in a] == [k for k, _ in b] == [0, 1, 2, 3]
    for (_, xa), (_, xb) in zip(a, b):
        assert rel(xb, xa) <= 1e-6


def test_many_threads_share_one_sampler(sd_schedule):
    plan = solvers.build_variant("dpmpp_2m", sd_schedule, 6)
    noises = [odd_latents(batch=2, seed=s) for s in range(8)]
    expected = [run_fused_cpp(plan, linear_raw, x, guidance=torch.full((2,), 2.0)).latents for x in noises]
    results = [None] * 8

    def work(i):
        results[i] = run_fused_cpp(plan, linear_raw, noises[i], guidance=torch.full((2,), 2.0)).latents

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        assert torch.equal(got, want)


# ---------------------------------------------------------------- bad input
def test_corrupt_program_is_refused(sd_schedule):
    import json

    from fastdiff import _C

    plan = solvers.build_variant("unipc", sd_schedule, 6)
    doc = json.loads(plan.dumps(program=True))
    doc["program"]["coef"][3][1][0] *= 1.5
    with pytest.raises(PlanError, match="plan program: .*differs from coef row") as info:
        _C.Sampler(json.dumps(doc))
    assert info.value.code == "program"
    other = json.loads(solvers.build_variant("ddim", sd_schedule, 6).dumps(program=True))
    with pytest.raises(PlanError, match="compiled for another plan"):
        _C.Sampler(json.dumps({**doc, "program": other["program"]}))
    doc = json.loads(plan.dumps(program=True))
    doc["program"]["src"] = "nope"
    with pytest.raises(PlanError, match="src must be an array"):
        _C.Sampler(json.dumps(doc))


def test_bad_model_outputs_name_the_call(sd_schedule):
    from fastdiff import _C

    plan = solvers.build_variant("ddim", sd_schedule, 4)
    x_T = odd_latents(batch=3)
    w = torch.full((3,), 2.0)
    with pytest.raises(_C.SamplerError, match=r"model call 0 .*returned shape \(3, 3, 5, 7\); expected \(6, 3, 5, 7\)"):
        run_fused_cpp(plan, lambda x, t, i: linear_raw(x, t, i, guided=False), x_T, guidance=w)

    def failing(x, t, index):
        if float(t[0]) < 500:
            raise RuntimeError("the UNet fell over")
        return linear_raw(x, t, index)

    with pytest.raises(_C.SamplerError, match="model call 2 .*the UNet fell over"):
        run_fused_cpp(plan, failing, x_T, guidance=w)
    with pytest.raises(_C.SamplerError, match="ModelOutputError.*expected a torch.Tensor"):
        run_fused_cpp(plan, lambda x, t, i: "nope", x_T, guidance=w)
    assert issubclass(ModelOutputError, ValueError)


def test_bad_arguments(sd_schedule):
    plan = solvers.build_variant("ddim", sd_schedule, 4)
    with pytest.raises(ValueError, match="float32 CPU latents"):
        run_fused_cpp(plan, linear_raw, odd_latents(dtype=torch.float64))
    with pytest.raises(ValueError, match="guidance must be a float32 array of 3 weights"):
        run_fused_cpp(plan, linear_raw, odd_latents(), guidance=torch.ones(2))
    with pytest.raises(TypeError, match="plan must be a StepPlan"):
        run_fused_cpp("plan.json", linear_raw, odd_latents())
    from fastdiff import _C

    with pytest.raises(ValueError, match="unknown gate option 'detla'"):
        _C.Sampler(plan.dumps()).run(lambda x, t, i: x, odd_latents().numpy(), None, {"detla": 0.1})


def test_engine_backend_cpp_matches_eager():
    pytest.importorskip("diffusers", reason="engines need diffusers")
    import fastdiff
    from fastdiff.engines import BackendUnavailableError

    eager = fastdiff.build_engine("tiny-shapes", device="cpu")
    cpp = fastdiff.build_engine("tiny-shapes", device="cpu", backend="cpp")
    prompts = ["a red circle on a blue background", "a green square"]
    for skip in (None, "adaptive"):
        a = eager.sample(prompts, steps=8, seed=1, num_images=2, skip=skip, fused=True)
        b = cpp.sample(prompts, steps=8, seed=1, num_images=2, skip=skip)
        assert rel(b.latents, a.latents) <= 1e-6
        assert b.nfe == a.nfe and b.skipped == a.skipped
    with pytest.raises(ValueError, match="always runs the fused step"):
        cpp.sample(prompts, steps=4, fused=False)
    with pytest.raises(BackendUnavailableError, match="samples float32 latents"):
        fastdiff.build_engine("tiny-shapes", device="cpu", backend="cpp", dtype=torch.bfloat16)
