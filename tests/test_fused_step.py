"""The fused step: tables from recurrent programs, the torch reference against the executor and
exact math, the Triton kernels against the reference (interpreted on the CPU), bad input."""

from __future__ import annotations

import glob

import numpy as np
import pytest
import torch

from fastdiff import solvers
from fastdiff.executor import run, run_fused
from fastdiff.ops import fused_step, triton_step
from fastdiff.ops.step import StepTableError, StepTables, step_tables
from fastdiff.plan import StepPlan
from fastdiff.recurrent import LinOp, RecurrentPlan, RecurrentStep
from tests.conftest import odd_latents, rel_rms
from tests.test_executor import gmm_model

needs_triton = pytest.mark.skipif(not triton_step.available(), reason=str(triton_step.why_unavailable()))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SOLVERS = ["ddim", "euler", "dpmpp_2m", "unipc", "deis", "pndm"]
SHIPPED = sorted(glob.glob("engines/*/plans/olss-*.json"))


def guided_model(model, w):
    """raw_fn for run_fused from a model_fn: [uncond; cond] with cond = 1.1·uncond + 0.05."""

    def raw_fn(x, t, index):
        u = model(x, t)
        return torch.cat([u, 1.1 * u + 0.05])

    def model_fn(x, t):
        u = model(x, t)
        return u + w * (1.1 * u + 0.05 - u)

    return raw_fn, model_fn


@pytest.mark.parametrize("name", SOLVERS)
def test_reference_fused_loop_matches_the_executor_in_float64(sd_schedule, name):
    plan = solvers.build(name, sd_schedule, 9)
    model = gmm_model(sd_schedule)
    x_T = odd_latents().double()
    raw_fn, model_fn = guided_model(model, 1.7)
    want = run(plan, model_fn, x_T)
    got = run_fused(plan, raw_fn, x_T, guidance=1.7, impl="torch")
    assert rel_rms(got.latents, want) < 1e-13
    assert got.nfe == [plan.nfe] * 3 and got.unet_calls == plan.nfe


@pytest.mark.parametrize("path", SHIPPED)
def test_shipped_olss_plans_become_tables(sd_schedule, path):
    plan = StepPlan.load(path)
    tables = plan.step_tables()
    assert tables.width % 8 == 0 and tables.num_steps == plan.nfe
    model = gmm_model(sd_schedule)
    x_T = odd_latents().double()
    want = run(plan, model, x_T)
    got = run_fused(plan, lambda x, t, i: model(x, t), x_T, impl="torch")
    assert rel_rms(got.latents, want) < 1e-12


def synthetic_tables(ncols: int, seed: int = 0) -> StepTables:
    """One call: row 0 writes the output's slot (g + s·x), row 1 writes the next input in place
    over x from g and `ncols` live columns (x among them)."""
    rng = np.random.default_rng(seed)
    rows = ncols + 1  # columns 0..ncols-1 live (column 0 = x), column ncols = the output's slot
    width = 8
    src = np.full((1, 2, width), -1, np.int32)
    coef = np.zeros((1, 2, width))
    src[0, 0, 0], coef[0, 0, 0] = 0, rng.uniform(-1, 1)
    order = rng.permutation(ncols)
    src[0, 1, :ncols] = order
    coef[0, 1, :ncols] = rng.uniform(-1.5, 1.5, ncols)
    return StepTables(
        num_rows=rows,
        width=width,
        dst=np.array([[ncols, 0]], np.int32),
        src=src,
        coef=coef,
        gcoef=np.array([[1.0, rng.uniform(-1, 1)]]),
        x_row=np.array([0], np.int32),
        init_row=0,
        init_coef=1.0,
        result_row=0,
    )


def exact_step(raw, w, basis, tables, rows, out):
    """Call 0 of `tables` in float64 from the stored (rounded) inputs, with the float32 coefficients."""
    batch = basis.shape[1]
    b64 = basis.double()
    coef = torch.as_tensor(tables.coef).float().double()
    gcoef = torch.as_tensor(tables.gcoef).float().double()
    g = out.double().clone() if out is not None else torch.zeros_like(b64[0])
    r = rows.tolist() if rows is not None else list(range(batch))
    half = raw.shape[0] // (2 if w is not None else 1)
    for b in range(batch):
        if r[b] < 0:
            continue
        u = raw[r[b]].double()
        g[b] = u if w is None else u + w[b].double() * (raw[half + r[b]].double() - u)
    want = b64.clone()
    for i in range(2):
        d = int(tables.dst[0, i])
        value = gcoef[0, i] * g
        for j, s in enumerate(tables.src[0, i]):
            if s >= 0:
                value = value + coef[0, i, j] * b64[s]
        want[d] = value
    stat = (want[int(tables.dst[0, 1])] - b64[0]).abs().reshape(batch, -1).mean(1)
    return want, g, stat


