"""The sampling loop: StepPlan + model function + x_T -> result, with no host<->device sync.

Every sampler runs through the same loop: call the model, put its output in a slot, run the
plan's precomputed linear combinations, release what the rest of the plan no longer needs.
Coefficients are host floats computed once (float64) before the loop, the call times are
copied to the device once, and nothing inside the loop reads device memory back.
"""

from __future__ import annotations

from collections.abc import Callable

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


def _adopt(out, x: torch.Tensor, k: int, slots: list) -> torch.Tensor:
    """The model output as a slot the executor may keep and update in place."""
    if not isinstance(out, torch.Tensor):
        raise ModelOutputError(f"model call {k} returned {type(out).__name__}, expected a torch.Tensor")
    if out.shape != x.shape:
        raise ModelOutputError(
            f"model call {k} returned shape {tuple(out.shape)} for an input of shape {tuple(x.shape)}; "
            "the raw output must have the latent's shape"
        )
    if out.device != x.device:
        raise ModelOutputError(f"model call {k} returned a tensor on {out.device}, the latents are on {x.device}")
    if out.dtype != x.dtype:
        return out.to(x.dtype)
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
