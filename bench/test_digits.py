"""digits on the CPU: classifier accuracy and feature Fréchet distance of 500 samples vs steps.

Needs the shipped engines/digits. The real data's own Fréchet distance to itself is 0; a
random split of the real data against the rest is the floor a perfect model could reach.
"""

import pytest

from fastdiff.testing import digits_accuracy, digits_fd

LABELS = [d for d in range(10) for _ in range(50)]


@pytest.fixture(scope="module")
def engine(cpu_engine):
    return cpu_engine("digits")


@pytest.mark.parametrize("steps", [3, 5, 10, 20], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "unipc_bh2", "olss"])
def test_digits_quality(benchmark, engine, sampler, steps):
    if sampler == "olss" and steps not in engine.shipped_plans():
        pytest.skip(f"digits ships no OLSS plan for {steps} steps")
    benchmark.group = "digits-quality"
    prompts = [str(d) for d in LABELS]
    out = benchmark.pedantic(
        engine.sample, args=(prompts,), kwargs={"steps": steps, "sampler": sampler, "seed": 0}, rounds=1, iterations=1
    )
    benchmark.extra_info.update(
        {
            "sampler": sampler,
            "steps": steps,
            "nfe": out.unet_calls,
            "accuracy": digits_accuracy(out.images, LABELS),
            "fd": digits_fd(out.images),
        }
    )
