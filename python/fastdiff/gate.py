"""AdaptiveDiffusion's step-skipping gate (Ye et al., NeurIPS 2024).

Statistic on the latent trajectory: d_k = mean|x_k − x_{k−1}| per sample. The next model call
(at x_k) is skipped iff the third-order difference is small against the step size:

    |d_k − 2·d_{k−1} + d_{k−2}| <= 2·delta·d_{k−1}

and a skipped call reuses the previous model output (the solver's update still runs). Calls
0..warmup−1 are always made (and the rule needs d_{k−2}, so never before call 3); at most
`max_skips` calls in a row are skipped per sample, counted from the first call on.

Departures from the reference code, all fixes of its known weaknesses: the state is reset per
sampling call (`reset`), every sample decides for itself (a [B] flag tensor, not one decision
for the batch), statistics are float32 whatever the latent dtype, and the history is O(1): the
previous latent (only when fed latents) and the last two d's, never the trajectory. The flag
stays on the latents' device, so deciding never syncs with the host.

Three ways in: `observe(x_k)` (latents; the torch reference), `observe_stat(d_k)` (the
statistic computed by the fused step, `fastdiff.ops.fused_step`), and `observe_partials` (the
fused Triton step's per-block sums, reduced and decided by one Triton launch).
"""

from __future__ import annotations

import torch


class AdaptiveGate:
    def __init__(self, delta: float = 0.01, max_skips: int = 4, warmup: int = 3, per_sample: bool = True):
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not delta >= 0:
            raise ValueError(f"AdaptiveGate: delta must be a number >= 0, got {delta!r}")
        for name, value in (("max_skips", max_skips), ("warmup", warmup)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"AdaptiveGate: {name} must be an integer >= 0, got {value!r}")
        self.delta = float(delta)
        self.max_skips = max_skips
        self.warmup = warmup
        # per_sample=False: the sampling loop decides for the whole batch from the batch-mean
        # statistic (the reference code's behaviour; what a graph-captured loop can use).
        self.per_sample = bool(per_sample)
        self.reset()

    def __repr__(self) -> str:
        return (
            f"AdaptiveGate(delta={self.delta:g}, max_skips={self.max_skips}, warmup={self.warmup}, "
            f"per_sample={self.per_sample})"
        )

    def reset(self) -> None:
        """Forget the trajectory: call at the start of every sampling call."""
        self._prev: torch.Tensor | None = None  # x_{k−1} (a copy: loops overwrite latents in place)
        self._d1: torch.Tensor | None = None  # d_{k−1}, float32 [B]
        self._d2: torch.Tensor | None = None  # d_{k−2}
        self._run: torch.Tensor | None = None  # consecutive skips so far, int32 [B]
        self.calls = 0  # latents observed since the reset (= index of the next model call)

    def start(self, batch: int, device) -> None:
        """Reset and record the first model input x_0 of a batch (call 0 is always made); the
        next statistic passed to `observe_stat` is then d_1."""
        self.reset()
        self._d1 = torch.zeros(batch, dtype=torch.float32, device=device)
        self._d2 = torch.zeros_like(self._d1)
        self._run = torch.zeros(batch, dtype=torch.int32, device=device)
        self.calls = 1

    def _next_call(self, method: str) -> bool:
        """Count the call being decided (after `start`); True when the rule applies to it."""
        if self._run is None:
            raise RuntimeError(f"AdaptiveGate.{method}: call start(batch, device) first")
        k = self.calls
        self.calls += 1
        return k >= max(3, self.warmup)  # the rule needs d_{k−2}: never before call 3

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
        batch = x.shape[0]
        if self._prev is None:
            self.start(batch, x.device)
            skip = torch.zeros(batch, dtype=torch.bool, device=x.device)
        else:
            skip = self.observe_stat((x.float() - self._prev.float()).abs().reshape(batch, -1).mean(dim=1))
        self._prev = x.detach().clone()
        return skip

    def observe_stat(self, d: torch.Tensor) -> torch.Tensor:
        """The decision for call k from d_k = mean|x_k − x_{k−1}| (float32 [B], e.g. from the
        fused step) after `start`; returns the bool [B] skip flags and advances the state."""
        if self._run is not None and (d.shape != self._d1.shape or d.device != self._d1.device):
            raise ValueError(
                f"AdaptiveGate.observe_stat: statistic {tuple(d.shape)} on {d.device} for a batch of "
                f"{tuple(self._d1.shape)} on {self._d1.device}"
            )
        active = self._next_call("observe_stat")
        d = d.to(torch.float32, copy=True)  # the caller may reuse its buffer
        if active:
            third = (d - 2 * self._d1 + self._d2).abs()
            skip = (third <= 2 * self.delta * self._d1) & (self._run < self.max_skips)
        else:
            skip = torch.zeros(d.shape, dtype=torch.bool, device=d.device)
        self._d2, self._d1 = self._d1, d
        self._run = torch.where(skip, self._run + 1, torch.zeros_like(self._run))
        return skip

    def observe_partials(self, partials: torch.Tensor, n: int) -> torch.Tensor:
        """Like `observe_stat` with d_k given as per-block sums of |x_k − x_{k−1}| over n
        elements per sample (float32 [B, blocks], from the Triton fused step): one Triton launch
        reduces and decides, keeping the state on the device."""
        from .ops import triton_step

        active = self._next_call("observe_partials")
        flags = torch.empty(self._run.shape, dtype=torch.int8, device=self._run.device)
        triton_step.gate_decide(
            partials,
            n,
            self._d1,
            self._d2,
            self._run,
            flags,
            active=active,
            delta=self.delta,
            max_skips=self.max_skips,
        )
        return flags.view(torch.bool)
