"""tiny-shapes on the CPU: end-to-end latency of a 5-step sample, and prompt adherence vs steps
for each solver (200 prompts, scored by fastdiff.testing.shapes_score).

Needs the shipped engines/tiny-shapes; torch runs on 2 threads like the CI machine.
"""

import pytest
import torch

from fastdiff.models.shapes_data import random_scenes
from fastdiff.testing import shapes_score

SOLVERS = ("ddim", "euler", "plms", "dpmpp_2m", "dpmpp_2m_karras", "unipc_bh2", "deis", "olss")  # olss: shipped plans
STEPS = (3, 5, 10, 20)
PROMPTS = [s.caption for s in random_scenes(200, torch.Generator().manual_seed(1234))]


@pytest.fixture(scope="module")
def engine(cpu_engine):
    return cpu_engine("tiny-shapes")


@pytest.mark.check
def test_tiny_shapes_5_step_sample_latency(benchmark, engine):
    prompt = "a red circle on a blue background"
    engine.sample(prompt, steps=5, seed=0)  # warm-up: plan compile, allocator
    benchmark.group = "tiny-shapes-latency"
    out = benchmark.pedantic(engine.sample, args=(prompt,), kwargs={"steps": 5, "seed": 0}, rounds=20, iterations=1)
    benchmark.extra_info.update({"nfe": out.unet_calls, "threads": torch.get_num_threads(), "timings": out.timings})


@pytest.mark.parametrize("steps", STEPS, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("sampler", SOLVERS)
def test_tiny_shapes_adherence(benchmark, engine, sampler, steps):
    if sampler == "olss" and steps not in engine.shipped_plans():
        pytest.skip(f"tiny-shapes ships no OLSS plan for {steps} steps")
    benchmark.group = "tiny-shapes-adherence"
    out = benchmark.pedantic(
        engine.sample, args=(PROMPTS,), kwargs={"steps": steps, "sampler": sampler, "seed": 0}, rounds=1, iterations=1
    )
    score = shapes_score(out.images, PROMPTS)
    benchmark.extra_info.update({"sampler": sampler, "steps": steps, "nfe": out.unet_calls, **score})
