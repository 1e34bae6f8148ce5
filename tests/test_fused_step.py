"""The fused step op: the torch reference against exact math, the Triton kernel against the
reference (interpreted on the CPU) at awkward sizes and dtypes, and bad input. The loops that
call it are tested in test_loops.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastdiff.ops import fused_step, triton_step
from fastdiff.plan import StepPlan
from fastdiff.program import Program

needs_triton = pytest.mark.skipif(not triton_step.available(), reason=str(triton_step.why_unavailable()))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


CALLS = 3  # the synthetic program's calls, all alike; the tests run the last one (K), which may be skipped
K = CALLS - 1


def synthetic_program(ncols: int, seed: int = 0) -> Program:
    """CALLS alike calls: row 0 writes the output's slot (g + s·x), row 1 writes the next input in
    place over x from g and `ncols` live columns (x among them). Built directly, unverified: the
    op does not care what the rows mean (`program.compile` makes the real ones)."""
    rng = np.random.default_rng(seed)
    rows = ncols + 1  # columns 0..ncols-1 live (column 0 = x), column ncols = the output's slot
    width = 8
    src = np.full((1, 2, width), -1, np.int32)
    coef = np.zeros((1, 2, width))
    src[0, 0, 0], coef[0, 0, 0] = 0, rng.uniform(-1, 1)
    order = rng.permutation(ncols)
    src[0, 1, :ncols] = order
    coef[0, 1, :ncols] = rng.uniform(-1.5, 1.5, ncols)
    return Program(
        plan=StepPlan([999.0, 998.0, 997.0], np.eye(CALLS + 1), "epsilon"),
        max_error=0.0,
        num_rows=rows,
        width=width,
        dst=np.tile(np.array([[ncols, 0]], np.int32), (CALLS, 1)),
        src=np.tile(src, (CALLS, 1, 1)),
        coef=np.tile(coef, (CALLS, 1, 1)),
        gcoef=np.tile(np.array([[1.0, rng.uniform(-1, 1)]]), (CALLS, 1)),
        x_row=np.zeros(CALLS, np.int32),
        init_row=0,
        init_coef=1.0,
        result_row=0,
    )


REUSE = (1.75, -0.75)  # call K's skip row in these tests: g = a·out[1] + b·out[0] (K even)


def reuse_table(dtype=torch.float32, device="cpu"):
    dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.tensor([REUSE] * CALLS, dtype=dtype, device=device)


def exact_step(raw, w, basis, tables, rows, out):
    """Call K of `tables` in float64 from the stored (rounded) inputs, with the float32 coefficients."""
    batch = basis.shape[1]
    b64 = basis.double()
    coef = torch.as_tensor(tables.coef).float().double()
    gcoef = torch.as_tensor(tables.gcoef).float().double()
    a, b_ = (torch.tensor(c).float().double() for c in REUSE)
    g = a * out[1].double() + b_ * out[0].double() if out is not None else torch.zeros_like(b64[0])
    r = rows.tolist() if rows is not None else list(range(batch))
    half = raw.shape[0] // (2 if w is not None else 1)
    for b in range(batch):
        if r[b] < 0:
            continue
        u = raw[r[b]].double()
        g[b] = u if w is None else u + w[b].double() * (raw[half + r[b]].double() - u)
    want = b64.clone()
    for i in range(2):
        d = int(tables.dst[K, i])
        value = gcoef[K, i] * g
        for j, s in enumerate(tables.src[K, i]):
            if s >= 0:
                value = value + coef[K, i, j] * b64[s]
        want[d] = value
    stat = (want[int(tables.dst[K, 1])] - b64[0]).abs().reshape(batch, -1).mean(1)
    return want, g, stat


def step_inputs(batch, shape, ncols, dtype, guided, skip, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tables = synthetic_program(ncols, seed)
    basis = torch.randn(tables.num_rows, batch, *shape, generator=gen).to(dtype)
    rows = out = None
    computed = list(range(batch))
    if skip:
        computed = [b for b in range(batch) if b % 2 == 0]  # odd samples skip their call
        rows = torch.full((batch,), -1, dtype=torch.int32)
        for r, b in enumerate(computed):
            rows[b] = r
        out = torch.randn(2, batch, *shape, generator=gen).to(dtype)
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
            K,
            raw.to(DEVICE),
            None if w is None else w.to(DEVICE),
            b,
            tables,
            rows=None if rows is None else rows.to(DEVICE),
            out=o,
            stat=stat,
            reuse=None if o is None else reuse_table(dtype, DEVICE),
            impl=which,
        )
        results[which] = (b.cpu(), None if o is None else o.cpu(), stat.cpu())
    (ref_b, ref_o, ref_s), (got_b, got_o, got_s) = results["torch"], results[impl]
    scale = want.abs().max().item()
    floor = torch.finfo(dtype).eps * scale
    ref_err = (ref_b.double() - want).abs().max().item()
    assert (got_b.double() - want).abs().max().item() <= 2 * ref_err + floor
    assert ref_err <= torch.finfo(dtype).eps * scale * 4  # the reference itself rounds once
    # untouched rows stay untouched; out[0] (k % 2) receives every sample's g (skipped ones: the
    # skip row's prediction from both outputs), out[1] keeps g_{k−1}
    written = set(tables.dst[K].tolist())
    for r in range(tables.num_rows):
        if r not in written:
            assert torch.equal(got_b[r], basis[r])
    if out is not None:
        assert torch.equal(got_o[1], out[1])
        assert (got_o[0].double() - g).abs().max().item() <= 2 * (ref_o[0].double() - g).abs().max().item() + floor
    # the statistic is over the stored (rounded) next input, summed in float32
    for stored, stat in ((ref_b, ref_s), (got_b, got_s)):
        exact = (stored[int(tables.dst[K, 1])].double() - basis[0].double()).abs().reshape(batch, -1).mean(1)
        assert torch.allclose(stat.double(), exact, rtol=1e-5, atol=1e-7 * scale)
    assert torch.allclose(got_s.double(), want_stat, rtol=4 * torch.finfo(dtype).eps)


# ---------------------------------------------------------------- bad input


def _basic(dtype=torch.float32):
    tables, basis, raw, w, rows, out = step_inputs(3, (3, 5, 7), 2, dtype, True, False)
    return tables, basis, raw, w


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: {**a, "raw": a["raw"].half()}, "model output is float16 but the basis is float32"),
        (lambda a: {**a, "raw": a["raw"].to("meta")}, "model output is on meta"),
        (lambda a: {**a, "raw": a["raw"][:5]}, "even batch"),
        (lambda a: {**a, "raw": a["raw"][:4]}, "holds 2 samples"),
        (lambda a: {**a, "guidance": a["guidance"][:2]}, "one w per sample"),
        (lambda a: {**a, "rows": torch.tensor([0, -1, 1], dtype=torch.int32), "raw": a["raw"][:4]}, "pass out="),
        (
            lambda a: {**a, "out": torch.zeros(2, 3, 3, 5, 7, dtype=torch.bfloat16), "reuse": reuse_table()},
            "out is bfloat16",
        ),
        (lambda a: {**a, "out": torch.zeros(3, 3, 5, 7)}, r"out must be a \[2, batch, \.\.\.\] buffer"),
        (
            lambda a: {
                **a,
                "rows": torch.tensor([0, -1, 1], dtype=torch.int32),
                "raw": a["raw"][:4],
                "out": torch.zeros(2, 3, 3, 5, 7),
                "reuse": reuse_table(),
                "k": 1,
            },
            "call 1 cannot be skipped: a skipped call's output is predicted from the two outputs before it",
        ),
        (lambda a: {**a, "out": torch.zeros(2, 3, 3, 5, 7)}, "out= needs reuse="),
        (lambda a: {**a, "out": torch.zeros(2, 3, 3, 5, 7), "reuse": torch.zeros(2, 2)}, "out= needs reuse="),
        (lambda a: {**a, "out": torch.zeros(2, 2, 3, 5, 7), "reuse": reuse_table()}, "out must hold the batch of 3"),
        (lambda a: {**a, "basis": a["basis"][:, :, :2].contiguous()}, "model output has latent shape"),
        (lambda a: {**a, "k": CALLS}, f"call {CALLS} outside the plan's {CALLS} calls"),
        (lambda a: {**a, "impl": "cuda"}, "impl must be"),
        (lambda a: {**a, "program": None}, "program must be a fastdiff.program.Program"),
    ],
)
def test_bad_arguments_are_named(mutate, message):
    tables, basis, raw, w = _basic()
    args = {"k": K, "raw": raw, "guidance": w, "basis": basis, "program": tables, "impl": "torch"}
    args = mutate(args)
    before = basis.clone()
    with pytest.raises((ValueError, IndexError, TypeError), match=message):
        fused_step(args.pop("k"), args.pop("raw"), args.pop("guidance"), args.pop("basis"), args.pop("program"), **args)
    assert torch.equal(basis, before)  # nothing was written


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    if not triton_step.available():
        pytest.skip(str(triton_step.why_unavailable()))
    tables, basis, raw, w = _basic()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fused_step(0, raw, w, basis, tables, impl="triton")
