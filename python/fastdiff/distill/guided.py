"""Stage 1 of guided distillation (Meng et al. 2023, §3.1): one UNet call for the guided output.

The student x̂_η(z_t, w) takes the guidance weight w as an input (`student.make_student`) and is
trained to match the teacher's classifier-free-guided prediction

    x̂_w(z_t) = (1 + w')·x̂_c(z_t) − w'·x̂_u(z_t)       (the paper's eq. 6, w' = w − 1)

for w ~ U[w_min, w_max] (diffusers' convention: w = 1 is the conditional model, the paper's
w' = 0), at z_t = α_t·x + σ_t·ε with x from the data set and t uniform over the teacher's training
steps. The loss is the paper's λ-weighted x-space error ω(λ_t)·‖x̂_η − x̂_w‖² with the truncated
SNR weight ω = max(e^λ, 1) of progressive distillation (Salimans & Ho 2022, §4). The teacher's
guided output comes from the engine's own denoiser and guidance arithmetic (`fastdiff.ops.guide`),
the same that sampling uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..denoisers import GuidedOutput
from ..schedules import data_prediction
from . import data as _data
from .student import Student, make_student, save_student, weights_fingerprint
from .train import DistillError, TrainingRun, train_loop

FORMAT = 1


@dataclass
class GuidedResult:
    """The student directory, the trained Student and what the run reported."""

    directory: Path
    student: Student
    info: dict


def schedule_tables(schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """α_t and σ_t at the training steps t = 0..T-1 (float32)."""
    return (
        torch.tensor(schedule.alpha_table, dtype=torch.float32),
        torch.tensor(schedule.sigma_table, dtype=torch.float32),
    )


def truncated_snr_weight(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """ω(λ) = max(SNR, 1), SNR = α²/σ² (Salimans & Ho 2022, "truncated SNR" weighting of the x-space loss)."""
    return torch.clamp(alpha**2 / sigma**2, min=1.0)


def check_w_range(w_range) -> tuple[float, float]:
    lo, hi = (float(v) for v in w_range)
    if not (1.0 <= lo <= hi) or hi > 30:
        raise ValueError(
            f"w_range must be 1 <= w_min <= w_max <= 30 (diffusers' guidance scale: 1 = no guidance), got {w_range!r}"
        )
    return lo, hi


def distill_guided(
    engine,
    out,
    *,
    steps: int = 2000,
    batch: int = 64,
    lr: float = 1e-4,
    w_range=(1.0, 5.0),
    seed: int = 0,
    data=None,
    teacher_dir=None,
    checkpoint_every: int = 100,
    stop_after: int | None = None,
    progress: bool = True,
) -> GuidedResult:
    """Train a guidance-conditioned student of `engine`'s UNet for `steps` AdamW steps of `batch`
    samples and write its model directory to `out` (the run's checkpoints and loss log in
    out/run/). Resumes a killed run in `out` (identically); refuses one of other settings.
    teacher_dir: the teacher's model directory (default: the engine's, where its plans/ are).
    stop_after: stop after this many steps as if killed (tests)."""
    for name, value in (("steps", steps), ("batch", batch), ("checkpoint_every", checkpoint_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    lo, hi = check_w_range(w_range)
    if getattr(engine.conditioner, "embeds_guidance", False):
        raise DistillError(f"{engine.name} is already a guidance-distilled student: distil its teacher instead")
    teacher_dir = Path(teacher_dir) if teacher_dir is not None else Path(engine.plans_dir).parent
    data = _data.for_engine(engine) if data is None else data
    out = Path(out)
    settings = {
        "format": FORMAT,
        "stage": "guided",
        "teacher": engine.name,
        "teacher_weights": weights_fingerprint(engine.unet),
        "schedule": engine.schedule.fingerprint,
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "w_range": [lo, hi],
        "seed": seed,
        "loss": "x-space, max(SNR, 1)",
    }
    run = TrainingRun(out / "run", settings, name="guided distillation")
    student = make_student(engine.unet, seed).to(engine.device)
    alpha, sigma = schedule_tables(engine.schedule)
    prediction = engine.schedule.prediction_type
    device = engine.device

    def loss_fn(step: int, g: torch.Generator) -> torch.Tensor:
        x0, prompts = data.sample(batch, g)
        t = torch.randint(0, alpha.numel(), (batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        w = lo + (hi - lo) * torch.rand(batch, generator=g)
        a, s = alpha[t].view(-1, 1, 1, 1), sigma[t].view(-1, 1, 1, 1)
        x0, eps, a, s, w, t = (v.to(device) for v in (x0, eps, a, s, w, t))
        z = a * x0 + s * eps
        tt = t.to(torch.float32)
        with torch.no_grad():
            teacher = GuidedOutput(engine.denoiser(prompts, guidance_scale=w))(z, tt).float()
            target = data_prediction(teacher, z, a, s, prediction)
            cond = engine.conditioner.encode(prompts, device, torch.float32)
        guess = data_prediction(student(z, tt, cond, w), z, a, s, prediction)
        weight = truncated_snr_weight(a, s).view(-1)
        return (weight * ((guess - target) ** 2).mean(dim=(1, 2, 3))).mean()

    report = train_loop(
        run,
        student,
        loss_fn,
        steps=steps,
        lr=lr,
        seed=seed,
        checkpoint_every=checkpoint_every,
        stop_after=stop_after,
        progress=progress,
        desc="guided distillation",
    )
    info = {**settings, "loss_final": report["loss"]}
    if "stopped" in report:
        return GuidedResult(out, student, {**info, "stopped": report["stopped"]})
    save_student(student, out, teacher_dir=teacher_dir, info=info)
    run.finish({"loss": report["loss"], "seconds": round(report["seconds"], 1)})
    return GuidedResult(out, student, json.loads((out / "fastdiff.json").read_text())["student"])
