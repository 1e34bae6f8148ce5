"""The C++ loop (fastdiff._C.Sampler via fastdiff.loops.cpp) beyond the shared loop tests of
test_loops.py: the Program carried over in the plan file, the compacted calls, callbacks,
threads, and clear errors for corrupt programs, bad model outputs and bad arguments."""

import threading

import numpy as np
import pytest
import torch

from fastdiff import program, solvers
from fastdiff.gate import GateSpec
from fastdiff.loops import ModelOutputError, cpp, reference
from fastdiff.plan import PlanError
from tests.conftest import linear_raw, odd_latents, rel_max

pytestmark = pytest.mark.skipif(cpp.why_unavailable() is not None, reason=f"C++ loop: {cpp.why_unavailable()}")


def run_cpp(plan, raw_fn, x_T, **kw):
    return cpp.run(program.compile(plan), raw_fn, x_T, **kw)


def run_reference(plan, raw_fn, x_T, **kw):
    return reference.run(program.compile(plan), raw_fn, x_T, impl="torch", **kw)


@pytest.mark.parametrize("name,steps", [("ddim", 5), ("dpmpp_2m", 8), ("unipc", 7), ("euler", 6), ("deis", 9)])
def test_the_cpp_loop_runs_the_pythons_program(sd_schedule, name, steps):
    compiled = program.compile(solvers.build_variant(name, sd_schedule, steps))
    x_T = odd_latents(batch=3)
    w = torch.tensor([1.5, 3.0, 7.5])
    got = cpp.run(compiled, linear_raw, x_T, guidance=w)
    assert rel_max(got.latents, reference.run(compiled, linear_raw, x_T, guidance=w, impl="torch").latents) <= 1e-6
    sampler = cpp.sampler_for(compiled)
    assert sampler.program_origin == "file" and sampler.num_rows == compiled.num_rows


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
    got = run_cpp(plan, raw, x_T, guidance=torch.tensor([2.0, 5.0, 1.5]), gate=GateSpec(delta=0.05))
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
    ref = run_reference(plan, linear_raw, x_T, guidance=torch.from_numpy(w))
    assert rel_max(torch.from_numpy(out["latents"]), ref.latents) <= 1e-5


def test_callback_sees_every_next_input(sd_schedule):
    plan = solvers.build_variant("ddim", sd_schedule, 4)
    x_T = odd_latents(batch=2)
    a, b = [], []
    w = torch.full((2,), 3.0)
    run_reference(plan, linear_raw, x_T, guidance=w, callback=lambda k, t, x: a.append((k, x.clone())))
    run_cpp(plan, linear_raw, x_T, guidance=w, callback=lambda k, t, x: b.append((k, x.clone())))
    assert [k for k, _ in a] == [k for k, _ in b] == [0, 1, 2, 3]
    for (_, xa), (_, xb) in zip(a, b):
        assert rel_max(xb, xa) <= 1e-6


def test_many_threads_share_one_sampler(sd_schedule):
    plan = solvers.build_variant("dpmpp_2m", sd_schedule, 6)
    noises = [odd_latents(batch=2, seed=s) for s in range(8)]
    expected = [run_cpp(plan, linear_raw, x, guidance=torch.full((2,), 2.0)).latents for x in noises]
    results = [None] * 8

    def work(i):
        results[i] = run_cpp(plan, linear_raw, noises[i], guidance=torch.full((2,), 2.0)).latents

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
    doc = json.loads(program.dumps(program.compile(plan)))
    doc["program"]["coef"][3][1][0] *= 1.5
    with pytest.raises(PlanError, match="plan program: .*differs from coef row") as info:
        _C.Sampler(json.dumps(doc))
    assert info.value.code == "program"
    other = json.loads(program.dumps(program.compile(solvers.build_variant("ddim", sd_schedule, 6))))
    with pytest.raises(PlanError, match="compiled for another plan"):
        _C.Sampler(json.dumps({**doc, "program": other["program"]}))
    doc = json.loads(program.dumps(program.compile(plan)))
    doc["program"]["src"] = "nope"
    with pytest.raises(PlanError, match="src must be an array"):
        _C.Sampler(json.dumps(doc))


