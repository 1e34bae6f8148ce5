"""The loop contract: what every loop takes and returns, and the checks they share.

    run(program, raw_fn, x_T, *, guidance=None, gate=None, callback=None) -> LoopResult

raw_fn(x, t, index) -> the raw model output for the samples `index` (a long tensor of sample
positions, or None for the whole batch): [len, ...] without guidance, [2·len, ...] =
[unconditional; conditional] with guidance. x: the model inputs of those samples, t: float32
[len] model times. guidance: None, a number, or one weight w per sample (g = u + w·(c − u)).
gate: a `fastdiff.gate.GateSpec` or None. callback(k, t, x) runs after call k with the next
model input (the result after the last call); x is the loop's buffer, clone it to keep it.
noise(k, x) -> fresh standard normal noise shaped like x, the noise a stochastic Program adds
after call k (`Program.noise`); None: torch.randn_like. Deterministic programs never call it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..dtypes import compute_dtype, dtype_name
from ..gate import GateSpec
from ..program import Program

RawFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor], None]
NoiseFn = Callable[[int, torch.Tensor], torch.Tensor]


class ModelOutputError(ValueError):
    """The model function returned something the loop cannot use."""


@dataclass
class LoopResult:
    latents: torch.Tensor  # the plan's result, [batch, ...] (the caller's own tensor)
    nfe: list[int]  # model calls made for each sample
    unet_calls: int  # batched model invocations (a compacted batch counts once)
    skipped: list[list[int]]  # per sample, the calls the gate skipped

    @classmethod
    def ungated(cls, latents: torch.Tensor, calls: int) -> LoopResult:
        """Every sample made every call."""
        batch = latents.shape[0]
        return cls(latents, [calls] * batch, calls, [[] for _ in range(batch)])


def check_inputs(program, x_T, gate=None) -> None:
    """TypeError/ValueError for a loop's program, initial noise and gate."""
    if not isinstance(program, Program):
        raise TypeError(
            f"program must be a fastdiff.program.Program (program.compile(plan)), got {type(program).__name__}"
        )
    if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point() or x_T.dim() < 1:
        raise ValueError("x_T must be a floating-point tensor of shape [batch, ...]")
    if gate is not None and not isinstance(gate, GateSpec):
        raise TypeError(f"gate must be a fastdiff.gate.GateSpec or None, got {type(gate).__name__}")
    check_gate_for(program, gate)


def check_gate_for(plan_or_program, gate) -> None:
    """ValueError when a gate is asked to skip calls of a stochastic plan (a StepPlan or Program)."""
    if gate is not None and plan_or_program.stochastic:
        raise ValueError(
            "the skip gate cannot run a stochastic plan: its smoothness test and its predicted outputs assume a "
            "deterministic trajectory (sample without skip, or with a deterministic plan)"
        )


def fresh_noise(noise: NoiseFn | None, k: int, x: torch.Tensor) -> torch.Tensor:
    """The noise added after call k: noise(k, x) checked against x, or torch.randn_like(x)."""
    if noise is None:
        return torch.randn_like(x)
    eps = noise(k, x)
    if not isinstance(eps, torch.Tensor) or eps.shape != x.shape:
        got = tuple(eps.shape) if isinstance(eps, torch.Tensor) else type(eps).__name__
        raise ValueError(f"noise({k}, x) returned {got}; expected a tensor of shape {tuple(x.shape)}")
    return eps.to(device=x.device, dtype=x.dtype)


def guidance_weights(guidance, x_T: torch.Tensor) -> torch.Tensor | None:
    """One weight per sample on x_T's device: float32, float64 for float64 latents. Weights
    already on that device are never copied through the host (inside a captured loop they are
    the graph's static input)."""
    if guidance is None:
        return None
    dtype = compute_dtype(x_T.dtype)
    if isinstance(guidance, torch.Tensor) and guidance.device == x_T.device:
        w = guidance.to(dtype).reshape(-1)
    else:
        w = torch.as_tensor(guidance, dtype=dtype, device=x_T.device).reshape(-1)
    if w.numel() == 1:
        return w.expand(x_T.shape[0]).contiguous()
    if w.numel() != x_T.shape[0]:
        raise ValueError(
            f"guidance holds {w.numel()} weights for a batch of {x_T.shape[0]}: give one or one per sample"
        )
    return w


def checked_raw(raw, rows: int, x: torch.Tensor, k: int) -> torch.Tensor:
    """A raw model output of `rows` rows on x's device, cast to x's dtype; else ModelOutputError."""
    if not isinstance(raw, torch.Tensor):
        raise ModelOutputError(f"model call {k} returned {type(raw).__name__}, expected a torch.Tensor")
    shape = (rows, *x.shape[1:])
    if raw.shape != shape:
        raise ModelOutputError(
            f"model call {k} returned shape {tuple(raw.shape)}; expected {shape} (the raw output, "
            "[uncond; cond] under guidance)"
        )
    if raw.device != x.device:
        raise ModelOutputError(f"model call {k} returned a tensor on {raw.device}, the latents are on {x.device}")
    return raw if raw.dtype == x.dtype else raw.to(x.dtype)


def require_float32_cpu(x_T, who: str) -> None:
    """ValueError unless x_T is float32 on the CPU (what the C++ loop samples)."""
    if x_T.dtype != torch.float32 or x_T.device.type != "cpu" or x_T.dim() < 2:
        got = f"{dtype_name(x_T.dtype)} {tuple(x_T.shape)} on {x_T.device}"
        raise ValueError(f"{who}: the C++ loop samples float32 CPU latents [batch, ...]; got {got}")
