"""The sampling loop: StepPlan + model function + x_T -> result, with no host<->device sync.

Every sampler runs through the same loop: call the model, put its output in a slot, run the
plan's precomputed linear combinations, release what the rest of the plan no longer needs.
Coefficients are host floats computed once (float64) before the loop, the call times are
copied to the device once, and nothing inside the loop reads device memory back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .ops import lincomb, lincomb_
from .plan import StepPlan
from .recurrent import X_T_SLOT, LinOp

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor], None]


class ModelOutputError(ValueError):
    """The model function returned something the plan cannot use."""


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def apply_op(slots: list, op: LinOp) -> None:
    """Run one LinOp of a recurrent program on a list of slot tensors (None = free slot)."""
    srcs = [slots[s] for s in op.srcs]
    if slots[op.dst] is None:
        slots[op.dst] = lincomb(srcs, op.coefs)
    else:
        lincomb_(slots[op.dst], srcs, op.coefs)


def _checked(out, shape: tuple, x: torch.Tensor, k: int, expected: str) -> torch.Tensor:
    """A model output of the given shape on x's device, cast to x's dtype; else ModelOutputError
    (`expected` completes the shape message)."""
    if not isinstance(out, torch.Tensor):
        raise ModelOutputError(f"model call {k} returned {type(out).__name__}, expected a torch.Tensor")
    if out.shape != shape:
        raise ModelOutputError(f"model call {k} returned shape {tuple(out.shape)}{expected}")
    if out.device != x.device:
        raise ModelOutputError(f"model call {k} returned a tensor on {out.device}, the latents are on {x.device}")
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _checked_raw(raw, rows: int, x: torch.Tensor, k: int) -> torch.Tensor:
    """A raw model output of `rows` rows for the fused step ([uncond; cond] under guidance)."""
    shape = (rows, *x.shape[1:])
    return _checked(raw, shape, x, k, f"; expected {shape} (the raw output, [uncond; cond] under guidance)")


def _adopt(out, x: torch.Tensor, k: int, slots: list) -> torch.Tensor:
    """The model output as a slot the executor may keep and update in place."""
    expected = f" for an input of shape {tuple(x.shape)}; the raw output must have the latent's shape"
    checked = _checked(out, x.shape, x, k, expected)
    if checked is not out:
        return checked  # a fresh buffer from the dtype cast
    live = {_storage(s) for s in slots if s is not None}
    if _storage(out) in live or out._base is not None:
        # Aliases a latent (e.g. an identity model) or a view of something the model keeps:
        # the executor writes into its slots, so it needs a buffer of its own.
        return out.clone()
    return out


def run(
    plan: StepPlan,
    model_fn: ModelFn,
    x_T: torch.Tensor,
    *,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Sample with `plan`: ``model_fn(x, t) -> raw output`` is called plan.nfe times.

    x_T: the initial noise, shape [batch, ...] (any floating dtype and device); it is not
    modified. t: float32 tensor of shape [batch] on x_T's device holding the plan's model time.
    The raw output must be the model's prediction (ε, v or x_0, as ``plan.prediction_type``)
    with guidance already applied, in x's shape.

    callback(k, t, x) runs after call k with the next model input (the result after the last
    call). x is the executor's own buffer and is updated in place later: clone it to keep it.
    Returns the plan's result (the final latent).
    """
    if not isinstance(plan, StepPlan):
        raise TypeError(f"plan must be a StepPlan, got {type(plan).__name__}")
    if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point() or x_T.dim() < 1:
        raise ValueError("x_T must be a floating-point tensor of shape [batch, ...]")
    program = plan.recurrent()
    batch = x_T.shape[0]
    # One host->device copy before the loop; row k is call k's time for every sample.
    times = torch.tensor(plan.times, dtype=torch.float32, device=x_T.device)
    times = times[:, None].expand(-1, batch).contiguous()

    slots: list = [None] * program.num_slots
    slots[X_T_SLOT] = x_T
    with torch.no_grad():
        apply_op(slots, program.init)
        slots[X_T_SLOT] = None  # the caller owns x_T; the plan never reads it again
        for k, step in enumerate(program.steps):
            # No local keeps the output: a released slot must free its latent before the next call.
            x = slots[step.input_slot]
            slots[step.output_slot] = _adopt(model_fn(x, times[k]), x, k, slots)
            for op in step.ops:
                apply_op(slots, op)
            for released in step.release:
                slots[released] = None
            if callback is not None:
                callback(k, times[k], slots[step.next_slot])
        return slots[program.result_slot]


RawFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass
class FusedRun:
    latents: torch.Tensor  # the plan's result
    nfe: list[int]  # model calls made for each sample
    unet_calls: int  # batched model invocations (a compacted batch counts once)
    skipped: list[list[int]]  # per sample, the calls that were skipped


