"""Deep-feature reuse (fastdiff.engines.feature_cache): the shallow path against the full UNet,
the call pattern, composition with the gate, and what it refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastdiff.engines.feature_cache import FeatureCache, FeatureCacheError
from fastdiff.gate import GateSpec

PROMPTS = ["a red circle on a blue background", "a green square at the top", "a small yellow triangle"]


@pytest.fixture(scope="module")
def engine():
    import fastdiff

    return fastdiff.build_engine("tiny-shapes", device="cpu")


def count_deep_calls(engine):
    calls = []
    handle = engine.unet.mid_block.resnets[0].register_forward_hook(
        lambda *a: calls.append(1)
    )  # inside the cached module
    return calls, handle


def test_a_shallow_call_on_unchanged_features_equals_the_full_call(engine):
    """With the deep features of a full call on the same input, the shallow path recomputes the
    rest of the U exactly: the outputs agree bit for bit."""
    unet = engine.unet
    x = torch.randn(3, *engine.initial_noise(1, seed=0).shape[1:], generator=torch.Generator().manual_seed(1))
    t = torch.full((3,), 501.0)
    cond = engine.conditioner.encode(PROMPTS, engine.device, engine.dtype)
    cache = FeatureCache(unet)
    with torch.no_grad():
        plain = unet(x, t, **cond, return_dict=False)[0]
        with cache.session(4) as session:
            full = unet(x, t, **cond, return_dict=False)[0]
            shallow = unet(x, t, **cond, return_dict=False)[0]
            moved = unet(x * 0.5, t - 100, **cond, return_dict=False)[0]  # a later call: the deep part is stale
        after = unet(x, t, **cond, return_dict=False)[0]  # outside a session: the plain UNet
    assert session.calls == 3 and session.full == 1
    assert torch.equal(full, plain) and torch.equal(shallow, plain) and torch.equal(after, plain)
    assert not torch.equal(moved, unet(x * 0.5, t - 100, **cond, return_dict=False)[0])


@pytest.mark.parametrize("interval", [2, 3])
def test_every_interval_th_call_is_full_and_the_rest_reuse_the_deep_features(engine, interval):
    steps = 10
    calls, handle = count_deep_calls(engine)
    try:
        out = engine.sample(PROMPTS, steps=steps, seed=0, feature_cache=interval)
    finally:
        handle.remove()
    full = -(-steps // interval)
    assert len(calls) == full and out.unet_calls == steps and out.shallow_calls == steps - full
    ref = engine.sample(PROMPTS, steps=steps, seed=0)
    assert ref.shallow_calls == 0
    a = np.stack([np.asarray(i, dtype=np.float64) for i in out.images]) / 255
    b = np.stack([np.asarray(i, dtype=np.float64) for i in ref.images]) / 255
    assert 0 < np.abs(a - b).max() and ((a - b) ** 2).mean() < 1e-2  # close to, not equal to, the full run
    again = engine.sample(PROMPTS, steps=steps, seed=0, feature_cache=interval)
    assert torch.equal(again.latents, out.latents)  # nothing leaks from one sampling call into the next


def test_interval_one_is_the_plain_unet(engine):
    a = engine.sample(PROMPTS[:1], steps=6, seed=3, feature_cache=1)
    b = engine.sample(PROMPTS[:1], steps=6, seed=3)
    assert torch.equal(a.latents, b.latents) and a.shallow_calls == 0


def test_it_composes_with_per_batch_skipping(engine):
    gate = GateSpec(delta=0.05, max_skips=2, per_sample=False)
    calls, handle = count_deep_calls(engine)
    try:
        out = engine.sample(PROMPTS, steps=20, seed=0, skip=gate, feature_cache=2)
    finally:
        handle.remove()
    assert out.unet_calls < 20  # the gate skipped calls ...
    assert len(calls) == -(-out.unet_calls // 2) and out.shallow_calls == out.unet_calls - len(calls)  # ... and of
    # the calls that ran, every second one was full


def test_what_it_refuses_is_named(engine, monkeypatch):
    with pytest.raises(ValueError, match="needs per-batch gate decisions"):
        engine.sample(PROMPTS[0], steps=8, skip=GateSpec(per_sample=True), feature_cache=2)
    for bad in (0, 2.5, True, "3"):
        with pytest.raises(ValueError, match="feature_cache must be an integer interval >= 1"):
            engine.sample(PROMPTS[0], steps=8, feature_cache=bad)
    monkeypatch.setattr(engine, "backend", "compiled")
    with pytest.raises(ValueError, match="feature_cache needs backend='eager'"):
        engine.sample(PROMPTS[0], steps=8, feature_cache=2)
    with pytest.raises(FeatureCacheError, match="Linear has no down_blocks, up_blocks, mid_block, conv_in, conv_out"):
        FeatureCache(torch.nn.Linear(2, 2))
    with pytest.raises(FeatureCacheError, match="interval must be an integer >= 1"):
        with FeatureCache(engine.unet).session(0):
            pass


def test_the_digits_pixel_unet_is_supported():
    import fastdiff

    digits = fastdiff.build_engine("digits", device="cpu")
    out = digits.sample(["3", "7"], steps=8, seed=0, feature_cache=2)
    assert out.shallow_calls == 4 and len(out.images) == 2