def test_bad_model_outputs_name_the_call(sd_schedule):
    from fastdiff import _C

    plan = solvers.build_variant("ddim", sd_schedule, 4)
    x_T = odd_latents(batch=3)
    w = torch.full((3,), 2.0)
    with pytest.raises(_C.SamplerError, match=r"model call 0 .*returned shape \(3, 3, 5, 7\); expected \(6, 3, 5, 7\)"):
        run_cpp(plan, lambda x, t, i: linear_raw(x, t, i, guided=False), x_T, guidance=w)

    def failing(x, t, index):
        if float(t[0]) < 500:
            raise RuntimeError("the UNet fell over")
        return linear_raw(x, t, index)

    with pytest.raises(_C.SamplerError, match="model call 2 .*the UNet fell over"):
        run_cpp(plan, failing, x_T, guidance=w)
    with pytest.raises(_C.SamplerError, match="ModelOutputError.*expected a torch.Tensor"):
        run_cpp(plan, lambda x, t, i: "nope", x_T, guidance=w)
    assert issubclass(ModelOutputError, ValueError)


def test_bad_arguments(sd_schedule):
    plan = solvers.build_variant("ddim", sd_schedule, 4)
    with pytest.raises(ValueError, match="loop 'cpp': the C\\+\\+ loop samples float32 CPU latents"):
        run_cpp(plan, linear_raw, odd_latents(dtype=torch.float64))
    with pytest.raises(ValueError, match="guidance holds 2 weights for a batch of 3"):
        run_cpp(plan, linear_raw, odd_latents(), guidance=torch.ones(2))
    with pytest.raises(TypeError, match="program must be a fastdiff.program.Program"):
        cpp.run(plan, linear_raw, odd_latents())
    with pytest.raises(TypeError, match="gate must be a fastdiff.gate.GateSpec"):
        run_cpp(plan, linear_raw, odd_latents(), gate=GateSpec().to_dict())
    from fastdiff import _C

    with pytest.raises(ValueError, match="Sampler.run: guidance must be a float32 array of 3 weights"):
        _C.Sampler(plan.dumps()).run(lambda x, t, i: x, odd_latents().numpy(), np.ones(2, np.float32))
    with pytest.raises(ValueError, match="unknown gate option 'detla'"):
        _C.Sampler(plan.dumps()).run(lambda x, t, i: x, odd_latents().numpy(), None, {"detla": 0.1})


def test_engine_with_the_cpp_loop_matches_the_reference_loop():
    pytest.importorskip("diffusers", reason="engines need diffusers")
    import fastdiff

    eager = fastdiff.build_engine("tiny-shapes", device="cpu", sampler="dpmpp_2m")  # a plan the gate skips in
    in_cpp = fastdiff.build_engine("tiny-shapes", device="cpu", loop="cpp", sampler="dpmpp_2m")
    assert eager.loop.name == "reference" and in_cpp.loop.name == "cpp"
    prompts = ["a red circle on a blue background", "a green square"]
    for skip in (None, "adaptive"):
        a = eager.sample(prompts, steps=8, seed=1, num_images=2, skip=skip)
        b = in_cpp.sample(prompts, steps=8, seed=1, num_images=2, skip=skip)
        assert rel_max(b.latents, a.latents) <= 1e-6
        assert b.nfe == a.nfe and b.skipped == a.skipped
    assert sum(map(len, a.skipped)) > 0
    with pytest.raises(ValueError, match="loop 'cpp' is unavailable: the C\\+\\+ loop samples float32 latents"):
        fastdiff.build_engine("tiny-shapes", device="cpu", loop="cpp", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="backend 'cpp' is a loop, not a module backend: use loop='cpp'"):
        fastdiff.build_engine("tiny-shapes", device="cpu", backend="cpp")
