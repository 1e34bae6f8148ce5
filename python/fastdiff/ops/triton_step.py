"""Triton kernels of the fused sampling step and of the gate's decision (see `fastdiff.ops.step`).

`fused_step` is one launch per call: a grid of (blocks of the per-sample latent) × (batch);
every program loads its block of the model output(s), the input latent and the table's columns
once, stores the output's slot and the next input, and writes one partial sum of |x^(k+1) − x^(k)|.
`gate_decide` is the one tiny follow-up kernel when the AdaptiveDiffusion gate is on: per
decision group, it reduces the partials to d_k and applies the third-order rule of
`fastdiff.gate.GateSpec.decide` (whether the call is `active` is decided on the host, by the
same GateSpec), keeping d_{k−1}, d_{k−2} and the consecutive-skip count on the device.

On a machine without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1), which
is how the CPU test suite holds them to the torch reference; the interpreter does not specialise
arguments, so `fastdiff.ops.triton_aot` compiles every variant the launches below can produce
ahead of time (sm_80, sm_90) to hold the compiled kernels to the same code.

Every launch goes through `step_launch` / `gate_launch`: they turn the op's arguments into the
kernel's grid, arguments and constexprs, and the ahead-of-time check enumerates its variants
through the same two functions.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

BLOCK = 1024  # elements of one sample per program
STEP_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # latents the step runs on
# Triton specialises an integer argument on its value: 1 becomes a constexpr, a multiple of 16 an
# alignment hint. The call index k changes every call, so specialising on it would compile three
# kernels where one does; every other integer is fixed for a whole sampling run.
JIT_OPTIONS = {"fused_step": {"do_not_specialize": ["k"]}, "gate": {}}

try:  # Triton ships with CUDA builds of torch; CPU builds may not have it.
    import triton
    import triton.language as tl

    _IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the installation
    triton = tl = None
    _IMPORT_ERROR = exc


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available() -> bool:
    """True when the kernels can run: Triton is installed (on a GPU, or interpreted on the CPU)."""
    return triton is not None


def why_unavailable() -> str | None:
    if triton is None:
        return f"Triton is not installed ({_IMPORT_ERROR}); it ships with CUDA builds of torch"
    return None


if triton is not None:

    @triton.jit(**JIT_OPTIONS["fused_step"])
    def _fused_step_kernel(
        raw_ptr,
        w_ptr,
        basis_ptr,
        out_ptr,
        rows_ptr,
        part_ptr,
        dst_ptr,
        src_ptr,
        coef_ptr,
        gcoef_ptr,
        x_row_ptr,
        reuse_ptr,
        k,
        n,
        batch,
        computed,
        nblocks,
        HAS_W: tl.constexpr,
        HAS_ROWS: tl.constexpr,
        HAS_OUT: tl.constexpr,
        HAS_STAT: tl.constexpr,
        WIDTH: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = tl.program_id(1)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        # An integer argument equal to 1 arrives as a constexpr (a Python int), not a tensor: cast
        # it with tl.cast, never .to (triton_aot compiles every such variant).
        slot_stride = tl.cast(batch, tl.int64) * n
        sample = b.to(tl.int64) * n + offs
        acc_ty = tl.float64 if basis_ptr.dtype.element_ty == tl.float64 else tl.float32
        if HAS_ROWS:
            r = tl.load(rows_ptr + b)
        else:
            r = b
        if r >= 0:
            u = tl.load(raw_ptr + r.to(tl.int64) * n + offs, mask=mask, other=0.0).to(acc_ty)
            if HAS_W:
                c = tl.load(raw_ptr + (computed + r).to(tl.int64) * n + offs, mask=mask, other=0.0).to(acc_ty)
                w = tl.load(w_ptr + b).to(acc_ty)
                g = u + w * (c - u)
            else:
                g = u
        else:
            # Skipped: the skip row a·g_{k−1} + b·g_{k−2}, from out[(k+1) % 2] and out[k % 2].
            a = tl.load(reuse_ptr + 2 * k).to(acc_ty)
            bb = tl.load(reuse_ptr + 2 * k + 1).to(acc_ty)
            last = tl.load(out_ptr + ((k + 1) % 2) * slot_stride + sample, mask=mask, other=0.0).to(acc_ty)
            older = tl.load(out_ptr + (k % 2) * slot_stride + sample, mask=mask, other=0.0).to(acc_ty)
            g = a * last + bb * older
        if HAS_OUT:
            tl.store(out_ptr + (k % 2) * slot_stride + sample, g.to(out_ptr.dtype.element_ty), mask=mask)
        x_row = tl.load(x_row_ptr + k)
        x = tl.load(basis_ptr + x_row.to(tl.int64) * slot_stride + sample, mask=mask, other=0.0).to(acc_ty)
        new = x
        for i in tl.static_range(2):
            d = tl.load(dst_ptr + 2 * k + i)
            if d >= 0:
                value = tl.load(gcoef_ptr + 2 * k + i).to(acc_ty) * g
                for j in tl.static_range(WIDTH):
                    s = tl.load(src_ptr + (2 * k + i) * WIDTH + j)
                    if s >= 0:
                        cj = tl.load(coef_ptr + (2 * k + i) * WIDTH + j).to(acc_ty)
                        v = tl.load(basis_ptr + s.to(tl.int64) * slot_stride + sample, mask=mask, other=0.0)
                        value += cj * v.to(acc_ty)
                stored = value.to(basis_ptr.dtype.element_ty)
                tl.store(basis_ptr + d.to(tl.int64) * slot_stride + sample, stored, mask=mask)
                if i == 1:
                    new = stored.to(acc_ty)
        if HAS_STAT:
            diff = tl.where(mask, tl.abs(new - x), 0.0).to(tl.float32)
            tl.store(part_ptr + b * nblocks + pid, tl.sum(diff, axis=0))

    @triton.jit(**JIT_OPTIONS["gate"])
    def _gate_kernel(
        part_ptr,
        d1_ptr,
        d2_ptr,
        run_ptr,
        flag_ptr,
        nblocks,
        n,
        active,
        delta,
        max_skips,
        refresh,
        RBLOCK: tl.constexpr,
    ):
        b = tl.program_id(0)
        idx = tl.arange(0, RBLOCK)  # RBLOCK >= nblocks: one load per sample
        d = tl.sum(tl.load(part_ptr + b * nblocks + idx, mask=idx < nblocks, other=0.0), axis=0) / n
        d1 = tl.load(d1_ptr + b)
        d2 = tl.load(d2_ptr + b)
        run = tl.load(run_ptr + b)
        third = tl.abs(d - 2.0 * d1 + d2)
        may = tl.where(run > 0, run < max_skips, (run <= -refresh) & (max_skips > 0))  # GateSpec.decide
        skip = (active != 0) & (third <= 2.0 * delta * d1) & may
        made = tl.maximum(tl.minimum(run, 0) - 1, -refresh)
        tl.store(d2_ptr + b, d1)
        tl.store(d1_ptr + b, d)
        tl.store(run_ptr + b, tl.where(skip, tl.maximum(run, 0) + 1, made))
        tl.store(flag_ptr + b, skip.to(tl.int8))


def _require() -> None:
    if triton is None:
        raise RuntimeError(f"fused_step: the Triton kernels need Triton: {why_unavailable()}")


def _on_device(*tensors: torch.Tensor) -> None:
    """Triton launches on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    device = tensors[0].device
    if device.type == "cpu" and not interpreted():
        raise RuntimeError(
            "fused_step: the Triton kernels need CUDA tensors (CPU tensors run only with TRITON_INTERPRET=1); "
            "use impl='torch' on the CPU"
        )


