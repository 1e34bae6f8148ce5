"""Loop overhead per step, the reference loop (Python) vs the C++ loop, side by side in one run (CPU).

The model is the identity (its input, twice under guidance: one copy), so what is timed is the
sampling loop itself: the fused step (guidance + the plan's combinations), the bookkeeping and
the model-call crossing. 20-step dpmpp_2m plan, CFG batch 2, at tiny-shapes' latent (4x8x8)
and SD 2.1's 768² latent (4x96x96):

- python:       fastdiff.loops.reference (the default loop on the CPU: the torch fused step),
                identity in torch
- cpp-callback: fastdiff.loops.cpp, the loop in C++, the model a Python callable
                (what loop="cpp" does with a torch UNet)
- cpp-native:   the C++ Sampler with a C++ identity model: no Python at all (a C++ service)

overhead/step = (run time − the identity model's own time) / steps; the model's time is measured
in the same test (python, cpp-callback) or is a memcpy inside the C++ loop (cpp-native, included).
bench/report.py writes bench/results/runtime.md (the target: C++ ≤ 0.5× the Python loop).
"""

import time

import pytest
import torch

from fastdiff import program, solvers
from fastdiff.loops import cpp, reference
from fastdiff.schedules import PRESETS, DiscreteSchedule

STEPS = 20
LATENTS = {"tiny-shapes 4x8x8": (4, 8, 8), "sd21-768 4x96x96": (4, 96, 96)}
RUNTIMES = ("python", "cpp-callback", "cpp-native")

pytestmark = [
    pytest.mark.skipif(cpp.why_unavailable() is not None, reason=f"C++ loop: {cpp.why_unavailable()}"),
    pytest.mark.check,  # all six: `make bench-check` compares the speed-ups side by side (bench/check.py)
]


def identity(x, t, index):
    return torch.cat([x, x])


def model_time(x_T) -> float:
    """Seconds the identity model itself takes for STEPS calls."""
    t = torch.zeros(len(x_T))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(STEPS):
            identity(x_T, t, None)
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("latent", list(LATENTS))
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_loop_overhead(benchmark, runtime, latent):
    torch.set_num_threads(2)
    compiled = program.compile(solvers.build_variant("dpmpp_2m", DiscreteSchedule.from_config(PRESETS["sd21"]), STEPS))
    x_T = torch.randn(2, *LATENTS[latent], generator=torch.Generator().manual_seed(0))
    w = torch.full((2,), 7.5)
    if runtime == "python":
        fn, args, kwargs = reference.run, (compiled, identity, x_T), {"guidance": w}
    elif runtime == "cpp-callback":
        fn, args, kwargs = cpp.run, (compiled, identity, x_T), {"guidance": w}
    else:
        fn, args, kwargs = cpp.sampler_for(compiled).run_identity, (x_T.numpy(), 7.5), {}
    rounds = 50 if latent.startswith("tiny") else 30
    benchmark.group = "runtime-loop-overhead"
    benchmark.pedantic(fn, args=args, kwargs=kwargs, rounds=rounds, iterations=1, warmup_rounds=2)
    model_s = 0.0 if runtime == "cpp-native" else model_time(x_T)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        {
            "runtime": runtime,
            "latent": latent,
            "steps": STEPS,
            "batch": 2,
            "model_s": model_s,
            "overhead_per_step_us": (median - model_s) / STEPS * 1e6,
            "threads": 2,
        }
    )