def step_inputs(batch, shape, ncols, dtype, guided, skip, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tables = synthetic_tables(ncols, seed)
    basis = torch.randn(tables.num_rows, batch, *shape, generator=gen).to(dtype)
    rows = out = None
    computed = list(range(batch))
    if skip:
        computed = [b for b in range(batch) if b % 2 == 0]  # odd samples skip their call
        rows = torch.full((batch,), -1, dtype=torch.int32)
        for r, b in enumerate(computed):
            rows[b] = r
        out = torch.randn(batch, *shape, generator=gen).to(dtype)
    raw = torch.randn(len(computed) * (2 if guided else 1), *shape, generator=gen).to(dtype)
    w = torch.linspace(1.0, 4.0, batch) if guided else None
    return tables, basis, raw, w, rows, out


CASES = [
    # batch, per-sample shape, live columns, guided, skip
    (1, (7,), 1, False, False),
    (3, (3, 5, 7), 3, True, False),
    (3, (4, 17, 19), 6, True, True),  # 1292 elements: two blocks, the second one partial
    (1, (1, 1, 1), 2, True, False),
    (3, (2, 33), 5, False, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}-{'x'.join(map(str, c[1]))}-c{c[2]}-g{c[3]:d}-s{c[4]:d}")
@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_step_within_twice_the_reference_rounding(case, dtype, impl):
    batch, shape, ncols, guided, skip = case
    tables, basis, raw, w, rows, out = step_inputs(batch, shape, ncols, dtype, guided, skip)
    want, g, want_stat = exact_step(raw, w, basis, tables, rows, out)
    results = {}
    for which in ("torch", impl):
        b, o = basis.clone().to(DEVICE), None if out is None else out.clone().to(DEVICE)
        stat = torch.empty(batch, dtype=torch.float32, device=DEVICE)
        fused_step(
            0,
            raw.to(DEVICE),
            None if w is None else w.to(DEVICE),
            b,
            tables.on(DEVICE, dtype),
            rows=None if rows is None else rows.to(DEVICE),
            out=o,
            stat=stat,
            impl=which,
        )
        results[which] = (b.cpu(), None if o is None else o.cpu(), stat.cpu())
    (ref_b, ref_o, ref_s), (got_b, got_o, got_s) = results["torch"], results[impl]
    scale = want.abs().max().item()
    floor = torch.finfo(dtype).eps * scale
    ref_err = (ref_b.double() - want).abs().max().item()
    assert (got_b.double() - want).abs().max().item() <= 2 * ref_err + floor
    assert ref_err <= torch.finfo(dtype).eps * scale * 4  # the reference itself rounds once
    # untouched rows stay untouched; skipped samples keep their previous output
    written = set(tables.dst[0].tolist())
    for r in range(tables.num_rows):
        if r not in written:
            assert torch.equal(got_b[r], basis[r])
    if out is not None:
        for b_, r in enumerate(rows.tolist()):
            if r < 0:
                assert torch.equal(got_o[b_], out[b_])
        assert (got_o.double() - g).abs().max().item() <= 2 * (ref_o.double() - g).abs().max().item() + floor
    # the statistic is over the stored (rounded) next input, summed in float32
    for stored, stat in ((ref_b, ref_s), (got_b, got_s)):
        exact = (stored[int(tables.dst[0, 1])].double() - basis[0].double()).abs().reshape(batch, -1).mean(1)
        assert torch.allclose(stat.double(), exact, rtol=1e-5, atol=1e-7 * scale)
    assert torch.allclose(got_s.double(), want_stat, rtol=4 * torch.finfo(dtype).eps)


@needs_triton
@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc"])
def test_triton_loop_matches_the_reference_loop(sd_schedule, name):
    plan = solvers.build(name, sd_schedule, 7)
    model = gmm_model(sd_schedule)
    x_T = odd_latents().to(DEVICE)
    raw_fn, _ = guided_model(lambda x, t: model(x.cpu(), t.cpu()).to(x.device), 2.0)
    ref = run_fused(plan, raw_fn, x_T, guidance=2.0, impl="torch")
    got = run_fused(plan, raw_fn, x_T, guidance=2.0, impl="triton")
    assert rel_rms(got.latents, ref.latents) < 1e-5


@needs_triton
def test_gate_kernel_matches_the_gate_reference():
    from fastdiff.gate import AdaptiveGate

    gen = torch.Generator().manual_seed(3)
    batch, nblocks, n = 5, 3, 2500
    ref, fast = AdaptiveGate(delta=0.2, max_skips=2, warmup=3), AdaptiveGate(delta=0.2, max_skips=2, warmup=3)
    ref.start(batch, DEVICE)
    fast.start(batch, DEVICE)
    for k in range(1, 12):
        # partial sums of a slowly varying trajectory, plus noise that some samples fail on
        level = 1.0 + 0.02 * k + torch.rand(batch, 1, generator=gen) * torch.tensor([0.0, 0.0, 0.5, 0.05, 0.0])[:, None]
        partials = (level * n / nblocks).expand(batch, nblocks).contiguous().to(DEVICE)
        want = ref.observe_stat(partials.sum(1) / n)
        got = fast.observe_partials(partials, n)
        assert torch.equal(got.cpu(), want.cpu()), k
        assert torch.allclose(fast._d1.cpu(), ref._d1.cpu()) and torch.equal(fast._run.cpu(), ref._run.cpu())


def naive_gated(plan, model, x_T, gate):
    """The canonical plan with per-sample skipping: x_k = Σ coef[k, j]·basis_j, a skipped
    sample's output is its previous output. The model always sees the whole batch here."""
    coef = torch.tensor(plan.coef, dtype=x_T.dtype)
    basis = [x_T]
    gate.reset()
    prev = None
    for k in range(plan.nfe):
        x = sum(coef[k, j] * basis[j] for j in range(k + 1))
        skip = gate.observe(x)
        out = model(x, torch.full((x.shape[0],), float(plan.times[k])))
        if prev is not None:
            out = torch.where(skip.reshape(-1, *[1] * (x.dim() - 1)), prev, out)
        basis.append(out)
        prev = out
    return sum(coef[-1, j] * basis[j] for j in range(plan.nfe + 1))


def test_gated_loop_compacts_the_batch_and_matches_the_naive_gated_plan(sd_schedule):
    from fastdiff.gate import AdaptiveGate

    plan = solvers.build("dpmpp_2m", sd_schedule, 30)
    model = gmm_model(sd_schedule)
    x_T = odd_latents(batch=3).double()
    x_T[1] *= 3  # a sample on another trajectory: its decisions differ
    seen = []

    def raw_fn(x, t, index):
        seen.append(None if index is None else index.tolist())
        return model(x, t)

    gate = AdaptiveGate(delta=0.05, max_skips=3, warmup=3)
    got = run_fused(plan, raw_fn, x_T, gate=gate, impl="torch")
    want = naive_gated(plan, model, x_T, AdaptiveGate(delta=0.05, max_skips=3, warmup=3))
    assert rel_rms(got.latents, want) < 1e-12
    assert min(got.nfe) < plan.nfe and got.unet_calls == len(seen)
    # compaction: each UNet call saw exactly the samples that did not skip that call
    expected = []
    for k in range(plan.nfe):
        computing = [b for b in range(3) if k not in got.skipped[b]]
        if computing:
            expected.append(None if len(computing) == 3 else computing)
    assert seen == expected
    assert [plan.nfe - len(s) for s in got.skipped] == got.nfe
    assert any(index is not None for index in seen)


def test_per_batch_decisions_skip_whole_calls(sd_schedule):
    from fastdiff.gate import AdaptiveGate

    plan = solvers.build("euler", sd_schedule, 30)
    model = gmm_model(sd_schedule)
    seen = []

    def raw_fn(x, t, index):
        seen.append(x.shape[0])
        return model(x, t)

    got = run_fused(plan, raw_fn, odd_latents(batch=3).double(), gate=AdaptiveGate(delta=0.05), per_sample=False)
    assert set(seen) == {3} and len(set(got.nfe)) == 1 and got.nfe[0] == len(seen) < plan.nfe
    # guided, with the gate's own setting: whole calls skipped, the rest as the naive loop
    seen.clear()
    guided_raw, guided_fn = guided_model(model, 2.0)

    def counted(x, t, index):
        seen.append(x.shape[0])
        return guided_raw(x, t, index)

    x_T = odd_latents(batch=3).double()
    gate = AdaptiveGate(delta=0.05, per_sample=False)
    got = run_fused(plan, counted, x_T, guidance=2.0, gate=gate)
    assert set(seen) == {3} and got.nfe[0] == len(seen) < plan.nfe


def test_the_fused_loop_without_a_gate_never_reads_device_data_back(sd_schedule, monkeypatch):
    from tests.test_executor import forbid_host_reads

    plan = solvers.build("unipc", sd_schedule, 8, solver_order=3)
    model = gmm_model(sd_schedule)
    raw_fn, _ = guided_model(model, 3.0)
    x_T = odd_latents()
    expected = run_fused(plan, raw_fn, x_T, guidance=3.0, impl="torch").latents  # warm: tables
    forbid_host_reads(monkeypatch)
    result = run_fused(plan, raw_fn, x_T, guidance=3.0, impl="torch").latents
    monkeypatch.undo()
    assert torch.equal(result, expected)


@pytest.mark.gpu
@needs_triton
def test_no_synchronisation_in_the_triton_loop_on_cuda(sd_schedule):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    plan = solvers.build("dpmpp_2m", sd_schedule, 10)
    model = gmm_model(sd_schedule)
    x_T = odd_latents().cuda()
    raw_fn, _ = guided_model(model, 2.0)
    from tests.test_executor import cuda_syncs_raise

    run_fused(plan, raw_fn, x_T, guidance=2.0, impl="triton")  # warm-up: kernel compile
    with cuda_syncs_raise():
        run_fused(plan, raw_fn, x_T, guidance=2.0, impl="triton")


# ---------------------------------------------------------------- bad input


def test_tables_refuse_an_op_reading_a_freed_column():
    init = LinOp(1, (0,), (1.0,))
    steps = (
        RecurrentStep(1, 2, (LinOp(1, (1, 2), (1.0, 0.5)),), (2,), 1),
        RecurrentStep(1, 3, (LinOp(1, (1, 3, 2), (1.0, 0.5, 0.1)),), (3,), 1),  # slot 2 was freed
    )
    program = RecurrentPlan(init, steps, 1, 4, 3, (1, 1), 0.0)
    with pytest.raises(StepTableError, match=r"call 1: an op reads slot 2, which is released after call 0"):
        step_tables(program)
    never = RecurrentPlan(init, (RecurrentStep(1, 2, (LinOp(1, (1, 3), (1.0, 1.0)),), (2,), 1),), 1, 4, 3, (1,), 0.0)
    with pytest.raises(StepTableError, match="slot 3, which is never written"):
        step_tables(never)


def _basic(dtype=torch.float32):
    tables, basis, raw, w, rows, out = step_inputs(3, (3, 5, 7), 2, dtype, True, False)
    return tables.on("cpu", dtype), basis, raw, w


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: {**a, "raw": a["raw"].half()}, "model output is float16 but the basis is float32"),
        (lambda a: {**a, "raw": a["raw"].to("meta")}, "model output is on meta"),
        (lambda a: {**a, "raw": a["raw"][:5]}, "even batch"),
        (lambda a: {**a, "raw": a["raw"][:4]}, "holds 2 samples"),
        (lambda a: {**a, "guidance": a["guidance"][:2]}, "one w per sample"),
        (lambda a: {**a, "rows": torch.tensor([0, -1, 1], dtype=torch.int32), "raw": a["raw"][:4]}, "pass out="),
        (lambda a: {**a, "out": torch.zeros(3, 3, 5, 7, dtype=torch.bfloat16)}, "out is bfloat16"),
        (lambda a: {**a, "basis": a["basis"][:, :, :2].contiguous()}, "model output has latent shape"),
        (lambda a: {**a, "k": 1}, "call 1 outside the plan's 1 calls"),
        (lambda a: {**a, "impl": "cuda"}, "impl must be"),
    ],
)
def test_bad_arguments_are_named(mutate, message):
    tables, basis, raw, w = _basic()
    args = {"k": 0, "raw": raw, "guidance": w, "basis": basis, "tables": tables, "impl": "torch"}
    args = mutate(args)
    before = basis.clone()
    with pytest.raises((ValueError, IndexError), match=message):
        fused_step(args.pop("k"), args.pop("raw"), args.pop("guidance"), args.pop("basis"), args.pop("tables"), **args)
    assert torch.equal(basis, before)  # nothing was written


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    if not triton_step.available():
        pytest.skip(str(triton_step.why_unavailable()))
    tables, basis, raw, w = _basic()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fused_step(0, raw, w, basis, tables, impl="triton")