def num_blocks(basis: torch.Tensor) -> int:
    n = basis[0, 0].numel()
    return -(-n // BLOCK)


class Launch(NamedTuple):
    """One launch of a kernel: `KERNELS[kernel][grid](*args, **constexprs)`."""

    kernel: str  # "fused_step" or "gate", the key of KERNELS and JIT_OPTIONS
    grid: tuple[int, ...]
    args: tuple  # the runtime arguments, in the kernel's order
    constexprs: dict

    def __call__(self) -> None:
        KERNELS[self.kernel][self.grid](*self.args, **self.constexprs)


def step_launch(k, raw, guidance, basis, program, rows=None, out=None, partials=None, reuse=None) -> Launch:
    """The fused-step kernel's launch for call k (arguments as in `fused_step`; `partials`, the
    per-block sums, is given exactly when the statistic is wanted)."""
    tables = program.tables(basis.device, basis.dtype)
    batch, n, nblocks = basis.shape[1], basis[0, 0].numel(), num_blocks(basis)
    computed = raw.shape[0] // (1 if guidance is None else 2)
    dummy = basis  # placeholder pointer for absent optional arguments (never read)
    w = guidance.to(tables.coef.dtype).contiguous() if guidance is not None else dummy
    args = (
        raw.contiguous(),
        w,
        basis,
        out if out is not None else dummy,
        rows if rows is not None else dummy,
        partials if partials is not None else dummy,
        tables.dst,
        tables.src,
        tables.coef,
        tables.gcoef,
        tables.x_row,
        reuse if reuse is not None else tables.coef,
        k,
        n,
        batch,
        computed,
        nblocks,
    )
    constexprs = {
        "HAS_W": guidance is not None,
        "HAS_ROWS": rows is not None,
        "HAS_OUT": out is not None,
        "HAS_STAT": partials is not None,
        "WIDTH": program.width,
        "BLOCK": BLOCK,
    }
    return Launch("fused_step", (nblocks, batch), args, constexprs)


def gate_launch(partials, n, d1, d2, run, flags, *, active: bool, delta: float, max_skips: int, refresh: int) -> Launch:
    """The gate kernel's launch (arguments as in `gate_decide`)."""
    groups, nblocks = partials.shape
    rblock = max(16, triton.next_power_of_2(nblocks))
    args = (partials, d1, d2, run, flags, nblocks, n, int(active), float(delta), int(max_skips), int(refresh))
    return Launch("gate", (groups,), args, {"RBLOCK": rblock})


def fused_step(k, raw, guidance, basis, program, rows=None, out=None, stat=None, partials=None, reuse=None) -> None:
    """Triton implementation of `fastdiff.ops.step.fused_step` (arguments checked there).

    partials: optional float32 [B, num_blocks(basis)] buffer for the per-block sums of
    |x^(k+1) − x^(k)| (the gate's decision kernel reduces them); with stat instead, they are
    reduced here with torch.
    """
    _require()
    _on_device(basis)
    if basis.dtype not in STEP_DTYPES:
        raise ValueError(f"fused_step: the Triton step supports float16/bfloat16/float32/float64, got {basis.dtype}")
    batch, nblocks = basis.shape[1], num_blocks(basis)
    if stat is not None and partials is None:
        partials = torch.empty(batch, nblocks, dtype=torch.float32, device=basis.device)
    if partials is not None and (partials.shape != (batch, nblocks) or partials.dtype != torch.float32):
        raise ValueError(f"fused_step: partials must be float32 [{batch}, {nblocks}]")
    step_launch(k, raw, guidance, basis, program, rows=rows, out=out, partials=partials, reuse=reuse)()
    if stat is not None:
        stat.copy_(partials.sum(dim=1) / basis[0, 0].numel())


def gate_decide(partials, n, d1, d2, run, flags, *, active: bool, delta: float, max_skips: int, refresh: int) -> None:
    """Reduce the step's partial sums to d_k and apply the rule (`GateSpec.decide`; refresh =
    GateSpec.refresh); updates d1, d2, run in place and writes flags (int8 [B], 1 = skip the next
    call)."""
    _require()
    _on_device(partials)
    gate_launch(partials, n, d1, d2, run, flags, active=active, delta=delta, max_skips=max_skips, refresh=refresh)()


KERNELS = {"fused_step": _fused_step_kernel, "gate": _gate_kernel} if triton is not None else {}
