"""The C++ runtime (fastdiff._C.Sampler) behind the Python executor's interface.

`run_fused_cpp` takes the arguments of `fastdiff.executor.run_fused` and returns the same
FusedRun, but the loop — every fused step, guidance, the gate's statistic and decisions, batch
compaction — runs in C++ (csrc/runtime/sampler.cpp); Python is entered only for the model call
(the callable `raw_fn`, e.g. a torch UNet). The plan is handed over with its compiled program
(StepPlan.dumps(program=True)), so both runtimes execute the same program; given the same model
outputs their latents agree to float32 rounding (tests/test_cpp_runtime.py).

This build's C++ loop samples float32 latents on the CPU; the GPU path is not built yet.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import torch

from .executor import Callback, FusedRun, ModelOutputError, RawFn
from .plan import StepPlan

_SAMPLERS: OrderedDict = OrderedDict()  # plan hash -> _C.Sampler (parsing a plan costs O(N^2))
_MAX_SAMPLERS = 16
_LOCK = threading.Lock()  # engines may sample from several threads


def why_unavailable(device=None) -> str | None:
    """None when the C++ runtime can sample on `device`, else the reason."""
    try:
        from . import _C
    except ImportError as exc:
        return f"the C++ extension fastdiff._C is not built ({exc}); reinstall without FASTDIFF_SKIP_EXT=1"
    if not hasattr(_C, "Sampler"):
        return "the installed fastdiff._C predates the C++ sampler: rebuild it (pip install -e .)"
    if device is not None and torch.device(device).type != "cpu":
        return f"the C++ runtime in this build samples on the CPU (no CUDA path built); the engine is on {device}"
    return None


def sampler_for(plan: StepPlan):
    """The C++ Sampler of a plan (cached by plan hash)."""
    reason = why_unavailable()
    if reason is not None:
        raise RuntimeError(f"fastdiff: {reason}")
    from . import _C

    key = plan.hash()
    with _LOCK:
        sampler = _SAMPLERS.get(key)
        if sampler is not None:
            _SAMPLERS.move_to_end(key)
            return sampler
    sampler = _C.Sampler(plan.dumps(program=True))  # outside the lock: compiling may take a while
    with _LOCK:
        _SAMPLERS[key] = sampler
        while len(_SAMPLERS) > _MAX_SAMPLERS:
            _SAMPLERS.popitem(last=False)
    return sampler


def _gate_options(gate, per_sample: bool | None) -> dict | None:
    if gate is None:
        return None
    return {
        "delta": float(gate.delta),
        "max_skips": int(gate.max_skips),
        "warmup": int(gate.warmup),
        "per_sample": bool(gate.per_sample if per_sample is None else per_sample),
    }


def run_fused_cpp(
    plan: StepPlan,
    raw_fn: RawFn,
    x_T: torch.Tensor,
    *,
    guidance: torch.Tensor | None = None,
    gate=None,
    per_sample: bool | None = None,
    callback: Callback | None = None,
) -> FusedRun:
    """`fastdiff.executor.run_fused` with the loop in C++ (same arguments and result).

    x_T: float32 CPU latents. raw_fn(x, t, index) receives CPU tensors that view the C++
    buffers for the duration of the call. A model error surfaces as ModelOutputError (bad
    output) or the C++ SamplerError (a RuntimeError naming the failing call)."""
    if not isinstance(plan, StepPlan):
        raise TypeError(f"plan must be a StepPlan, got {type(plan).__name__}")
    if not isinstance(x_T, torch.Tensor) or x_T.dtype != torch.float32 or x_T.device.type != "cpu" or x_T.dim() < 2:
        got = f"{x_T.dtype} {tuple(x_T.shape)} on {x_T.device}" if isinstance(x_T, torch.Tensor) else type(x_T).__name__
        raise ValueError(f"the C++ runtime samples float32 CPU latents [batch, ...]; got {got}")
    sampler = sampler_for(plan)
    w = None if guidance is None else guidance.detach().to("cpu", torch.float32).reshape(-1).numpy()

    def fn(x: np.ndarray, t: np.ndarray, index):
        sel = None if index is None else torch.from_numpy(index)
        raw = raw_fn(torch.from_numpy(x), torch.from_numpy(t), sel)
        if not isinstance(raw, torch.Tensor):
            raise ModelOutputError(f"the model returned {type(raw).__name__}, expected a torch.Tensor")
        return raw.detach().to("cpu", torch.float32).contiguous().numpy()

    cb = None
    if callback is not None:
        times = torch.tensor(plan.times, dtype=torch.float32)

        def cb(k: int, x: np.ndarray):
            callback(k, times[k].expand(len(x)), torch.from_numpy(x))

    with torch.no_grad():
        out = sampler.run(fn, x_T.detach().contiguous().numpy(), w, _gate_options(gate, per_sample), cb)
    return FusedRun(torch.from_numpy(out["latents"]), list(out["nfe"]), int(out["unet_calls"]), out["skipped"])
