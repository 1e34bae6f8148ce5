"""Numerical faults (issue 23, part 2): NaN and inf injected into the UNet's output at a chosen
call and into the VAE decoder's output must end in a NonFiniteError that names where (the call
and its time, or the decoder), never in images made of NaN. Counted by tests/reliability/counts.py."""

from __future__ import annotations

import pytest
import torch

import fastdiff
from fastdiff.engines import NonFiniteError
from tests.reliability.counts import record

pytestmark = pytest.mark.reliability

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def engine(untrained_shapes_dir):
    return fastdiff.build_engine(untrained_shapes_dir, device="cpu")


def _record(case: str, outcome: str) -> None:
    clear = outcome == "clear error"
    record(
        "numerical_faults",
        "NaN/inf in UNet, VAE and latents",
        cases=1,
        bad_inputs=1,
        clear_errors=int(clear),
        silent_loads=int(not clear),
    )


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("call", [0, 2, 3])
def test_a_non_finite_unet_output_is_named_with_its_call(engine, monkeypatch, call, value):
    forward = engine.unet.forward
    count = [0]

    def faulty(sample, *args, **kwargs):
        out = forward(sample, *args, **kwargs)
        k = count[0] % 4  # the same call of every 4-call run: a fault that reproduces, as bad weights do
        count[0] += 1
        if k == call:
            poisoned = out[0].clone()
            poisoned.view(-1)[0] = value  # one element is enough
            return (poisoned,)
        return out

    monkeypatch.setattr(engine.unet, "forward", faulty)
    try:
        engine.sample(PROMPT, steps=4, sampler="ddim", seed=0, guidance_scale=1.0)
    except NonFiniteError as exc:
        _record(f"unet {value} at call {call}", "clear error")
        assert f"first non-finite at model call {call} of 4" in str(exc)
    else:
        _record(f"unet {value} at call {call}", "silent")
        raise AssertionError("NaN/inf in the UNet's output went unnoticed")


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_decoder_output_is_an_error_not_an_image(engine, monkeypatch, value):
    decode = engine.decoder.decode
    monkeypatch.setattr(engine.decoder, "decode", lambda z: decode(z) * value)
    try:
        engine.sample(PROMPT, steps=2, seed=0)
    except NonFiniteError as exc:
        _record(f"decoder {value}", "clear error")
        assert "decoder (VAE in float32) produced NaN/inf images from finite latents" in str(exc)
    else:
        _record(f"decoder {value}", "silent")
        raise AssertionError("NaN/inf images went out as PNGs")


def test_non_finite_initial_noise_is_named(engine):
    x_T = engine.initial_noise(1, seed=0)
    x_T.view(-1)[3] = float("nan")
    with pytest.raises(ValueError, match="latents hold NaN or inf values"):
        engine.sample(PROMPT, steps=2, latents=x_T)
    _record("initial noise nan", "clear error")
    assert torch.isnan(x_T).any()  # the caller's tensor is left as it was
