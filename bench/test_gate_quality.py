"""AdaptiveDiffusion gate on tiny-shapes: UNet calls saved vs fidelity to the same run without
skipping (PSNR of the 8-bit images) and prompt adherence, for a delta sweep with per-sample and
per-batch decisions, DPM-Solver++(2M) and Euler at 20 and 50 steps (200 prompts, one batch).

Needs the shipped engines/tiny-shapes; torch runs on 2 threads like the CI machine.
"""

import numpy as np
import pytest
import torch

from fastdiff.gate import GateSpec
from fastdiff.models.shapes_data import random_scenes
from fastdiff.testing import shapes_score

PROMPTS = [s.caption for s in random_scenes(200, torch.Generator().manual_seed(1234))]
RUNS = [("dpmpp_2m", 20), ("dpmpp_2m", 50), ("euler", 20), ("euler", 50)]
DELTAS = (0.01, 0.02, 0.05, 0.1)
CHECKED = ("dpmpp_2m", 20, 0.05, "sample")  # the case `make bench-check` compares with bench/baselines
CASES = [
    pytest.param(s, n, d, m, id=f"{s}-N{n}-d{d:g}-{m}", marks=pytest.mark.check if (s, n, d, m) == CHECKED else ())
    for s, n in RUNS
    for d in DELTAS
    for m in ("sample", "batch")
]


@pytest.fixture(scope="module")
def engine(cpu_engine):
    return cpu_engine("tiny-shapes")


def pixels(out) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.float64) / 255.0 for image in out.images])


def psnr(mse) -> float:
    return float(10 * np.log10(1.0 / max(float(mse), 1e-12)))


@pytest.fixture(scope="module")
def reference(engine):
    """The runs without skipping, one per (sampler, steps), with their wall time."""
    import time

    cache = {}

    def get(sampler, steps):
        if (sampler, steps) not in cache:
            start = time.perf_counter()
            out = engine.sample(PROMPTS, steps=steps, sampler=sampler, seed=0)
            cache[sampler, steps] = (out, time.perf_counter() - start, shapes_score(out.images, PROMPTS))
        return cache[sampler, steps]

    return get


@pytest.mark.parametrize("sampler, steps, delta, mode", CASES)
def test_gate_calls_saved_vs_fidelity(benchmark, engine, reference, sampler, steps, delta, mode):
    ref, ref_seconds, ref_score = reference(sampler, steps)
    benchmark.group = "gate-quality"
    gate = GateSpec(delta=delta, max_skips=4, warmup=3, per_sample=mode == "sample")
    out = benchmark.pedantic(
        engine.sample,
        args=(PROMPTS,),
        kwargs={"steps": steps, "sampler": sampler, "seed": 0, "skip": gate},
        rounds=1,
        iterations=1,
    )
    mse = ((pixels(out) - pixels(ref)) ** 2).mean(axis=(1, 2, 3))
    score = shapes_score(out.images, PROMPTS)
    mean_calls = float(np.mean(out.nfe))
    benchmark.extra_info.update(
        {
            "sampler": sampler,
            "steps": steps,
            "delta": delta,
            "mode": mode,
            "mean_calls": mean_calls,
            "unet_calls": out.unet_calls,
            "call_reduction": steps / mean_calls,
            "psnr": psnr(mse.mean()),  # from the MSE over all images
            "psnr_median": float(np.median([psnr(m) for m in mse])),
            "psnr_worst": psnr(mse.max()),
            "identical": int((mse == 0).sum()),
            "adherence": score["adherence"],
            "adherence_no_skip": ref_score["adherence"],
            "seconds_no_skip": ref_seconds,
        }
    )
