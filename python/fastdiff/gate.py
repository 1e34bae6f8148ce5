"""AdaptiveDiffusion's step-skipping gate (Ye et al., NeurIPS 2024), torch reference.

Statistic on the latent trajectory: d_k = mean|x_k − x_{k−1}| per sample. The next model call
(at x_k) is skipped iff the third-order difference is small against the step size:

    |d_k − 2·d_{k−1} + d_{k−2}| <= 2·delta·d_{k−1}

and a skipped call reuses the previous model output (the solver's update still runs). Calls
0..warmup−1 are always made (and the rule needs d_{k−2}, so never before call 3); at most
`max_skips` calls in a row are skipped per sample, counted from the first call on.

Departures from the reference code, all fixes of its known weaknesses: the state is reset per
sampling call (`reset`), every sample decides for itself (a [B] flag tensor, not one decision
for the batch), statistics are float32 whatever the latent dtype, and the history is O(1): the
previous latent and the last two d's, never the trajectory. The flag stays on the latents'
device, so the loop never syncs with the host to decide.
"""

from __future__ import annotations

import torch


class AdaptiveGate:
    def __init__(self, delta: float = 0.01, max_skips: int = 4, warmup: int = 3):
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not delta >= 0:
            raise ValueError(f"AdaptiveGate: delta must be a number >= 0, got {delta!r}")
        for name, value in (("max_skips", max_skips), ("warmup", warmup)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"AdaptiveGate: {name} must be an integer >= 0, got {value!r}")
        self.delta = float(delta)
        self.max_skips = max_skips
        self.warmup = warmup
        self.reset()

    def __repr__(self) -> str:
        return f"AdaptiveGate(delta={self.delta:g}, max_skips={self.max_skips}, warmup={self.warmup})"

    def reset(self) -> None:
        """Forget the trajectory: call at the start of every sampling call."""
        self._prev: torch.Tensor | None = None  # x_{k−1} (a copy: loops overwrite latents in place)
        self._d1: torch.Tensor | None = None  # d_{k−1}
        self._d2: torch.Tensor | None = None  # d_{k−2}
        self._run: torch.Tensor | None = None  # consecutive skips so far, per sample
        self.calls = 0  # latents observed since the reset (= index of the next model call)

    def observe(self, x: torch.Tensor) -> torch.Tensor:
        """Record the next model input x_k ([B, ...]); return a bool [B] tensor on x's device,
        True where the call at x_k may be skipped (reuse the last output)."""
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or not x.is_floating_point():
            raise ValueError("AdaptiveGate.observe: expected a floating-point latent tensor [batch, ...]")
        if self._prev is not None and (x.shape != self._prev.shape or x.device != self._prev.device):
            raise ValueError(
                f"AdaptiveGate.observe: latent {tuple(x.shape)} on {x.device} after {tuple(self._prev.shape)} on "
                f"{self._prev.device}: call reset() before a new sampling call"
            )
        k = self.calls
        self.calls += 1
        batch = x.shape[0]
        skip = torch.zeros(batch, dtype=torch.bool, device=x.device)
        if self._prev is None:
            self._run = torch.zeros(batch, dtype=torch.int32, device=x.device)
        else:
            d = (x.float() - self._prev.float()).abs().reshape(batch, -1).mean(dim=1)
            if self._d2 is not None and k >= self.warmup:
                third = (d - 2 * self._d1 + self._d2).abs()
                skip = (third <= 2 * self.delta * self._d1) & (self._run < self.max_skips)
            self._d2, self._d1 = self._d1, d
        self._run = torch.where(skip, self._run + 1, torch.zeros_like(self._run))
        self._prev = x.detach().clone()
        return skip
