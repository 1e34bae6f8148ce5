"""Concurrency (issue 23, part 3): one engine sampled from 8 Python threads at once gives the
images serial runs give, on every loop this machine runs (reference, cpp; the graph loop needs a
GPU). Counted by tests/reliability/counts.py."""

from __future__ import annotations

import threading

import pytest
import torch

import fastdiff
from fastdiff import loops
from tests.reliability.counts import record

pytestmark = pytest.mark.reliability

THREADS = 8
PROMPTS = ["a red circle on a blue background", "a green square", "a yellow triangle at the top of a white background"]


@pytest.mark.parametrize("loop", ["reference", "cpp"])
def test_one_engine_from_eight_threads_gives_the_serial_images(untrained_shapes_dir, loop):
    reason = loops.why_unavailable(loop, torch.device("cpu"), torch.float32)
    if reason is not None:
        pytest.skip(reason)
    engine = fastdiff.build_engine(untrained_shapes_dir, device="cpu", loop=loop)
    jobs = [(PROMPTS[i % 3], 3 + i % 3, ("dpmpp_2m", "ddim", "unipc_bh2")[i % 3], i) for i in range(THREADS)]
    serial = [engine.sample(p, steps=s, sampler=sm, seed=seed).latents for p, s, sm, seed in jobs]
    results: list = [None] * THREADS
    errors: list = []
    start = threading.Barrier(THREADS)

    def work(i):
        p, s, sm, seed = jobs[i]
        try:
            start.wait(timeout=30)
            results[i] = engine.sample(p, steps=s, sampler=sm, seed=seed).latents
        except Exception as exc:  # noqa: BLE001 - counted and reported below
            errors.append((i, repr(exc)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    hung = sum(t.is_alive() for t in threads)
    same = sum(r is not None and torch.equal(r, s) for r, s in zip(results, serial))
    record(
        "concurrency",
        "one engine from 8 Python threads",
        cases=THREADS,
        crashes=len(errors),
        hangs=hung,
        identical=same,
    )
    assert not hung and not errors, errors
    assert same == THREADS  # bit-identical to the serial runs
