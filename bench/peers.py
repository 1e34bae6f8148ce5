"""The acceleration methods compared in bench/test_skip_peers.py, each as a context manager around
`engine.sample` plus the keyword arguments it adds, so every method runs on the same engine,
sampler, steps, noise and prompts.

DeepCache is the PyPI package (DeepCache==0.1.1, the `bench` extra) applied as its README shows
for a diffusers pipeline: `DeepCacheSDHelper(pipe)`, `set_params(cache_interval=N,
cache_branch_id=0)`, `enable()`. Its helper reads `pipe.unet` and `pipe.scheduler.timesteps` and
expects one scalar timestep per UNet call; the adapter below hands it the engine's UNet, the
plan's model times as the scheduler's timesteps, and passes the first element of the engine's
per-sample timestep tensor (all samples share it in an unskipped run). Nothing of its caching
logic is changed.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import torch


def deepcache_available() -> str | None:
    """None when the DeepCache package imports, else why not."""
    try:
        import DeepCache  # noqa: F401
    except ImportError as exc:
        return f"DeepCache is not installed ({exc}): pip install DeepCache==0.1.1 (the bench extra)"
    return None


@contextmanager
def deepcache(engine, plan, interval: int, branch: int = 0):
    """DeepCache on the engine's UNet for sampling `plan` (one sampling call at a time)."""
    from DeepCache import DeepCacheSDHelper

    unet = engine.unet
    pipe = SimpleNamespace(
        unet=unet, scheduler=SimpleNamespace(timesteps=torch.tensor(plan.times, dtype=torch.float32))
    )
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    cached_forward = unet.forward

    def scalar_timestep(sample, timestep, *args, **kwargs):
        return cached_forward(sample, timestep.reshape(-1)[0], *args, **kwargs)

    unet.forward = scalar_timestep
    try:
        yield
    finally:
        unet.forward = cached_forward
        helper.disable()  # restores the UNet's own forward and every block's


METHODS = ("none", "gate", "gate-copy", "deepcache", "feature-cache", "gate+feature-cache", "fewer-steps")


def method(engine, plan, name: str, setting):
    """(context manager, extra sample() kwargs) of one method at one setting: a GateSpec for the
    gates, an interval for the caches, (GateSpec, interval) for the combination, a step count for
    "fewer-steps" (the same sampler with fewer steps: no acceleration method at all, the baseline
    every method has to beat at its number of UNet calls)."""
    if name == "none":
        return nullcontext(), {}
    if name in ("gate", "gate-copy"):
        return nullcontext(), {"skip": setting}
    if name == "deepcache":
        return deepcache(engine, plan, setting), {}
    if name == "feature-cache":
        return nullcontext(), {"feature_cache": setting}
    if name == "gate+feature-cache":
        gate, interval = setting
        return nullcontext(), {"skip": gate, "feature_cache": interval}
    if name == "fewer-steps":
        return nullcontext(), {"steps": setting}
    raise ValueError(f"unknown method {name!r}: expected one of {', '.join(METHODS)}")
