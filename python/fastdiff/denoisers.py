"""The model contract of the executor, model_fn(x, t) -> raw output, and the adapters that turn
a conditional UNet plus classifier-free guidance into one.

Guidance out = u + w·(c − u) (Ho & Salimans 2022, eq. 6 with w = 1 + their w) is linear in the
outputs, so it happens inside the adapter: one UNet call on the 2x batch [unconditional;
conditional], then the combination. With w <= 1 (no guidance) the UNet sees the conditional
batch only, as diffusers does.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch


def _cat(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([a[key], b[key]]) for key in a}


class GuidedDenoiser:
    """model_fn for a diffusers UNet (2D conditional or class-conditional) with CFG.

    cond / uncond: keyword arguments of the UNet call for the batch (e.g. encoder_hidden_states
    or class_labels), each with batch size B. guidance_scale: a float, or a tensor of B values
    (one per sample); None or <= 1 everywhere means no guidance.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        cond: Mapping[str, torch.Tensor],
        uncond: Mapping[str, torch.Tensor] | None = None,
        guidance_scale: float | torch.Tensor | None = None,
    ):
        self.unet = unet
        self.calls = 0
        w = guidance_scale
        if isinstance(w, torch.Tensor) and bool(torch.all(w == w.flatten()[0])):
            w = float(w.flatten()[0])
        self.guided = (
            uncond is not None and w is not None and (bool(torch.any(w > 1)) if isinstance(w, torch.Tensor) else w > 1)
        )
        self._w = None
        if self.guided:
            self.kwargs = _cat(uncond, cond)
            self.scale = w if not isinstance(w, torch.Tensor) else w.reshape(-1, *[1] * 3)
            # The fused step's float32 weights, made here so the sampling loop copies nothing to the device.
            first = next(iter(cond.values()))
            if isinstance(w, torch.Tensor):
                self._w = w.reshape(-1).to(device=first.device, dtype=torch.float32)
            else:
                self._w = torch.full((first.shape[0],), float(w), dtype=torch.float32, device=first.device)
        else:
            self.kwargs = dict(cond)
            self.scale = None

    def with_inputs(self, unet, kwargs: Mapping[str, torch.Tensor]) -> GuidedDenoiser:
        """The same guidance over another UNet callable and conditioning tensors of the same
        layout (a captured graph's static copies)."""
        twin = copy.copy(self)
        twin.unet, twin.kwargs, twin.calls = unet, dict(kwargs), 0
        return twin

    def weights(self, batch: int, device) -> torch.Tensor | None:
        """The guidance weights as a float32 [batch] tensor (for the fused step), None without guidance."""
        if not self.guided:
            return None
        return self._w.to(device).expand(batch).contiguous()

    def raw(self, x: torch.Tensor, t: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's raw output for the samples `index` (None: all): [uncond; cond] (2·len
        rows) under guidance, else the conditional output; guidance is left to the fused step."""
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

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.raw(x, t)
        if not self.guided:
            return out
        uncond, cond = out.chunk(2)
        scale = self.scale if not isinstance(self.scale, torch.Tensor) else self.scale.to(out.dtype)
        return uncond + scale * (cond - uncond)
