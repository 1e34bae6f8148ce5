"""The fused sampling step: all non-UNet work of one call of a Program, in one pass.

Per call k a loop has the UNet's raw output (the 2×batch [unconditional; conditional] output
under classifier-free guidance) and a basis buffer holding the program's live latents, one row
per latent. One pass over the latent:

  (a) g = u + w_b·(c − u)            the guided output, w per sample (or the raw output as is);
  (b) basis[dst0] = γ0·g + Σ_j c_j·basis[j]   the output's row (omitted when nothing keeps it);
  (c) basis[dst1] = γ1·g + Σ_j c_j·basis[j]   the next model input over the live rows;
  (d) stat_b = mean|x^(k+1) − x^(k)|  the AdaptiveDiffusion gate statistic, float32.

Both rows read the values before the call; their coefficients come from the Program's tables
(`fastdiff.program`), which live on the device (`Program.tables`): the kernel reads call k's
rows from them, so a new plan needs no recompilation and the step can sit inside a CUDA graph.
Arithmetic is float32 whatever the storage dtype (float64 for float64 latents) and each result
is rounded once when stored.

Skipping (the gate): ``out`` [2, B, ...] holds each sample's last two guided outputs, call k's
g going to out[k % 2] (over g_{k−2}; nothing is ever copied between the two). ``rows[b] = -1``
marks a sample whose call was skipped: its g is predicted as reuse[k, 0]·out[(k+1) % 2] +
reuse[k, 1]·out[k % 2] = a·g_{k−1} + b·g_{k−2} (`Program.reuse_table`: extrapolation along the
plan's times, or (1, 0) to repeat the last output) and stored like a computed one; computed
samples read row rows[b] of a compacted raw output.

Two implementations with one API: `fused_step(..., impl="torch")` (this module, the reference)
and `impl="triton"` (`fastdiff.ops.triton_step`), tested against each other.
"""

from __future__ import annotations

import torch

from ..dtypes import compute_dtype, dtype_name
from ..program import Program


def _check(k, raw, guidance, basis, program, rows, out, stat, reuse=None):
    """Shapes, dtypes and devices of a fused step's arguments; returns (batch, computed)."""
    if not isinstance(program, Program):
        raise TypeError(f"fused_step: program must be a fastdiff.program.Program, got {type(program).__name__}")
    if not 0 <= k < program.num_steps:
        raise IndexError(f"fused_step: call {k} outside the plan's {program.num_steps} calls")
    if basis.dim() < 3 or basis.shape[0] != program.num_rows or not basis.is_contiguous():
        raise ValueError(
            f"fused_step: basis must be a contiguous [{program.num_rows}, batch, ...] buffer, got {tuple(basis.shape)}"
        )
    batch = basis.shape[1]
    if out is not None and (out.dim() != basis.dim() or out.shape[0] != 2):
        raise ValueError(
            f"fused_step: out must be a [2, batch, ...] buffer (the last two guided outputs), got {tuple(out.shape)}"
        )
    for name, t in (("model output", raw), ("out", None if out is None else out[0])):
        if t is None:
            continue
        if t.device != basis.device:
            raise ValueError(f"fused_step: the {name} is on {t.device} but the basis is on {basis.device}")
        if t.dtype != basis.dtype:
            raise ValueError(
                f"fused_step: the {name} is {dtype_name(t.dtype)} but the basis is {dtype_name(basis.dtype)}; "
                "cast one to the other first"
            )
        if t.shape[1:] != basis.shape[2:]:
            raise ValueError(
                f"fused_step: the {name} has latent shape {tuple(t.shape[1:])}, the basis {tuple(basis.shape[2:])}"
            )
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
            raise ValueError("fused_step: skipped samples (rows = -1) read the previous outputs: pass out=")
        if k < 2 and bool((rows < 0).any()):  # a host read, but only for calls 0 and 1
            raise ValueError(
                f"fused_step: call {k} cannot be skipped: a skipped call's output is predicted from the two outputs "
                "before it (out[(k+1) % 2], out[k % 2]), and call 0 and call 1 do not have two"
            )
    if out is not None:
        if out.shape[1] != batch:
            raise ValueError(f"fused_step: out must hold the batch of {batch}, got {out.shape[1]}")
        coef_dtype = compute_dtype(basis.dtype)
        if (
            not isinstance(reuse, torch.Tensor)
            or reuse.shape != (program.num_steps, 2)
            or reuse.dtype != coef_dtype
            or reuse.device != basis.device
        ):
            raise ValueError(
                f"fused_step: out= needs reuse=, the {dtype_name(coef_dtype)} [{program.num_steps}, 2] skip rows on "
                f"{basis.device} (Program.reuse_table)"
            )
    if guidance is not None and (guidance.shape != (batch,) or guidance.device != basis.device):
        raise ValueError(f"fused_step: guidance must be a [{batch}] tensor on {basis.device} (one w per sample)")
    if stat is not None and (stat.shape != (batch,) or stat.dtype != torch.float32 or stat.device != basis.device):
        raise ValueError(f"fused_step: stat must be float32 [{batch}] on {basis.device}")
    return batch, computed


