"""GateSpec: the settings of AdaptiveDiffusion's step-skipping gate (Ye et al., NeurIPS 2024),
and its decision rule.

Statistic on the latent trajectory: d_k = mean|x_k − x_{k−1}| per sample, in float32. The next
model call (at x_k) is skipped iff the third-order difference is small against the step size:

    |d_k − 2·d_{k−1} + d_{k−2}| <= 2·delta·d_{k−1}

and a skipped call's (guided) model output is predicted from the previous two (`reuse`, below);
the solver's update still runs.
Calls before `GateSpec.active` are always made (the rule needs d_{k−2}, so never before call 3,
and not before `warmup`); at most `max_skips` calls in a row are skipped, and a run of skips
starts only after `GateSpec.refresh` calls in a row were made (1 for "copy"; 2 for
"extrapolate", see below).

What a skipped call uses (`reuse`): "extrapolate" (the default) predicts its output on the line
through the previous two outputs at the call's time (`fastdiff.program.extrapolation_rows`: the
same linear-subspace view as OLSS, so it is one more row of the fused step's tables);
"copy" repeats the last output, as AdaptiveDiffusion's reference code does. On tiny-shapes
(DPM-Solver++(2M), 50 steps) extrapolation cuts the one-step prediction error from 3.8% to 1.2%
of the output (bench/test_gate_quality.py measures what that buys).

Why extrapolation needs two made calls before a run (`refresh` = 2): within a run the line
through the last two outputs stays the line through the two made calls before it (a predicted
point lies on it), but a run that started right after a single made call would draw its line
through that call and a *predicted* output, and each such restart multiplies the earlier
prediction error (by 2 for runs of two: with runs of two skips after single calls the error grows
as 2^(calls/3); tiny-shapes, DPM-Solver++(2M) 50 steps, skipping every allowed call: 7 dB PSNR,
noise). With two made calls before every run the lines always pass through made outputs and the
errors of successive runs do not compound (same setting: 44.5 dB).

A GateSpec is frozen data: every loop keeps its own decision state (d_{k−1}, d_{k−2} and `run`
per decision group, O(1) per sample, on the latents' device: run > 0 counts the skips in a row,
run <= 0 is minus the made calls in a row, at most `refresh`; it starts at 0) and applies `decide` (the
torch rule here), the Triton decision kernel (`fastdiff.ops.triton_step.gate_decide`) or the C++
twin (`fd_gate_active`/`fd_gate_observe` in csrc/include/fastdiff/step_math.h) to it.
`to_dict` is what the C++ runtime reads (`fastdiff::GateOptions`).

Departures from the reference code, all fixes of its known weaknesses: the state is fresh per
sampling call, every sample decides for itself (per_sample=True; False decides once per batch
from the batch-mean statistic, as the reference code and a graph-captured loop do), and
statistics are float32 whatever the latent dtype.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

REUSE_MODES = ("extrapolate", "copy")  # GateSpec.reuse; fastdiff.program.Program.reuse_rows builds each
MIN_ACTIVE_CALL = 3  # the rule reads d_{k−2}: the first call it can decide is call 3


@dataclass(frozen=True)
class GateSpec:
    delta: float = 0.01
    max_skips: int = 4
    warmup: int = 3
    per_sample: bool = True
    reuse: str = "extrapolate"

    def __post_init__(self):
        delta = self.delta
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 <= delta < float("inf"):
            raise ValueError(f"GateSpec: delta must be a finite number >= 0, got {delta!r}")
        for name in ("max_skips", "warmup"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"GateSpec: {name} must be an integer >= 0, got {value!r}")
        if not isinstance(self.per_sample, bool):
            raise ValueError(f"GateSpec: per_sample must be True or False, got {self.per_sample!r}")
        if self.reuse not in REUSE_MODES:
            raise ValueError(f"GateSpec: reuse must be one of {', '.join(map(repr, REUSE_MODES))}, got {self.reuse!r}")
        object.__setattr__(self, "delta", float(delta))

    @classmethod
    def from_skip(cls, skip) -> GateSpec | None:
        """What the API's ``skip=`` argument means: None (no skipping), "adaptive" (the default
        settings) or a GateSpec."""
        if skip is None or isinstance(skip, GateSpec):
            return skip
        if isinstance(skip, str) and skip == "adaptive":
            return cls()
        raise ValueError(f"skip must be None, 'adaptive' or a GateSpec, got {skip!r}")

    def to_dict(self) -> dict:
        """The settings by name, as the C++ runtime's GateOptions holds them."""
        return asdict(self)

    @property
    def refresh(self) -> int:
        """How many calls in a row must have been made before a run of skips may start: 2 when
        skipped calls extrapolate (so each run's line passes through two made outputs, module
        docstring), 1 when they copy (AdaptiveDiffusion's rule)."""
        return 2 if self.reuse == "extrapolate" else 1

    @property
    def first_call(self) -> int:
        """The first model call (0-based) the rule may skip: never before call 3, nor the warm-up."""
        return max(MIN_ACTIVE_CALL, self.warmup)

    def active(self, call: int) -> bool:
        """Whether the rule may skip model call `call` (0-based); earlier calls always run."""
        return call >= self.first_call

    def decide(self, call: int, d, d1, d2, run):
        """The torch reference of the rule for model call `call`, from its statistic d = d_k
        (float32 tensor, one value per decision group) and the state (d1 = d_{k−1}, d2 = d_{k−2},
        run: int32, > 0 skips in a row, <= 0 minus the made calls in a row, capped at `refresh`).
        Returns (skip flags, new d1, new d2, new run); nothing is read back to the host."""
        import torch

        d = d.to(torch.float32, copy=True)  # the caller may reuse its buffer
        skip = torch.zeros(d.shape, dtype=torch.bool, device=d.device)
        if self.active(call):
            third = (d - 2 * d1 + d2).abs()
            may = torch.where(run > 0, run < self.max_skips, (run <= -self.refresh) & (self.max_skips > 0))
            skip = (third <= 2 * self.delta * d1) & may
        made = torch.clamp(torch.clamp(run, max=0) - 1, min=-self.refresh)
        return skip, d, d1, torch.where(skip, torch.clamp(run, min=0) + 1, made)


SETTINGS_SCHEMA = "fastdiff.gate/1"  # gate settings files (fastdiff.calibration.gate writes them)


class GateSettingsError(ValueError):
    """A gate settings file that cannot be read: not JSON, another schema, corrupt settings."""


def read_settings(path) -> tuple[dict, GateSpec]:
    """A gate settings file (`fastdiff calibrate-gate --out`): its JSON document and the GateSpec
    it chose; GateSettingsError names the file and what is wrong."""
    import json
    from pathlib import Path

    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GateSettingsError(f"{path}: cannot read gate settings: {exc}") from None
    if not isinstance(doc, dict) or doc.get("schema") != SETTINGS_SCHEMA:
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise GateSettingsError(f"{path}: not a gate settings file: schema {found!r}, expected {SETTINGS_SCHEMA!r}")
    try:
        return doc, GateSpec(**doc["gate"])
    except (KeyError, TypeError, ValueError) as exc:
        raise GateSettingsError(f"{path}: corrupt gate settings: {type(exc).__name__}: {exc}") from None
