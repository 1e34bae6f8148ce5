"""The fused sampling step: all non-UNet work of one call of a recurrent program, in one pass.

Per call k the executor has the UNet's raw output (the 2×batch [unconditional; conditional]
output under classifier-free guidance) and a basis buffer holding the program's live latents,
one row per slot. One pass over the latent:

  (a) g = u + w_b·(c − u)            the guided output, w per sample (or the raw output as is);
  (b) basis[out] = g + s·x            the output's basis slot (omitted when nothing keeps it);
  (c) basis[next] = γ·g + Σ_j c_j·basis[j]   the next model input over the live columns;
  (d) stat_b = mean|x^(k+1) − x^(k)|  the AdaptiveDiffusion gate statistic, float32.

The per-call programs of `fastdiff.recurrent` (an optional in-place conversion of the output,
then one combination) are rewritten over (g, the slots as they were before the call), so each
call is at most two rows of a coefficient table. The tables live on the device: the kernel
reads its row from them, so a new plan needs no recompilation and the step can sit inside a
CUDA graph. Arithmetic is float32 whatever the storage dtype (float64 for float64 latents) and
each result is rounded once when stored.

Skipping (the gate): ``rows[b] = -1`` marks a sample whose call was skipped; its g is read
from ``out`` (the previous guided output, a basis alias: nothing is copied); computed samples
read row rows[b] of a compacted raw output and store their g into ``out``.

Two implementations with one API: `fused_step(..., impl="torch")` (this module, the reference)
and `impl="triton"` (`fastdiff.ops.triton_step`), tested against each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..recurrent import X_T_SLOT, RecurrentPlan

MIN_WIDTH = 8  # table width (columns per row) is a multiple of this: few distinct kernel variants


class StepTableError(ValueError):
    """A recurrent program cannot be written as fused-step tables (e.g. it reads a freed slot)."""


@dataclass(frozen=True)
class StepTables:
    """Host (numpy) tables of a recurrent program; `on(device, dtype)` puts them on a device.

    Basis row r holds slot r + 1 (slot 0 is the caller's x_T, read only by the init op).
    dst[k, i]: basis row written by row i of call k (-1: none); row 0 is the output's own slot,
    row 1 the next model input. src/coef[k, i, j]: the columns and their coefficients (src -1 =
    unused), gcoef[k, i]: the coefficient of g. x_row[k]: the model input of call k.
    """

    num_rows: int
    width: int
    dst: np.ndarray  # int32 [N, 2]
    src: np.ndarray  # int32 [N, 2, width]
    coef: np.ndarray  # float64 [N, 2, width]
    gcoef: np.ndarray  # float64 [N, 2]
    x_row: np.ndarray  # int32 [N]
    init_row: int
    init_coef: float
    result_row: int

    @property
    def num_steps(self) -> int:
        return int(self.dst.shape[0])

    def to_dict(self) -> dict:
        """The tables as plain JSON values (the ``"program"`` field of a plan file, read by the
        C++ runtime); floats are written with repr, so they read back bit for bit."""
        return {
            "num_rows": int(self.num_rows),
            "width": int(self.width),
            "init_row": int(self.init_row),
            "init_coef": float(self.init_coef),
            "result_row": int(self.result_row),
            "x_row": [int(r) for r in self.x_row],
            "dst": self.dst.tolist(),
            "src": self.src.tolist(),
            "coef": self.coef.tolist(),
            "gcoef": self.gcoef.tolist(),
        }

    def on(self, device, dtype: torch.dtype = torch.float32) -> DeviceTables:
        coef_dtype = torch.float64 if dtype == torch.float64 else torch.float32

        def put(a, dt):
            return torch.as_tensor(np.ascontiguousarray(a)).to(device=device, dtype=dt)

        return DeviceTables(
            host=self,
            dst=put(self.dst, torch.int32),
            src=put(self.src, torch.int32),
            coef=put(self.coef, coef_dtype),
            gcoef=put(self.gcoef, coef_dtype),
            x_row=put(self.x_row, torch.int32),
        )


@dataclass(frozen=True)
class DeviceTables:
    host: StepTables
    dst: torch.Tensor
    src: torch.Tensor
    coef: torch.Tensor
    gcoef: torch.Tensor
    x_row: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.dst.device


def step_tables(program: RecurrentPlan) -> StepTables:
    """Rewrite a recurrent program as fused-step tables, checking that every op reads only live
    slots (written earlier and not yet released)."""
    if not isinstance(program, RecurrentPlan):
        raise TypeError(f"step_tables needs a RecurrentPlan, got {type(program).__name__}")
    n = len(program.steps)

    def row(slot: int, where: str) -> int:
        if not 0 < slot < program.num_slots:
            raise StepTableError(f"{where}: slot {slot} is outside 1..{program.num_slots - 1}")
        return slot - 1

    if program.init.srcs != (X_T_SLOT,):
        raise StepTableError(f"the init op must read x_T (slot {X_T_SLOT}) only, got slots {program.init.srcs}")
    live = {program.init.dst: "init"}
    freed: dict[int, int] = {}
    rows_per_step = []
    for k, step in enumerate(program.steps):

        def check_live(slot: int, what: str) -> None:
            if slot not in live:
                when = f"released after call {freed[slot]}" if slot in freed else "never written"
                raise StepTableError(f"call {k}: {what} reads slot {slot}, which is {when} (a freed basis column)")

        check_live(step.input_slot, "the model input")
        if step.output_slot in live:
            raise StepTableError(f"call {k}: the model output goes to slot {step.output_slot}, which is still live")
        # Each slot's value as a combination of g (key None) and the slots before the call.
        expr: dict[int, dict] = {step.output_slot: {None: 1.0}}
        written: list[int] = []
        for op in step.ops:
            total: dict = {}
            for s, c in zip(op.srcs, op.coefs):
                if s not in expr:
                    check_live(s, "an op")
                for key, value in expr.get(s, {s: 1.0}).items():
                    total[key] = total.get(key, 0.0) + float(c) * value
            expr[op.dst] = total
            if op.dst not in written:
                written.append(op.dst)
            live.setdefault(op.dst, k)
        live[step.output_slot] = k
        for s in step.release:
            if s not in live:
                raise StepTableError(f"call {k}: releases slot {s}, which is not live")
            del live[s]
            freed[s] = k
        if step.next_slot not in live:
            raise StepTableError(f"call {k}: the next model input (slot {step.next_slot}) is not live after the call")
        extra = [s for s in written if s not in (step.output_slot, step.next_slot) and s in live]
        if extra:
            raise StepTableError(f"call {k}: writes slots {extra} besides the output and the next input")
        out_row = None
        if step.output_slot in live and step.output_slot != step.next_slot:
            out_row = (row(step.output_slot, f"call {k}"), expr[step.output_slot])
        next_expr = expr.get(step.next_slot, {step.next_slot: 1.0})
        rows_per_step.append(
            (row(step.input_slot, f"call {k}"), out_row, (row(step.next_slot, f"call {k}"), next_expr))
        )

    terms = [len([key for key in e if key is not None]) for _, out_row, (_, e) in rows_per_step]
    terms += [len([key for key in out_row[1] if key is not None]) for _, out_row, _ in rows_per_step if out_row]
    width = max(terms + [1])
    width = -(-width // MIN_WIDTH) * MIN_WIDTH
    dst = np.full((n, 2), -1, dtype=np.int32)
    src = np.full((n, 2, width), -1, dtype=np.int32)
    coef = np.zeros((n, 2, width))
    gcoef = np.zeros((n, 2))
    x_row = np.zeros(n, dtype=np.int32)
    for k, (xr, out_row, next_row) in enumerate(rows_per_step):
        x_row[k] = xr
        for i, entry in enumerate((out_row, next_row)):
            if entry is None:
                continue
            dst[k, i], e = entry
            gcoef[k, i] = e.get(None, 0.0)
            for j, (slot, c) in enumerate((s, c) for s, c in e.items() if s is not None):
                src[k, i, j] = row(slot, f"call {k}")
                coef[k, i, j] = c
    return StepTables(
        num_rows=program.num_slots - 1,
        width=width,
        dst=dst,
        src=src,
        coef=coef,
        gcoef=gcoef,
        x_row=x_row,
        init_row=row(program.init.dst, "init"),
        init_coef=float(program.init.coefs[0]),
        result_row=row(program.result_slot, "result"),
    )


def _check(k, raw, guidance, basis, tables, rows, out, stat):
    """Shapes, dtypes and devices of a fused step's arguments; returns (batch, computed)."""
    if not isinstance(tables, DeviceTables):
        raise TypeError("fused_step: tables must be DeviceTables (StepTables.on(device, dtype))")
    if not 0 <= k < tables.host.num_steps:
        raise IndexError(f"fused_step: call {k} outside the plan's {tables.host.num_steps} calls")
    if basis.dim() < 3 or basis.shape[0] != tables.host.num_rows or not basis.is_contiguous():
        raise ValueError(
            f"fused_step: basis must be a contiguous [{tables.host.num_rows}, batch, ...] buffer, "
            f"got {tuple(basis.shape)}"
        )
    batch = basis.shape[1]
    for name, t in (("model output", raw), ("out", out)):
        if t is None:
            continue
        if t.device != basis.device:
            raise ValueError(f"fused_step: the {name} is on {t.device} but the basis is on {basis.device}")
        if t.dtype != basis.dtype:
            raise ValueError(
                f"fused_step: the {name} is {str(t.dtype).replace('torch.', '')} but the basis is "
                f"{str(basis.dtype).replace('torch.', '')}; cast one to the other first"
            )
        if t.shape[1:] != basis.shape[2:]:
            raise ValueError(
                f"fused_step: the {name} has latent shape {tuple(t.shape[1:])}, the basis {tuple(basis.shape[2:])}"
            )
    if tables.device != basis.device:
        raise ValueError(f"fused_step: the tables are on {tables.device} but the basis is on {basis.device}")
    factor = 1 if guidance is None else 2
    if raw.shape[0] % factor:
        raise ValueError(f"fused_step: a guided output needs an even batch [uncond; cond], got {raw.shape[0]}")
    computed = raw.shape[0] // factor
    if rows is None:
        if computed != batch:
            raise ValueError(
                f"fused_step: the model output holds {computed} samples"
                + (" (after splitting uncond/cond)" if factor == 2 else "")
                + f" for a batch of {batch}; pass rows= for a compacted batch"
            )
    else:
        if rows.shape != (batch,) or rows.dtype != torch.int32 or rows.device != basis.device:
            raise ValueError(f"fused_step: rows must be int32 [{batch}] on {basis.device}")
        if out is None:
            raise ValueError("fused_step: skipped samples (rows = -1) read the previous output: pass out=")
    if out is not None and out.shape[0] != batch:
        raise ValueError(f"fused_step: out must hold the batch of {batch}, got {out.shape[0]}")
    if guidance is not None and (guidance.shape != (batch,) or guidance.device != basis.device):
        raise ValueError(f"fused_step: guidance must be a [{batch}] tensor on {basis.device} (one w per sample)")
    if stat is not None and (stat.shape != (batch,) or stat.dtype != torch.float32 or stat.device != basis.device):
        raise ValueError(f"fused_step: stat must be float32 [{batch}] on {basis.device}")
    return batch, computed


def fused_step_reference(k, raw, guidance, basis, tables, rows=None, out=None, stat=None) -> None:
    """The torch reference of `fused_step` (same arguments); it reads `rows` on the host (a
    sync) when some samples skip, and never otherwise."""
    batch = basis.shape[1]
    acc = torch.float64 if basis.dtype == torch.float64 else torch.float32
    if guidance is None:
        computed_g = raw.to(acc)
    else:
        half = raw.shape[0] // 2
        u, c = raw[:half].to(acc), raw[half:].to(acc)
        computed_g = None
    if rows is None:
        index = torch.arange(batch, device=basis.device)
        source = index
    else:
        host_rows = rows.tolist()
        index = torch.tensor([b for b, r in enumerate(host_rows) if r >= 0], dtype=torch.long, device=basis.device)
        source = torch.tensor([r for r in host_rows if r >= 0], dtype=torch.long, device=basis.device)
    if guidance is not None:
        w = guidance.to(acc)[index].reshape(-1, *[1] * (raw.dim() - 1))
        computed_g = u[source] + w * (c[source] - u[source])
    else:
        computed_g = computed_g[source]
    g = out.to(acc) if out is not None else torch.empty(basis.shape[1:], dtype=acc, device=basis.device)
    g[index] = computed_g
    if out is not None:
        out[index] = computed_g.to(out.dtype)
    # The table's layout comes from its host copy: without skipping nothing here syncs.
    dst, src = tables.host.dst[k].tolist(), tables.host.src[k].tolist()
    coef, gcoef = tables.coef[k].to(acc), tables.gcoef[k].to(acc)
    x = basis[int(tables.host.x_row[k])].to(acc, copy=True)  # the next input may overwrite it
    for i in range(2):
        if dst[i] < 0:
            continue
        value = gcoef[i] * g
        for j, s in enumerate(src[i]):
            if s >= 0:
                value = value + coef[i, j] * basis[s].to(acc)
        basis[dst[i]] = value.to(basis.dtype)
    if stat is not None:
        new = basis[dst[1]].to(acc)
        stat.copy_((new - x).abs().reshape(batch, -1).mean(dim=1))


def resolve_impl(impl: str, device) -> str:
    """ "auto" -> "triton" on a CUDA device when Triton is installed, else "torch"."""
    if impl == "auto":
        from . import triton_step

        return "triton" if torch.device(device).type == "cuda" and triton_step.available() else "torch"
    if impl not in ("torch", "triton"):
        raise ValueError(f"fused_step: impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    return impl


def fused_step(
    k: int,
    raw: torch.Tensor,
    guidance: torch.Tensor | None,
    basis: torch.Tensor,
    tables: DeviceTables,
    *,
    rows: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    stat: torch.Tensor | None = None,
    partials: torch.Tensor | None = None,
    impl: str = "auto",
) -> None:
    """Run call k's non-UNet work: guidance, the output's slot, the next input, the gate statistic.

    raw: the model output for the computed samples, [B', ...] (guidance None) or [2B', ...] =
    [uncond; cond]. guidance: float32 [B] weights w (g = u + w·(c − u)) or None. basis: the
    [rows, B, ...] slot buffer (updated in place). rows: int32 [B], sample b's row in raw or -1
    for a skipped call (then out is required and holds its previous g). out: [B, ...] buffer of
    the guided output (written for computed samples). stat: float32 [B] output, mean|x^(k+1) −
    x^(k)| per sample. partials (Triton only): float32 [B, blocks] per-block sums of the same,
    for the gate's decision kernel. impl: "torch", "triton" or "auto" (Triton on a GPU when it
    is installed).
    """
    _check(k, raw, guidance, basis, tables, rows, out, stat)
    impl = resolve_impl(impl, basis.device)
    if impl == "torch":
        if partials is not None:
            raise ValueError("fused_step: partials= is the Triton kernel's output; the torch reference writes stat=")
        return fused_step_reference(k, raw, guidance, basis, tables, rows=rows, out=out, stat=stat)
    from . import triton_step  # impl == "triton"

    return triton_step.fused_step(k, raw, guidance, basis, tables, rows=rows, out=out, stat=stat, partials=partials)