def guide(u: torch.Tensor, c: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance g = u + w·(c − u), one weight per sample (row), computed as the
    fused step computes it: float32 (float64 for float64 outputs), one rounding per operation."""
    acc = compute_dtype(u.dtype)
    u = u.to(acc)
    return u + w.to(acc).reshape(-1, *[1] * (u.dim() - 1)) * (c.to(acc) - u)


def fused_step_reference(k, raw, guidance, basis, program, rows=None, out=None, stat=None, reuse=None) -> None:
    """The torch reference of `fused_step` (same arguments); it reads `rows` on the host (a
    sync) when some samples skip, and never otherwise."""
    batch = basis.shape[1]
    acc = compute_dtype(basis.dtype)
    if rows is None:
        index = torch.arange(batch, device=basis.device)
        source = index
    else:
        host_rows = rows.tolist()
        index = torch.tensor([b for b, r in enumerate(host_rows) if r >= 0], dtype=torch.long, device=basis.device)
        source = torch.tensor([r for r in host_rows if r >= 0], dtype=torch.long, device=basis.device)
    if guidance is None:
        computed_g = raw.to(acc)[source]
    else:
        half = raw.shape[0] // 2
        computed_g = guide(raw[:half][source], raw[half:][source], guidance[index])
    if out is not None:
        a, b = reuse[k].to(acc)  # the skip row: g_k = a·g_{k−1} + b·g_{k−2} (out[(k+1) % 2], out[k % 2])
        g = a * out[(k + 1) % 2].to(acc) + b * out[k % 2].to(acc)
    else:
        g = torch.empty(basis.shape[1:], dtype=acc, device=basis.device)
    g[index] = computed_g
    if out is not None:
        out[k % 2] = g.to(out.dtype)
    # The table's layout comes from the host copy: without skipping nothing here syncs.
    tables = program.tables(basis.device, basis.dtype)
    dst, src = program.dst[k].tolist(), program.src[k].tolist()
    coef, gcoef = tables.coef[k].to(acc), tables.gcoef[k].to(acc)
    x = basis[int(program.x_row[k])].to(acc, copy=True)  # the next input may overwrite it
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
    program: Program,
    *,
    rows: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    stat: torch.Tensor | None = None,
    partials: torch.Tensor | None = None,
    reuse: torch.Tensor | None = None,
    impl: str = "auto",
) -> None:
    """Run call k's non-UNet work: guidance, the output's slot, the next input, the gate statistic.

    raw: the model output for the computed samples, [B', ...] (guidance None) or [2B', ...] =
    [uncond; cond]. guidance: float32 [B] weights w (g = u + w·(c − u)) or None. basis: the
    [program.num_rows, B, ...] buffer of latents (updated in place). rows: int32 [B], sample b's row in raw or -1
    for a skipped call (then out is required). out: [2, B, ...] buffer of the last two guided
    outputs (call k's g is written to out[k % 2] for every sample). reuse: the [N, 2] skip rows
    (`Program.reuse_table`), required with out: a skipped sample's g = reuse[k, 0]·out[(k+1) % 2]
    + reuse[k, 1]·out[k % 2]. stat: float32 [B] output, mean|x^(k+1) −
    x^(k)| per sample. partials (Triton only): float32 [B, blocks] per-block sums of the same,
    for the gate's decision kernel. impl: "torch", "triton" or "auto" (Triton on a GPU when it
    is installed).
    """
    _check(k, raw, guidance, basis, program, rows, out, stat, reuse)
    impl = resolve_impl(impl, basis.device)
    if impl == "torch":
        if partials is not None:
            raise ValueError("fused_step: partials= is the Triton kernel's output; the torch reference writes stat=")
        return fused_step_reference(k, raw, guidance, basis, program, rows=rows, out=out, stat=stat, reuse=reuse)
    from . import triton_step  # impl == "triton"

    return triton_step.fused_step(
        k, raw, guidance, basis, program, rows=rows, out=out, stat=stat, partials=partials, reuse=reuse
    )