class FusedState:
    """What the fused loop needs besides the model, prepared once per (plan, x_T shape, dtype,
    device): the device step tables, the call times, the basis buffer, the guidance weights.

    `loop` is the ungated loop: device work only (no host reads, no host->device copies, no
    allocation that depends on data), so it can be captured into one CUDA graph whole.
    """

    def __init__(self, plan: StepPlan, x_T: torch.Tensor, *, guidance=None, impl: str = "auto"):
        from .ops.step import resolve_impl

        if not isinstance(plan, StepPlan):
            raise TypeError(f"plan must be a StepPlan, got {type(plan).__name__}")
        if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point() or x_T.dim() < 1:
            raise ValueError("x_T must be a floating-point tensor of shape [batch, ...]")
        self.impl = resolve_impl(impl, x_T.device)
        self.host = plan.step_tables()
        self.tables = self.host.on(x_T.device, x_T.dtype)
        batch, device = x_T.shape[0], x_T.device
        if guidance is not None:
            w_dtype = torch.float64 if x_T.dtype == torch.float64 else torch.float32
            guidance = torch.as_tensor(guidance, dtype=w_dtype, device=device).reshape(-1).expand(batch).contiguous()
        self.guidance = guidance
        times = torch.tensor(plan.times, dtype=torch.float32, device=device)
        self.times = times[:, None].expand(-1, batch).contiguous()
        self.basis = torch.empty((self.host.num_rows, *x_T.shape), dtype=x_T.dtype, device=device)

    def loop(self, raw_fn: RawFn, x_T: torch.Tensor, *, guidance=None, callback: Callback | None = None):
        """Run every call with the fused step; returns the result row of the basis (a view: it
        is overwritten by the next loop). guidance: float32 [B] weights replacing the prepared
        ones (a graph's static input), or None to use them."""
        from .ops.step import fused_step

        host, basis = self.host, self.basis
        w = self.guidance if guidance is None else guidance
        torch.mul(x_T, host.init_coef, out=basis[host.init_row])
        rows_out = x_T.shape[0] * (1 if w is None else 2)
        with torch.no_grad():
            for k in range(host.num_steps):
                x = basis[int(host.x_row[k])]
                raw = raw_fn(x, self.times[k], None)
                raw = _checked_raw(raw, rows_out, x, k)
                fused_step(k, raw, w, basis, self.tables, impl=self.impl)
                if callback is not None:
                    callback(k, self.times[k], basis[int(host.dst[k, 1])])
        return basis[host.result_row]


def run_fused(
    plan: StepPlan,
    raw_fn: RawFn,
    x_T: torch.Tensor,
    *,
    guidance: torch.Tensor | None = None,
    gate=None,
    per_sample: bool | None = None,
    impl: str = "auto",
    callback: Callback | None = None,
) -> FusedRun:
    """Sample with `plan` using the fused step (`fastdiff.ops.fused_step`) after every model call.

    raw_fn(x, t, index) -> the raw model output for the samples `index` (a long tensor of
    sample indices, or None for the whole batch): [len, ...] without guidance, or
    [2·len, ...] = [unconditional; conditional] with guidance (float32 [B] weights w).

    gate: an `AdaptiveGate` (or None). Its decisions are per sample (per_sample=True: the batch
    is compacted to the samples that need a call; the others reuse their previous output) or one
    per batch from the batch-mean statistic (per_sample=False, as the reference code does);
    per_sample=None takes the gate's own setting.
    Compaction needs the flags on the host: one sync per call while a gate is on; without a
    gate the loop never syncs.
    """
    from .ops.step import fused_step

    if per_sample is None:
        per_sample = gate.per_sample if gate is not None else True
    state = FusedState(plan, x_T, guidance=guidance, impl=impl)
    if gate is None:
        latents = state.loop(raw_fn, x_T, callback=callback).clone()
        steps = state.host.num_steps
        return FusedRun(latents, [steps] * len(x_T), steps, [[] for _ in range(len(x_T))])
    host, tables, times, basis, guidance, impl = (
        state.host,
        state.tables,
        state.times,
        state.basis,
        state.guidance,
        state.impl,
    )
    batch, device = x_T.shape[0], x_T.device
    torch.mul(x_T, host.init_coef, out=basis[host.init_row])
    out = torch.empty_like(x_T)  # the guided output of each sample's last computed call
    nfe = [0] * batch
    skipped: list[list[int]] = [[] for _ in range(batch)]
    unet_calls = 0
    stat = partials = None
    n = x_T[0].numel()
    gate.start(batch if per_sample else 1, device)
    if impl == "triton":
        from .ops.triton_step import num_blocks

        partials = torch.empty(batch, num_blocks(basis), dtype=torch.float32, device=device)
    else:
        stat = torch.empty(batch, dtype=torch.float32, device=device)
    flags = None
    with torch.no_grad():
        for k in range(host.num_steps):
            x = basis[int(host.x_row[k])]
            skip = [False] * batch
            if flags is not None:
                skip = flags.tolist() if per_sample else flags.tolist() * batch
            index = [b for b in range(batch) if not skip[b]]
            rows = None
            if len(index) == batch:
                raw = raw_fn(x, times[k], None)
            else:
                rows_host = [-1] * batch
                for r, b in enumerate(index):
                    rows_host[b] = r
                rows = torch.tensor(rows_host, dtype=torch.int32, device=device)
                if index:
                    sel = torch.tensor(index, dtype=torch.long, device=device)
                    raw = raw_fn(x.index_select(0, sel), times[k].index_select(0, sel), sel)
                else:
                    raw = x.new_empty((0, *x.shape[1:]))
            if index:
                unet_calls += 1
                raw = _checked_raw(raw, len(index) * (1 if guidance is None else 2), x, k)
            for b in range(batch):
                if skip[b]:
                    skipped[b].append(k)
                else:
                    nfe[b] += 1
            fused_step(k, raw, guidance, basis, tables, rows=rows, out=out, stat=stat, partials=partials, impl=impl)
            if k + 1 < host.num_steps:
                if partials is not None:
                    p = partials if per_sample else partials.view(1, -1)
                    flags = gate.observe_partials(p, n if per_sample else n * batch)
                else:
                    flags = gate.observe_stat(stat if per_sample else stat.mean().reshape(1))
            if callback is not None:
                callback(k, times[k], basis[int(host.dst[k, 1])])
    return FusedRun(basis[host.result_row].clone(), nfe, unet_calls, skipped)
