"""The model contract of the loops — raw_fn(x, t, index) -> raw output — and its adapters.

Classifier-free guidance out = u + w·(c − u) (Ho & Salimans 2022, eq. 6 with w = 1 + their w)
is linear in the outputs, so it is the loop's job (the fused step): a guided raw_fn returns the
2x batch [unconditional; conditional] of one UNet call and carries its weights in `guidance`.
With w <= 1 (no guidance) the UNet sees the conditional batch only, as diffusers does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch

from .ops.step import guide


def _cat(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([a[key], b[key]]) for key in a}


class GuidedDenoiser:
    """raw_fn for a diffusers UNet (2D conditional or class-conditional) and its conditioning.

    cond / uncond: keyword arguments of the UNet call for the batch (e.g. encoder_hidden_states
    or class_labels), each with batch size B. guidance_scale: a float, or a tensor of B values
    (one per sample); None or <= 1 everywhere means no guidance. `guidance` is then the float32
    [B] weights for the loop, or None. capture_unet: the UNet callable to use inside a captured
    sampling loop (the graph loop), if it differs from `unet` (e.g. without graphs of its own).
    """

    def __init__(
        self,
        unet: Callable,
        cond: Mapping[str, torch.Tensor],
        uncond: Mapping[str, torch.Tensor] | None = None,
        guidance_scale: float | torch.Tensor | None = None,
        *,
        capture_unet: Callable | None = None,
    ):
        self.unet = unet
        self.capture_unet = capture_unet or unet
        self.calls = 0
        w = guidance_scale
        self.guided = (
            uncond is not None and w is not None and (bool(torch.any(w > 1)) if isinstance(w, torch.Tensor) else w > 1)
        )
        self.guidance = None
        if self.guided:
            self.kwargs = _cat(uncond, cond)
            # Made here, once, so that the sampling loop copies nothing to the device.
            first = next(iter(cond.values()))
            if isinstance(w, torch.Tensor):
                self.guidance = w.reshape(-1).to(device=first.device, dtype=torch.float32)
            else:
                self.guidance = torch.full((first.shape[0],), float(w), dtype=torch.float32, device=first.device)
        else:
            self.kwargs = dict(cond)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's raw output for the samples `index` (None: all): [uncond; cond] (2·len rows)
        under guidance, else the conditional output."""
        self.calls += 1
        kwargs = self.kwargs
        if index is not None:
            if self.guided:
                half = next(iter(kwargs.values())).shape[0] // 2
                index = torch.cat([index, index + half])
            kwargs = {key: value.index_select(0, index.to(value.device)) for key, value in kwargs.items()}
        if not self.guided:
            return self.unet(x, t, **kwargs, return_dict=False)[0]
        return self.unet(torch.cat([x, x]), torch.cat([t, t]), **kwargs, return_dict=False)[0]

    # The graph loop's hooks (fastdiff.loops.graph): the conditioning becomes static graph inputs.
    def capture_inputs(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.kwargs.values())

    @property
    def capture_key(self) -> tuple:
        """What a captured loop over this denoiser depends on besides its tensors' layout."""
        return (self.guided, tuple(self.kwargs), getattr(self.capture_unet, "dtype", None))

    def captured(self, inputs) -> GuidedDenoiser:
        """The same denoiser over `inputs` (static copies of `capture_inputs()`), calling
        capture_unet."""
        twin = copy.copy(self)
        twin.unet, twin.kwargs, twin.calls = self.capture_unet, dict(zip(self.kwargs, inputs)), 0
        return twin


class Unguided:
    """A model_fn(x, t) -> output whose samples are independent (e.g. the exact Gaussian-mixture
    denoiser) as a raw_fn: `index` changes nothing, and there is no guidance."""

    guidance = None

    def __init__(self, model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.model_fn = model_fn

    def __call__(self, x: torch.Tensor, t: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        return self.model_fn(x, t)


class GuidedOutput:
    """A guided raw_fn as a raw_fn of guided outputs: g = u + w·(c − u) applied here with the
    fused step's own arithmetic (`fastdiff.ops.guide`), for a loop run without guidance whose
    caller records the outputs the plan combines (calibration)."""

    guidance = None

    def __init__(self, raw_fn):
        self.raw_fn = raw_fn

    def __call__(self, x: torch.Tensor, t: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        raw = self.raw_fn(x, t, index)
        w = self.raw_fn.guidance
        if w is None:
            return raw
        u, c = raw.chunk(2)
        return guide(u, c, w if index is None else w[index.to(w.device)]).to(raw.dtype)
