"""Backends on the CPU, side by side in one run: one guided tiny-shapes UNet call (batch 2 x CFG)
and a 20-step sample at batch 2, eager vs compiled (torch.compile / Inductor; the first call per
shape compiles and is kept out of the timing, its duration goes into extra_info).

CUDA graphs need a GPU: their CPU-side behaviour is tested in tests/test_backends.py and
their speed is measured by bench/gpu/.
"""

import time

import pytest
import torch

import fastdiff
from fastdiff.engines import compiled

PROMPTS = ["a red circle on a blue background", "two green squares"]
BACKENDS = ("eager", "compiled")


@pytest.fixture(scope="module")
def engines():
    torch.set_num_threads(2)
    return {}


def engine_for(engines, backend):
    if backend == "compiled" and compiled.why_not_compilable("cpu"):
        pytest.skip(compiled.why_not_compilable("cpu"))
    if backend not in engines:
        engines[backend] = fastdiff.build_engine("tiny-shapes", device="cpu", backend=backend)
    return engines[backend]


@pytest.mark.parametrize("backend", BACKENDS)
def test_unet_step(benchmark, engines, backend):
    engine = engine_for(engines, backend)
    cond = engine.denoiser(PROMPTS).kwargs
    x = torch.randn(4, 4, engine.sample_size, engine.sample_size)
    t = torch.full((4,), 500.0)
    start = time.perf_counter()
    engine.call_unet(x, t, **cond)  # compiles for this shape (compiled)
    first = time.perf_counter() - start
    benchmark.group = "cpu-backends-unet-step"
    benchmark.pedantic(engine.call_unet, args=(x, t), kwargs=cond, rounds=30, iterations=1, warmup_rounds=2)
    benchmark.extra_info.update({"backend": backend, "first_call_s": first, "batch": 4, "threads": 2})


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_20_steps(benchmark, engines, backend):
    engine = engine_for(engines, backend)
    start = time.perf_counter()
    engine.sample(PROMPTS, steps=20, seed=0)  # compiles the text encoder and VAE shapes (compiled)
    first = time.perf_counter() - start
    benchmark.group = "cpu-backends-sample-20"
    out = benchmark.pedantic(engine.sample, args=(PROMPTS,), kwargs={"steps": 20, "seed": 0}, rounds=5, iterations=1)
    benchmark.extra_info.update({"backend": backend, "first_call_s": first, "timings": out.timings, "threads": 2})
