"""Reuse of a diffusers UNet's deep features across model calls (the idea of DeepCache, Ma et
al., CVPR 2024): the high-level features change slowly along a trajectory, so on most calls only
the shallowest path of the U — conv_in, the last layer of the last up block (fed by the fresh
conv_in skip connection) and conv_out — is computed, and everything deeper returns what it
returned on the last full call.

Composable with step skipping: the gate removes whole calls; of the calls that do run, every
`interval`-th is a full one (the first always) and the others are shallow. Counting is per
sampling call (`FeatureCache.session`), so a cache never leaks from one request into the next.

Contracts: the batch must be the same on every call of a session (the cached features belong to
its samples), so per-sample gate decisions, which compact the batch, are refused; a call with
another batch size or resolution than the cached features is always a full one. The modules run
eagerly: captured or compiled UNets (backend cuda_graph / compiled) cannot switch paths per call.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch


class FeatureCacheError(ValueError):
    """A feature cache that cannot work with this UNet or these settings."""


def _deep_modules(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The modules whose outputs are reused: every down block, the mid block, every up block
    but the last, and in the last up block every layer but the last (resnet, attention) pair."""
    missing = [n for n in ("down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out") if not hasattr(unet, n)]
    if missing:
        raise FeatureCacheError(
            f"feature caching needs a diffusers U-Net (UNet2DModel / UNet2DConditionModel); "
            f"{type(unet).__name__} has no {', '.join(missing)}"
        )
    last = unet.up_blocks[-1]
    resnets = list(getattr(last, "resnets", []) or [])
    attentions = list(getattr(last, "attentions", []) or [])
    if not resnets or (attentions and len(attentions) != len(resnets)) or getattr(last, "upsamplers", None):
        raise FeatureCacheError(
            f"feature caching needs the last up block to be resnet (+ attention) layers without an upsampler; "
            f"{type(last).__name__} is not"
        )
    deep = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    if unet.mid_block is not None:
        deep.append(("mid_block", unet.mid_block))
    deep += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks[:-1])]
    deep += [(f"up_blocks.{len(unet.up_blocks) - 1}.resnets.{i}", m) for i, m in enumerate(resnets[:-1])]
    deep += [(f"up_blocks.{len(unet.up_blocks) - 1}.attentions.{i}", m) for i, m in enumerate(attentions[:-1])]
    return deep


class FeatureCache:
    """Deep-feature reuse for one UNet module. `session(interval)` is a context manager around
    one sampling call; outside a session the UNet runs unchanged."""

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self.deep = _deep_modules(unet)
        self._local = threading.local()  # the session of the thread sampling
        self._lock = threading.Lock()
        self._wrapped = False

    def _state(self):
        return getattr(self._local, "state", None)

    def _install(self) -> None:
        """Wrap the deep modules' forwards once (they pass through outside a session)."""
        with self._lock:
            if self._wrapped:
                return
            for name, module in self.deep:
                module.forward = self._wrap(name, module.forward)
            top = self.unet.forward
            cache = self

            def forward(sample, timestep, *args, **kwargs):
                state = cache._state()
                if state is not None:
                    state.begin_call(tuple(sample.shape))
                return top(sample, timestep, *args, **kwargs)

            self.unet.forward = forward
            self._wrapped = True

    def _wrap(self, name: str, original):
        cache = self

        def forward(*args, **kwargs):
            state = cache._state()
            if state is None:
                return original(*args, **kwargs)
            if state.shallow:
                return state.features[name]
            out = original(*args, **kwargs)
            state.features[name] = out
            return out

        return forward

    @contextmanager
    def session(self, interval: int):
        """Within the block, UNet calls 0, interval, 2·interval, ... are full and the others
        shallow (interval 1: every call full)."""
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise FeatureCacheError(f"feature_cache interval must be an integer >= 1, got {interval!r}")
        self._install()
        state = _Session(interval)
        self._local.state = state
        try:
            yield state
        finally:
            self._local.state = None


class _Session:
    def __init__(self, interval: int):
        self.interval = interval
        self.calls = 0  # UNet calls seen
        self.full = 0  # full calls among them
        self.shallow = False
        self.shape: tuple | None = None
        self.since_full = 0
        self.features: dict = {}

    def begin_call(self, shape: tuple) -> None:
        """Decide whether this call is shallow: a cached full call of the same input shape exists
        and fewer than `interval` calls have passed since it."""
        self.shallow = self.shape == shape and 0 < self.since_full < self.interval
        if self.shallow:
            self.since_full += 1
        else:
            self.features.clear()
            self.shape = shape
            self.since_full = 1
            self.full += 1
        self.calls += 1
