"""The cpp loop: the same loop in C++ (fastdiff._C.Sampler, csrc/runtime/sampler.cpp).

Every fused step, guidance, the gate's statistic and decisions and the batch compaction run in
C++; Python is entered only for the model call (the raw_fn, e.g. a torch UNet, gets NumPy-backed
CPU tensors viewing the C++ buffers for the duration of the call). The program is handed over
in a plan file's text with the program as its cache (`fastdiff.program.dumps`); the C++ reader
re-expands it and refuses it unless it computes the plan, so both languages run one program.
Given the same model outputs the latents equal the reference loop's (torch impl) to float32
rounding (tests/test_loops.py). This build samples float32 latents on the CPU.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import torch

from ..dtypes import dtype_name
from ..gate import GateSpec
from ..program import dumps
from .contract import LoopResult, ModelOutputError, check_inputs, guidance_weights, require_float32_cpu

name = "cpp"

_SAMPLERS: OrderedDict = OrderedDict()  # program key -> _C.Sampler (parsing a plan costs O(N^2))
_MAX_SAMPLERS = 16
_LOCK = threading.Lock()  # engines may sample from several threads


def why_unavailable(device=None, dtype=None) -> str | None:
    """None when the C++ loop can sample on `device` in `dtype`, else the reason."""
    try:
        from .. import _C
    except ImportError as exc:
        return f"the C++ extension fastdiff._C is not built ({exc}); reinstall without FASTDIFF_SKIP_EXT=1"
    if not hasattr(_C, "Sampler"):
        return "the installed fastdiff._C predates the C++ sampler: rebuild it (pip install -e .)"
    if device is not None and torch.device(device).type != "cpu":
        return f"the C++ loop in this build samples on the CPU (the CUDA runner is an example only), not on {device}"
    if dtype is not None and dtype != torch.float32:
        return f"the C++ loop samples float32 latents, not {dtype_name(dtype)} (build the engine with dtype=float32)"
    return None


def sampler_for(program):
    """The C++ Sampler of a program (cached by the program's key)."""
    reason = why_unavailable()
    if reason is not None:
        raise RuntimeError(f"loop 'cpp': {reason}")
    from .. import _C

    key = program.key
    with _LOCK:
        sampler = _SAMPLERS.get(key)
        if sampler is not None:
            _SAMPLERS.move_to_end(key)
            return sampler
    sampler = _C.Sampler(dumps(program))  # outside the lock: checking the program takes a while
    with _LOCK:
        _SAMPLERS[key] = sampler
        while len(_SAMPLERS) > _MAX_SAMPLERS:
            _SAMPLERS.popitem(last=False)
    return sampler


def run(program, raw_fn, x_T, *, guidance=None, gate: GateSpec | None = None, callback=None, noise=None) -> LoopResult:
    """The loop contract (`fastdiff.loops.contract`) in C++; x_T: float32 CPU latents. A model
    error surfaces as the C++ SamplerError (a RuntimeError naming the failing call). Stochastic
    programs are refused (the C++ runtime runs deterministic plans)."""
    check_inputs(program, x_T, gate)
    if program.stochastic:
        raise ValueError(
            "loop 'cpp' runs deterministic plans only (plan file version 1): this plan adds fresh noise; "
            "use loop 'reference'"
        )
    require_float32_cpu(x_T, "loop 'cpp'")
    sampler = sampler_for(program)
    w = guidance_weights(guidance, x_T)
    w = None if w is None else w.detach().numpy()

    def fn(x: np.ndarray, t: np.ndarray, index):
        sel = None if index is None else torch.from_numpy(index)
        raw = raw_fn(torch.from_numpy(x), torch.from_numpy(t), sel)
        if not isinstance(raw, torch.Tensor):
            raise ModelOutputError(f"the model returned {type(raw).__name__}, expected a torch.Tensor")
        return raw.detach().to("cpu", torch.float32).contiguous().numpy()

    cb = None
    if callback is not None:
        times = torch.tensor(program.times, dtype=torch.float32)

        def cb(k: int, x: np.ndarray):
            callback(k, times[k].expand(len(x)), torch.from_numpy(x))

    with torch.no_grad():
        out = sampler.run(fn, x_T.detach().contiguous().numpy(), w, None if gate is None else gate.to_dict(), cb)
    return LoopResult(torch.from_numpy(out["latents"]), list(out["nfe"]), int(out["unet_calls"]), out["skipped"])
