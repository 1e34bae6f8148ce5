"""A gate that calibrates itself: pick delta and max_skips for one model and plan from a few
calibration prompts so that held-out prompts keep a target fidelity.

`calibrate_gate(engine, steps=50, target_psnr=35)` samples the calibration prompts once without
skipping (the reference) and once per setting of a grid (delta × max_skips × per-sample or
per-batch decisions), measures the mean UNet calls per image, the UNet time and the fidelity of
the 8-bit images to the reference (pooled, median and worst-image PSNR, SSIM:
`fastdiff.calibration.fidelity`), and keeps the fastest setting that meets both the pooled target and
a floor for the worst image. Fastest in UNet time, not in calls, because per-sample decisions
split the batch into smaller UNet calls that cost nearly as much as whole ones where calls are
overhead-bound (small models, the CPU). The UNet time of a run is modelled, not clocked, so the
choice does not depend on what else the machine runs: a call on b samples costs α + β·b, with α
and β fitted to timed UNet calls on the whole batch and on one sample (the fastest of several),
summed over the calls each run made (`cost_model`). Calibrate on the machine and batch size you
serve with. Two guards:

- the error cliff: PSNR falls off a cliff once delta lets the gate skip through a hard part of
  the trajectory; the drop between neighbouring deltas is measured per max_skips (`cliff`) and
  a setting is chosen only when the next larger delta also meets the target (one grid step of
  margin), so prompts a little harder than the calibration set do not fall over the edge;
- the worst image: a setting whose pooled PSNR is fine but which changes one image visibly is
  refused (`worst_psnr`, by default target − 10 dB).

The chosen setting is then run on held-out prompts (another seed) and reported with the same
figures, next to the baseline it has to beat: the same sampler without skipping at as many steps
as the chosen setting makes calls per image (`fewer_steps`), on both prompt sets. On the shipped
models that baseline ties with the gate at 50 steps up to about 2.6x fewer calls and beats it at
20 steps and beyond (README, "Step skipping vs the caching peers"): skipping pays where the plan
is fixed (a served step count, a calibrated plan) or where fewer steps lose more than on these
small models. A target that no setting meets is said so (`met` False, `message`) and the closest
setting, the one with the highest pooled PSNR, is returned. `save` writes the result as JSON; a
model directory's gates/<sampler>-<steps>.json is what `skip="adaptive"` uses for that plan
(`Engine.gate_for`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..files import atomic_write
from ..gate import SETTINGS_SCHEMA as SCHEMA
from ..gate import GateSettingsError, GateSpec, read_settings
from .fidelity import fidelity

DELTAS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
MAX_SKIPS = (1, 2, 3, 4, 6)
WORST_MARGIN_DB = 10.0  # default worst-image floor: target − this


class GateCalibrationError(GateSettingsError):
    """Unusable calibration settings or a corrupt gate settings file."""


@dataclass
class GateTrial:
    """One gate setting measured on a prompt set."""

    gate: GateSpec
    calls: float  # mean UNet calls per image
    speedup: float  # steps / calls
    fidelity: dict  # fastdiff.calibration.fidelity.fidelity
    seconds: float  # wall time of the sample call (clocked: depends on the machine's load)
    unet_speedup: float  # modelled UNet time of the run without skipping / of this run

    def meets(self, target: float, worst: float) -> bool:
        return self.fidelity["psnr"] >= target and self.fidelity["psnr_worst"] >= worst

    def to_dict(self) -> dict:
        return {**asdict(self), "gate": self.gate.to_dict()}

    @classmethod
    def from_dict(cls, doc: dict) -> GateTrial:
        return cls(**{**doc, "gate": GateSpec(**doc["gate"])})


@dataclass
class GateCalibration:
    """What calibrate_gate chose, why, and what it measured."""

    model: str
    sampler: str
    steps: int
    plan_hash: str
    guidance: float
    target_psnr: float
    worst_psnr: float
    gate: GateSpec
    met: bool
    message: str
    trials: list[GateTrial]  # the grid on the calibration prompts
    chosen: GateTrial  # the chosen setting on the calibration prompts
    held_out: GateTrial | None  # the chosen setting on held-out prompts
    cliff: list[dict] = field(default_factory=list)  # per max_skips: the largest PSNR drop between deltas
    prompts: int = 0
    held_out_prompts: int = 0
    cost_model: dict = field(default_factory=dict)  # alpha, beta (seconds): a UNet call on b samples
    # the baseline: the sampler without skipping at the chosen setting's calls per image (steps,
    # fidelity on the calibration prompts and on the held-out ones against the N-step runs)
    fewer_steps: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        doc = asdict(self)
        doc["gate"] = self.gate.to_dict()
        doc["trials"] = [t.to_dict() for t in self.trials]
        doc["chosen"] = self.chosen.to_dict()
        doc["held_out"] = None if self.held_out is None else self.held_out.to_dict()
        return {"schema": SCHEMA, **doc}

    @classmethod
    def from_dict(cls, doc) -> GateCalibration:
        """The calibration of a settings document (ValueError-derived errors as `load`'s)."""
        try:
            fields = {k: v for k, v in doc.items() if k != "schema"}
            fields["gate"] = GateSpec(**fields["gate"])
            fields["trials"] = [GateTrial.from_dict(t) for t in fields["trials"]]
            fields["chosen"] = GateTrial.from_dict(fields["chosen"])
            fields["held_out"] = None if fields["held_out"] is None else GateTrial.from_dict(fields["held_out"])
            return cls(**fields)
        except (KeyError, TypeError, ValueError) as exc:
            raise GateCalibrationError(f"corrupt gate settings: {type(exc).__name__}: {exc}") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON atomically (a half-written file is never read as complete)."""
        return atomic_write(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> GateCalibration:
        """A settings file with everything measured; `fastdiff.gate.read_settings` reads only the
        chosen GateSpec (what the engine needs). GateSettingsError names the file and the fault."""
        doc, _ = read_settings(path)
        try:
            return cls.from_dict(doc)
        except GateCalibrationError as exc:
            raise GateCalibrationError(f"{path}: {exc}") from None

    def table(self) -> str:
        """The grid as a markdown table (the chosen row marked)."""
        lines = [
            "| decisions | delta | max_skips | calls/image | speed-up (calls) | speed-up (UNet time) | PSNR pooled "
            "| median | worst | SSIM | |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for t in self.trials:
            f = t.fidelity
            mark = "chosen" if t.gate == self.gate else ("meets" if t.meets(self.target_psnr, self.worst_psnr) else "")
            lines.append(
                f"| {'sample' if t.gate.per_sample else 'batch'} | {t.gate.delta:g} | {t.gate.max_skips} | "
                f"{t.calls:.1f} | {t.speedup:.2f}x | {t.unet_speedup:.2f}x | {f['psnr']:.1f} | "
                f"{f['psnr_median']:.1f} | {f['psnr_worst']:.1f} | {f['ssim']:.4f} | {mark} |"
            )
        return "\n".join(lines)


def _check(target_psnr, worst_psnr, deltas, max_skips, per_sample, samples, held_out) -> None:
    if not isinstance(target_psnr, (int, float)) or isinstance(target_psnr, bool) or not 0 < target_psnr < 100:
        raise GateCalibrationError(f"target_psnr must be a number of dB in (0, 100), got {target_psnr!r}")
    if worst_psnr is not None and (not isinstance(worst_psnr, (int, float)) or not 0 < worst_psnr <= target_psnr):
        raise GateCalibrationError(f"worst_psnr must be in (0, target_psnr={target_psnr}], got {worst_psnr!r}")
    if not deltas or any(not (isinstance(d, (int, float)) and 0 < d < float("inf")) for d in deltas):
        raise GateCalibrationError(f"deltas must be positive finite numbers, got {deltas!r}")
    if not max_skips or any(not isinstance(m, int) or isinstance(m, bool) or m < 1 for m in max_skips):
        raise GateCalibrationError(f"max_skips must be integers >= 1, got {max_skips!r}")
    if not per_sample or any(not isinstance(s, bool) for s in per_sample):
        raise GateCalibrationError(f"per_sample must be a non-empty sequence of True/False, got {per_sample!r}")
    for name, value, low in (("samples", samples, 2), ("held_out", held_out, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise GateCalibrationError(f"{name} must be an integer >= {low}, got {value!r}")


def _rows(trials: list[GateTrial]) -> dict[tuple, list[GateTrial]]:
    """The grid's rows: trials that differ only in delta, by increasing delta."""
    rows: dict[tuple, list[GateTrial]] = {}
    for t in trials:
        rows.setdefault((t.gate.per_sample, t.gate.max_skips), []).append(t)
    for row in rows.values():
        row.sort(key=lambda t: t.gate.delta)
    return rows


def _cliffs(trials: list[GateTrial]) -> list[dict]:
    """Per row of the grid, the largest pooled-PSNR drop between neighbouring deltas."""
    out = []
    for (per_sample, m), row in sorted(_rows(trials).items()):
        drops = [(a.fidelity["psnr"] - b.fidelity["psnr"], a, b) for a, b in zip(row, row[1:])]
        if drops:
            drop, a, b = max(drops, key=lambda d: d[0])
            out.append(
                {
                    "per_sample": per_sample,
                    "max_skips": m,
                    "delta_before": a.gate.delta,
                    "delta_after": b.gate.delta,
                    "drop_db": drop,
                }
            )
    return out


def choose(trials: list[GateTrial], target: float, worst: float) -> tuple[GateTrial, bool, str]:
    """The fastest setting (modelled UNet time) that meets the targets with one grid step of margin in
    delta (the next larger delta of its row meets them too, or it is the row's largest); else
    without the margin; else the closest (highest pooled PSNR), not met."""
    safe, feasible = [], []
    for row in _rows(trials).values():
        for i, t in enumerate(row):
            if not t.meets(target, worst):
                continue
            feasible.append(t)
            if i + 1 == len(row) or row[i + 1].meets(target, worst):
                safe.append(t)

    def best(pool):
        return max(pool, key=lambda t: (t.unet_speedup, t.fidelity["psnr"]))

    if safe:
        return best(safe), True, "met with one grid step of margin in delta"
    if feasible:
        return best(feasible), True, "met, without margin: the next larger delta misses the target"
    closest = max(trials, key=lambda t: (t.fidelity["psnr"], t.fidelity["psnr_worst"]))
    f = closest.fidelity
    return (
        closest,
        False,
        f"the target (pooled PSNR >= {target:g} dB, worst image >= {worst:g} dB) cannot be met by any setting "
        f"that skips calls; the closest is delta={closest.gate.delta:g}, max_skips={closest.gate.max_skips} "
        f"({f['psnr']:.1f} dB pooled, {f['psnr_worst']:.1f} dB worst): returned, but consider skip=None",
    )


def calibrate_gate(
    engine,
    *,
    steps: int,
    sampler: str | None = None,
    target_psnr: float = 35.0,
    worst_psnr: float | None = None,
    prompts: list[str] | None = None,
    samples: int = 16,
    held_out: int = 16,
    seed: int = 0,
    guidance_scale: float | None = None,
    deltas=DELTAS,
    max_skips=MAX_SKIPS,
    per_sample=(False, True),
    warmup: int = 3,
    reuse: str = "extrapolate",
    progress: bool = True,
) -> GateCalibration:
    """Calibrate the skip gate of `engine` for (sampler, steps); see the module docstring.

    prompts: calibration prompts (default: `samples` from the model's prompt grammar with `seed`);
    held-out prompts and their noise come from seed + 1 (none with held_out=0). Every run uses
    the same noise as its reference run without skipping.
    """
    from ..models.registry import calibration_prompts

    _check(target_psnr, worst_psnr, deltas, max_skips, per_sample, samples, held_out)
    worst = target_psnr - WORST_MARGIN_DB if worst_psnr is None else float(worst_psnr)
    requested = sampler or engine.sampler  # "auto" stays auto for the fewer-steps baseline below
    sampler = engine.resolve_sampler(sampler, steps)
    plan = engine.plan_for(sampler, steps)
    first = GateSpec(warmup=warmup).first_call
    if plan.num_calls <= first:
        raise GateCalibrationError(
            f"{sampler} at {steps} steps makes {plan.num_calls} model calls: the gate decides from call "
            f"{first} on (warm-up), so there is nothing to skip; use more steps"
        )
    guidance = engine.guidance_scale if guidance_scale is None else float(guidance_scale)
    if prompts is None:
        prompts = calibration_prompts(engine.name, samples, seed=seed)
    test = calibration_prompts(engine.name, held_out, seed=seed + 1) if held_out else []

    def run(batch, gate, noise=seed):
        out = engine.sample(batch, plan=plan, seed=noise, guidance_scale=guidance, skip=gate)
        return out, out.timings["total"]

    alpha, beta = cost_model(engine, prompts, plan, guidance, seed)

    def unet_time(out) -> float:
        batch = len(out.nfe)
        per_call = [batch - sum(k in s for s in out.skipped) for k in range(plan.num_calls)]
        return sum(alpha + beta * c for c in per_call if c > 0)

    def trial(batch, gate, reference, noise=seed) -> GateTrial:
        out, seconds = run(batch, gate, noise)
        calls = float(np.mean(out.nfe))
        quality = fidelity(out.images, reference.images)
        speedup = unet_time(reference) / unet_time(out)
        return GateTrial(gate, calls, plan.num_calls / calls, quality, seconds, speedup)

    grid = [
        GateSpec(delta=d, max_skips=m, warmup=warmup, per_sample=s, reuse=reuse)
        for s in per_sample
        for m in max_skips
        for d in sorted(deltas)
    ]
    bar = _progress(len(grid) + 3 + (3 if test else 0), progress, f"calibrating the gate of {engine.name}")
    reference, _ = run(prompts, None)
    bar.update(1)
    trials = []
    for gate in grid:
        trials.append(trial(prompts, gate, reference))
        bar.set_postfix(delta=gate.delta, max_skips=gate.max_skips, psnr=f"{trials[-1].fidelity['psnr']:.1f}")
        bar.update(1)
    chosen, met, message = choose(trials, float(target_psnr), worst)
    fewer = max(1, round(chosen.calls))
    fewer_plan = engine.plan_for(requested, fewer)

    def baseline(batch, reference, noise) -> dict:
        """The sampler at `fewer` steps without skipping against the N-step run."""
        out = engine.sample(batch, plan=fewer_plan, seed=noise, guidance_scale=guidance)
        bar.update(1)
        return fidelity(out.images, reference.images)

    fewer_steps = {
        "sampler": engine.resolve_sampler(requested, fewer),
        "steps": fewer,
        "calls": float(fewer_plan.num_calls),
        "calibration": baseline(prompts, reference, seed),
    }
    checked = None
    if test:
        test_reference, _ = run(test, None, seed + 1)
        bar.update(1)
        checked = trial(test, chosen.gate, test_reference, seed + 1)
        bar.update(1)
        fewer_steps["held_out"] = baseline(test, test_reference, seed + 1)
        if met and not checked.meets(float(target_psnr), worst):
            f = checked.fidelity
            message += (
                f"; held-out prompts miss it ({f['psnr']:.1f} dB pooled, {f['psnr_worst']:.1f} dB worst): "
                "calibrate on more prompts or lower the target"
            )
    bar.update(1)
    bar.close()
    return GateCalibration(
        model=engine.name,
        sampler=sampler,
        steps=steps,
        plan_hash=plan.hash(),
        guidance=guidance,
        target_psnr=float(target_psnr),
        worst_psnr=worst,
        gate=chosen.gate,
        met=met,
        message=message,
        trials=trials,
        chosen=chosen,
        held_out=checked,
        cliff=_cliffs(trials),
        prompts=len(prompts),
        held_out_prompts=len(test),
        cost_model={"alpha": alpha, "beta": beta, "batch": len(prompts)},
        fewer_steps=fewer_steps,
    )


def cost_model(engine, prompts, plan, guidance: float, seed: int, repeats: int = 5) -> tuple[float, float]:
    """(α, β) in seconds: a UNet call on b of these samples costs α + β·b, from the fastest of
    `repeats` timed calls on all of them and on one (β = 0 for a single prompt)."""
    import time

    import torch

    denoiser = engine.denoiser(list(prompts), guidance_scale=guidance)
    x = engine.initial_noise(len(prompts), seed=seed)
    t = torch.full((len(prompts),), float(plan.times[plan.num_calls // 2]), device=x.device)

    def clock(index) -> float:
        best = float("inf")
        sel = None if index is None else torch.tensor(index, device=x.device)
        xs, ts = (x, t) if sel is None else (x[sel], t[sel])
        with torch.no_grad():
            for _ in range(repeats):
                engine._sync()
                start = time.perf_counter()
                denoiser(xs, ts, sel)
                engine._sync()
                best = min(best, time.perf_counter() - start)
        return best

    whole = clock(None)
    if len(prompts) == 1:
        return whole, 0.0
    one = clock([0])
    beta = max(0.0, (whole - one) / (len(prompts) - 1))
    return max(0.0, one - beta), beta


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)
