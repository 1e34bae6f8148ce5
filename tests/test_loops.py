"""The loop contract: the reference loop against the canonical form, memory held, no host sync,
dtypes, callbacks, bad model outputs; then every loop (reference with the torch or Triton step,
graph, cpp) held to the reference at awkward sizes, with and without guidance and the gate."""

from __future__ import annotations

import glob

import pytest
import torch

from fastdiff import loops, program, solvers
from fastdiff.gate import GateSpec
from fastdiff.graphs import GraphCache
from fastdiff.loops import ModelOutputError, cpp, reference
from fastdiff.ops import triton_step
from fastdiff.plan import StepPlan
from tests.conftest import (
    canonical,
    cuda_syncs_raise,
    forbid_host_reads,
    gmm_model,
    gmm_raw,
    guided_gmm,
    linear_raw,
    odd_latents,
    rel_max,
    rel_rms,
)

needs_triton = pytest.mark.skipif(not triton_step.available(), reason=str(triton_step.why_unavailable()))
needs_cpp = pytest.mark.skipif(cpp.why_unavailable() is not None, reason=f"C++ loop: {cpp.why_unavailable()}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHIPPED = sorted(glob.glob("engines/*/plans/olss-*.json"))


# ---------------------------------------------------------------- the reference loop
@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m", "unipc", "deis", "pndm"])
def test_guided_reference_loop_is_the_canonical_form_in_float64(sd_schedule, name):
    plan = solvers.build(name, sd_schedule, 9)
    raw_fn, model_fn = guided_gmm(sd_schedule)
    x_T = odd_latents().double()
    got = reference.run(program.compile(plan), raw_fn, x_T, guidance=1.7, impl="torch")
    assert rel_rms(got.latents, canonical(plan, lambda x, t: model_fn(x, t, 1.7), x_T)) < 1e-13
    assert got.nfe == [plan.nfe] * 3 and got.unet_calls == plan.nfe and got.skipped == [[], [], []]


@pytest.mark.parametrize("path", SHIPPED)
def test_shipped_olss_plans_run_as_their_canonical_form(sd_schedule, path):
    plan = StepPlan.load(path)
    x_T = odd_latents().double()
    got = reference.run(program.compile(plan), gmm_raw(sd_schedule), x_T)
    assert rel_rms(got.latents, canonical(plan, gmm_model(sd_schedule), x_T)) < 1e-12


def test_the_loop_holds_the_programs_rows_and_nothing_per_call(sd_schedule):
    plan = solvers.build("dpmpp_2m", sd_schedule, 20)
    compiled = program.compile(plan)
    model = gmm_model(sd_schedule)
    x_T = odd_latents()
    storages = set()

    def raw_fn(x, t, index):
        storages.add((x.untyped_storage().data_ptr(), x.untyped_storage().nbytes()))
        return model(x, t)

    reference.run(compiled, raw_fn, x_T)
    # every model input is a row of one buffer of num_rows latents (3 for DPM-Solver++(2M))
    assert compiled.num_rows == 3
    assert storages == {(next(iter(storages))[0], compiled.num_rows * x_T.numel() * x_T.element_size())}


def test_the_ungated_loop_never_reads_device_data_back(sd_schedule, monkeypatch):
    compiled = program.compile(solvers.build("unipc", sd_schedule, 8, solver_order=3))
    raw_fn, _ = guided_gmm(sd_schedule)
    x_T = odd_latents()
    expected = reference.run(compiled, raw_fn, x_T, guidance=3.0, impl="torch").latents  # warm: device tables
    forbid_host_reads(monkeypatch)
    result = reference.run(compiled, raw_fn, x_T, guidance=3.0, impl="torch").latents
    monkeypatch.undo()
    assert torch.equal(result, expected)


@pytest.mark.gpu
def test_no_synchronisation_on_cuda(sd_schedule):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    compiled = program.compile(solvers.build("dpmpp_2m", sd_schedule, 10))
    raw_fn, _ = guided_gmm(sd_schedule)
    x_T = odd_latents().cuda()
    reference.run(compiled, raw_fn, x_T, guidance=2.0)  # warm-up: CUDA init, kernel compile, tables
    with cuda_syncs_raise():
        reference.run(compiled, raw_fn, x_T, guidance=2.0)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
def test_low_precision_latents_track_float64(sd_schedule, dtype, tol):
    plan = solvers.build("dpmpp_2m", sd_schedule, 10)
    x_T = odd_latents()
    result = reference.run(program.compile(plan), gmm_raw(sd_schedule), x_T.to(dtype)).latents
    assert result.dtype == dtype
    assert rel_rms(result, canonical(plan, gmm_model(sd_schedule), x_T)) < tol


def test_x_T_is_not_modified(sd_schedule):
    x_T = odd_latents()
    before = x_T.clone()
    reference.run(program.compile(solvers.build("ddim", sd_schedule, 5)), gmm_raw(sd_schedule), x_T)
    assert torch.equal(x_T, before)


def test_model_receives_batch_times_on_the_latents_device(sd_schedule):
    plan = solvers.build("euler", sd_schedule, 6)
    seen = []
    raw_fn = gmm_raw(sd_schedule)

    def recording(x, t, index):
        seen.append(t.clone())
        return raw_fn(x, t, index)

    reference.run(program.compile(plan), recording, odd_latents())
    assert all(t.shape == (3,) and t.dtype == torch.float32 for t in seen)
    assert [float(t[0]) for t in seen] == [float(torch.tensor(v, dtype=torch.float32)) for v in plan.times]


def test_callback_sees_every_next_input_and_the_result(sd_schedule):
    compiled = program.compile(solvers.build("dpmpp_2m", sd_schedule, 6))
    inputs, steps = [], []
    raw_fn = gmm_raw(sd_schedule)

    def recording(x, t, index):
        inputs.append(x.clone())
        return raw_fn(x, t, index)

    result = reference.run(compiled, recording, odd_latents(), callback=lambda k, t, x: steps.append((k, x.clone())))
    assert [k for k, _ in steps] == list(range(6))
    for (_, x), nxt in zip(steps, inputs[1:]):
        assert torch.equal(x, nxt)
    assert torch.equal(steps[-1][1], result.latents)


def test_a_model_output_aliasing_its_input_changes_nothing(sd_schedule):
    compiled = program.compile(solvers.build("dpmpp_2m", sd_schedule, 5))
    x_T = odd_latents().double()
    aliased = reference.run(compiled, lambda x, t, i: x, x_T).latents
    assert torch.equal(aliased, reference.run(compiled, lambda x, t, i: x.clone(), x_T).latents)


def test_views_returned_by_the_model_are_not_written(sd_schedule):
    compiled = program.compile(solvers.build("dpmpp_2m", sd_schedule, 5))
    model = gmm_model(sd_schedule)
    kept = []

    def chunked(x, t, index):
        both = torch.cat([model(x, t), model(x, t)])
        kept.append((both, both.clone()))
        return both.chunk(2)[0]

    reference.run(compiled, chunked, odd_latents())
    assert all(torch.equal(a, b) for a, b in kept)


def test_bad_model_outputs_and_arguments_name_the_problem(sd_schedule):
    compiled = program.compile(solvers.build("ddim", sd_schedule, 4))
    x_T = odd_latents()
    with pytest.raises(ModelOutputError, match=r"model call 0 returned shape \(3, 3, 5\); expected \(3, 3, 5, 7\)"):
        reference.run(compiled, lambda x, t, i: x[..., 0], x_T)
    with pytest.raises(ModelOutputError, match=r"model call 0 returned shape \(3, 3, 5, 7\); expected \(6, 3, 5, 7\)"):
        reference.run(compiled, lambda x, t, i: x, x_T, guidance=2.0)
    with pytest.raises(ModelOutputError, match="returned tuple, expected a torch.Tensor"):
        reference.run(compiled, lambda x, t, i: (x,), x_T)
    with pytest.raises(ModelOutputError, match="returned a tensor on meta"):
        reference.run(compiled, lambda x, t, i: x.to("meta"), x_T)
    with pytest.raises(TypeError, match="program must be a fastdiff.program.Program"):
        reference.run(solvers.build("ddim", sd_schedule, 4), lambda x, t, i: x, x_T)
    with pytest.raises(ValueError, match="x_T must be a floating-point tensor"):
        reference.run(compiled, lambda x, t, i: x, torch.zeros(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="guidance holds 2 weights for a batch of 3"):
        reference.run(compiled, lambda x, t, i: torch.cat([x, x]), x_T, guidance=torch.ones(2))
    with pytest.raises(TypeError, match="gate must be a fastdiff.gate.GateSpec"):
        reference.run(compiled, lambda x, t, i: x, x_T, gate={"delta": 0.1})


def test_model_output_dtype_is_converted_to_the_latents(sd_schedule):
    raw_fn = gmm_raw(sd_schedule)
    out = reference.run(
        program.compile(solvers.build("ddim", sd_schedule, 4)), lambda *a: raw_fn(*a).half(), odd_latents()
    )
    assert out.latents.dtype == torch.float32


# ---------------------------------------------------------------- the gate in the reference loop
def naive_gated(plan, model, x_T, gate: GateSpec):
    """The canonical plan with per-sample skipping in plain torch: x_k = Σ coef[k, j]·basis_j; a
    skipped sample's output is its previous output ("copy") or the Lagrange line through its
    previous two outputs at the call's time ("extrapolate"); the model always sees the whole batch."""
    coef = torch.tensor(plan.coef, dtype=x_T.dtype)
    t = [float(v) for v in plan.times]
    basis = [x_T]
    state = [torch.zeros(x_T.shape[0]), torch.zeros(x_T.shape[0]), torch.zeros(x_T.shape[0], dtype=torch.int32)]
    prev_x = prev = None
    for k in range(plan.nfe):
        x = sum(coef[k, j] * basis[j] for j in range(k + 1))
        skip = torch.zeros(x.shape[0], dtype=torch.bool)
        if prev_x is not None:
            d = (x.float() - prev_x.float()).abs().reshape(x.shape[0], -1).mean(1)
            skip, *state = gate.decide(k, d, *state)
        out = model(x, torch.full((x.shape[0],), float(plan.times[k])))
        if prev is not None:
            guess = prev
            if gate.reuse == "extrapolate" and k >= 2:
                t0, t1, t2 = t[k], t[k - 1], t[k - 2]
                guess = prev * (t0 - t2) / (t1 - t2) + basis[-2] * (t0 - t1) / (t2 - t1)
            out = torch.where(skip.reshape(-1, *[1] * (x.dim() - 1)), guess, out)
        basis.append(out)
        prev_x, prev = x, out
    return sum(coef[-1, j] * basis[j] for j in range(plan.nfe + 1))


@pytest.mark.parametrize("max_skips", [2, 3])
def test_extrapolation_errors_of_successive_runs_do_not_compound(sd_schedule, max_skips):
    """Skipping every call the rule allows (delta huge) on the exact Gaussian-mixture model,
    DPM-Solver++(2M) 50 steps: each run of extrapolated skips follows two computed calls
    (GateSpec.refresh), so its line passes through computed outputs. When a run could start right
    after one computed call, its line went through a predicted output and every run multiplied
    the error before it: relative RMS error 52 (max_skips 2) and 424 (3); now 0.005 and 0.016."""
    plan = solvers.build("dpmpp_2m", sd_schedule, 50)
    compiled, model, x_T = program.compile(plan), gmm_model(sd_schedule), odd_latents(batch=3).double()
    full = reference.run(compiled, lambda x, t, i: model(x, t), x_T, impl="torch").latents
    gate = GateSpec(delta=1e9, max_skips=max_skips, per_sample=False)
    got = reference.run(compiled, lambda x, t, i: model(x, t), x_T, gate=gate, impl="torch")
    assert got.unet_calls <= 26  # about half the calls skipped
    assert rel_rms(got.latents, full) < 0.05


@pytest.mark.parametrize("reuse", ["extrapolate", "copy"])
def test_gated_loop_compacts_the_batch_and_matches_the_naive_gated_plan(sd_schedule, reuse):
    plan = solvers.build("dpmpp_2m", sd_schedule, 30)
    model = gmm_model(sd_schedule)
    x_T = odd_latents(batch=3).double()
    x_T[1] *= 3  # a sample on another trajectory: its decisions differ
    seen = []

    def raw_fn(x, t, index):
        seen.append(None if index is None else index.tolist())
        return model(x, t)

    gate = GateSpec(delta=0.05, max_skips=3, warmup=3, reuse=reuse)
    got = reference.run(program.compile(plan), raw_fn, x_T, gate=gate, impl="torch")
    assert rel_rms(got.latents, naive_gated(plan, model, x_T, gate)) < 1e-12
    assert min(got.nfe) < plan.nfe and got.unet_calls == len(seen)
    expected = []  # each UNet call saw exactly the samples that did not skip it
    for k in range(plan.nfe):
        computing = [b for b in range(3) if k not in got.skipped[b]]
        if computing:
            expected.append(None if len(computing) == 3 else computing)
    assert seen == expected
    assert [plan.nfe - len(s) for s in got.skipped] == got.nfe
    assert any(index is not None for index in seen)


def test_per_batch_decisions_skip_whole_calls(sd_schedule):
    compiled = program.compile(solvers.build("euler", sd_schedule, 30))
    raw_fn, _ = guided_gmm(sd_schedule)
    seen = []

    def counted(x, t, index):
        seen.append(x.shape[0])
        return raw_fn(x, t, index)

    x_T = odd_latents(batch=3).double()
    got = reference.run(compiled, counted, x_T, guidance=2.0, gate=GateSpec(delta=0.05, per_sample=False))
    assert set(seen) == {3} and len(set(got.nfe)) == 1 and got.nfe[0] == len(seen) < compiled.num_steps


# ---------------------------------------------------------------- every loop at awkward sizes
def graph_loop(plan, raw_fn, x_T, **kw):
    loop = loops.create("graph", graphs=GraphCache("test", mode="emulate"))
    first = loop.run(program.compile(plan), raw_fn, x_T, **kw)
    again = loop.run(program.compile(plan), raw_fn, x_T, **kw)  # replayed from the cache
    assert torch.equal(first.latents, again.latents) and first.latents is not again.latents
    assert len(loop.graphs) == (0 if kw.get("gate") else 1)
    return first


LOOP_NAMES = [pytest.param("reference-triton", marks=needs_triton), "graph", pytest.param("cpp", marks=needs_cpp)]


def run_loop(name, plan, raw_fn, x_T, **kw):
    """Loop `name` on the plan; the reference loop with the torch step is what they are held to."""
    if name == "graph":
        return graph_loop(plan, raw_fn, x_T, **kw)
    if name == "cpp":
        return cpp.run(program.compile(plan), raw_fn, x_T, **kw)
    return reference.run(program.compile(plan), raw_fn, x_T, impl=name.removeprefix("reference-"), **kw)


GATES = {
    "none": None,
    "per-sample": GateSpec(delta=0.05, max_skips=3),  # reuse="extrapolate"
    "per-sample-copy": GateSpec(delta=0.05, max_skips=3, reuse="copy"),
    "per-batch": GateSpec(delta=0.05, per_sample=False),
}


@pytest.mark.parametrize("gate", list(GATES))
@pytest.mark.parametrize("guided", [True, False], ids=["guided", "unguided"])
@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc", "pndm"])
@pytest.mark.parametrize("loop", LOOP_NAMES)
def test_every_loop_matches_the_reference_at_awkward_sizes(sd_schedule, loop, solver, guided, gate):
    """Batch 3 of 3x5x7 latents in float32; the gate's decisions, the calls and the latents."""
    plan = solvers.build_variant(solver, sd_schedule, 16)
    x_T = odd_latents(batch=3, seed=4)
    x_T[1] *= 3.0  # samples with different trajectories decide differently
    w = torch.tensor([2.0, 5.0, 1.5]) if guided else None

    def raw(x, t, index):
        return linear_raw(x, t, index, guided)

    want = reference.run(program.compile(plan), raw, x_T, guidance=w, gate=GATES[gate], impl="torch")
    got = run_loop(loop, plan, raw, x_T, guidance=w, gate=GATES[gate])
    assert got.skipped == want.skipped and got.nfe == want.nfe and got.unet_calls == want.unet_calls
    assert rel_max(got.latents, want.latents) <= 1e-6
    if gate != "none":
        assert sum(map(len, want.skipped)) > 0  # the comparison covered skipped calls


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loop", LOOP_NAMES[:2])
def test_half_precision_loops_stay_within_twice_the_reference_error(sd_schedule, loop, dtype):
    plan = solvers.build_variant("dpmpp_2m", sd_schedule, 12)
    raw_fn, model_fn = guided_gmm(sd_schedule)
    x_T = odd_latents(batch=3)
    exact = canonical(plan, lambda x, t: model_fn(x, t, 2.5), x_T)
    ref = reference.run(program.compile(plan), raw_fn, x_T.to(dtype), guidance=2.5, impl="torch").latents
    got = run_loop(loop, plan, raw_fn, x_T.to(dtype), guidance=2.5).latents
    assert got.dtype == dtype
    assert rel_rms(got, exact) <= 2 * rel_rms(ref, exact) + torch.finfo(dtype).eps


def test_loops_are_created_by_name_and_explain_what_cannot_run():
    assert loops.create("auto").name == "reference"
    assert loops.create("auto", graphs=GraphCache("t", mode="emulate")).name == "graph"
    with pytest.raises(ValueError, match="unknown loop 'fast': expected one of auto, reference, graph, cpp"):
        loops.create("fast")
    with pytest.raises(ValueError, match="loop 'graph' is unavailable: the graph loop captures CUDA graphs"):
        loops.create("graph")
    if cpp.why_unavailable() is None:
        with pytest.raises(ValueError, match="loop 'cpp' is unavailable: the C\\+\\+ loop samples float32 latents"):
            loops.create("cpp", device="cpu", dtype=torch.float16)
        with pytest.raises(ValueError, match="samples on the CPU"):
            loops.create("cpp", device="meta", dtype=torch.float32)
