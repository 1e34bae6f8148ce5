"""Stage 2 of guided distillation (Meng et al. 2023, §3.2; Salimans & Ho 2022, Algorithm 2):
halve the sampling steps of a w-conditioned student, round after round (N → N/2 → … → 1).

In the round to M steps the teacher is the 2M-step student (the stage-1 student for the first
round) sampled with deterministic DDIM on the model's own grid (diffusers' "trailing" spacing,
whose M-step times are every other of the 2M-step ones). From z_t = α_t·x + σ_t·ε at a time t_i
of the teacher's 2M grid, the teacher takes two DDIM steps, t_i → t_{i+1} → t_{i+2}, and the
student learns the x̂ that reaches the same z'' in one DDIM step:

    x̃ = (z'' − (σ''/σ_t)·z_t) / (α'' − (σ''/σ_t)·α_t)          (Salimans & Ho, Algorithm 2)

with the guidance weight w ~ U[w_min, w_max] given to both, and the loss ω(λ_t)·‖x̂ − x̃‖²
(truncated SNR weight, as in stage 1). Times i are drawn from the whole 2M grid, not only the
M-step student's own (the even i): the deterministic M-step sampler uses the even ones, the
paper's stochastic 2M-call sampler (`stochastic_plan`: a DDIM step of twice the length, then one
back with fresh noise) all of them; at the last time the target is the teacher's single step to
the end (the paper's edge case). Each round's student is a model directory (steps-M/) with
plans/distilled-M.json, the DDIM plan it was trained for, which `engine.sample(steps=M)` picks,
and plans/distilled_stochastic-2M.json (`sampler="distilled_stochastic", steps=2M`); other plans
are refused. Every round is a resumable `TrainingRun`; a finished round is
not trained again, so the chain resumes across sessions.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..plan import StepPlan
from ..schedules import data_prediction, noise_prediction
from ..solvers.common import Trace
from . import data as _data
from .guided import truncated_snr_weight
from .student import Student, load_student, save_student, weights_fingerprint
from .train import DistillError, TrainingRun, train_loop

FORMAT = 1


@dataclass
class Grid:
    """A DDIM plan's times and its points' (α, σ), the plan's end point last (N + 1 each)."""

    times: torch.Tensor  # [N] float32 model times
    alpha: torch.Tensor  # [N + 1]
    sigma: torch.Tensor  # [N + 1]


def _ddim_points(engine, steps: int):
    """The engine's DDIM plan for `steps` calls: (plan, times [N], α [N + 1], σ [N + 1]) in
    float64, the end point last (from the plan's metadata: the result is α·(x_0 + out_sigma·ε))."""
    plan = engine.plan_for("ddim", steps)
    times = np.asarray(plan.times, dtype=np.float64)
    end_alpha = plan.metadata["out_alpha"]
    alpha = np.append(engine.schedule.alpha(times), end_alpha)
    sigma = np.append(engine.schedule.sigma(times), end_alpha * plan.metadata["out_sigma"])
    return plan, times, alpha, sigma


def ddim_grid(engine, steps: int) -> Grid:
    """The engine's DDIM plan for `steps` calls as a Grid (its end point from the plan's metadata)."""
    _, times, alpha, sigma = _ddim_points(engine, steps)
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return Grid(f(times), f(alpha), f(sigma))


def _col(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def ddim_step(z, x0, a, s, a_next, s_next):
    """Deterministic DDIM from (α, σ) to (α_next, σ_next) with the data prediction x0 (ε̂ from z)."""
    eps = (z - _col(a) * x0) / _col(s)
    return _col(a_next) * x0 + _col(s_next) * eps


def two_step_target(model, z, i, grid: Grid, cond: dict, w, prediction: str) -> torch.Tensor:
    """x̃ for students at index i (per sample) of the teacher's grid `grid` (2M steps): the x̂
    whose DDIM step from t_i reaches, in one step, where two DDIM steps of `model` (a Student)
    go, t_i → t_{i+1} → t_{i+2}. At the grid's last time, i = 2M − 1, the teacher's one step to
    the end point is the target (its x̂: the paper's edge case of the stochastic sampler)."""
    a, s = grid.alpha, grid.sigma
    last = grid.times.shape[0] - 1
    z1 = z
    for step in (0, 1):
        j = torch.clamp(i + step, max=last)
        raw = model(z1, grid.times[j], cond, w)
        x0 = data_prediction(raw, z1, _col(a[j]), _col(s[j]), prediction)
        moved = ddim_step(z1, x0, a[j], s[j], a[j + 1], s[j + 1])
        z1 = moved if step == 0 else torch.where(_col(i < last), moved, z1)
    end = torch.clamp(i + 2, max=last + 1)
    ratio = s[end] / s[i]
    return (z1 - _col(ratio) * z) / _col(a[end] - ratio * a[i])


def stochastic_plan(engine, calls: int) -> StepPlan:
    """The paper's N-step stochastic sampler (Meng et al. 2023, §4.3) as a stochastic StepPlan of
    N = `calls` model calls on the N-step DDIM grid t_0 > … > t_{N−1} (end point t_N): at t_k a
    deterministic DDIM step of twice the length, to t_{k+2}, then one step back to t_{k+1} with
    fresh noise, z_{k+1} = (α_{k+1}/α_{k+2})·z' + √(σ²_{k+1} − (α_{k+1}/α_{k+2})²·σ²_{k+2})·ε;
    the last call steps to t_N deterministically. Its DDIM steps are those of the N/2-step
    student, which is why each round trains at every time of its teacher's grid."""
    if isinstance(calls, bool) or not isinstance(calls, int) or calls < 2 or calls % 2:
        raise ValueError(f"the stochastic sampler makes an even number >= 2 of model calls, got {calls!r}")
    ddim, times, alpha, sigma = _ddim_points(engine, calls)
    pred = engine.schedule.prediction_type
    trace = Trace(calls, stochastic=True)
    x = float(ddim.coef[0, 0]) * trace.x_T()
    for k in range(calls):
        out = trace.call(x, times[k])
        x0 = data_prediction(out, x, alpha[k], sigma[k], pred)
        eps = noise_prediction(out, x, alpha[k], sigma[k], pred)
        if k + 1 == calls:
            x = alpha[calls] * x0 + sigma[calls] * eps
            break
        z = alpha[k + 2] * x0 + sigma[k + 2] * eps
        r = alpha[k + 1] / alpha[k + 2]
        x = r * z + np.sqrt(max(sigma[k + 1] ** 2 - (r * sigma[k + 2]) ** 2, 0.0)) * trace.noise()
    return trace.finish(
        x,
        engine.schedule,
        solver="distilled_stochastic",
        steps=calls,
        options={"student_steps": calls // 2},
        out_sigma=float(ddim.metadata["out_sigma"]),
        out_alpha=float(ddim.metadata["out_alpha"]),
        diffusers_class="none (stochastic distilled sampler)",
    )


def _rounds(start: int, end: int) -> list[int]:
    if start < 2 or end < 1 or start & (start - 1) or end & (end - 1) or end >= start:
        raise ValueError(f"start_steps and end_steps must be powers of two with end < start, got {start} and {end}")
    out, m = [], start // 2
    while m >= end:
        out.append(m)
        m //= 2
    return out


def distill_progressive(
    engine,
    out,
    *,
    start_steps: int = 64,
    end_steps: int = 1,
    steps_per_round: int = 1000,
    batch: int = 64,
    lr: float = 5e-5,
    seed: int = 0,
    data=None,
    checkpoint_every: int = 100,
    stop_after: tuple[int, int] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Progressive distillation of the guidance-distilled student `engine` (built from a stage-1
    student directory) from `start_steps` DDIM steps down to `end_steps`, one round per halving,
    each written to out/steps-M/. Finished rounds are reused; a killed round resumes. stop_after
    (M, step): stop the round to M steps after that step as if killed (tests). Returns the
    directories of the finished rounds."""
    from ..models.loading import model_info

    rounds = _rounds(start_steps, end_steps)
    conditioner = engine.conditioner
    if not getattr(conditioner, "embeds_guidance", False):
        raise DistillError(
            f"{engine.name} is not a guidance-distilled student: run stage 1 first "
            f"(fastdiff distill --model {engine.name} --stage guided --out DIR), then this on --weights DIR"
        )
    for name, value in (("steps_per_round", steps_per_round), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    source_dir = Path(engine.plans_dir).parent
    first = model_info(source_dir).get("student", {})
    if first.get("stage") != "guided":
        raise DistillError(f"{source_dir} is a {first.get('stage')!r} student: start from the stage-1 (guided) student")
    data = _data.for_engine(engine) if data is None else data
    lo, hi = conditioner.w_range
    prediction = engine.schedule.prediction_type
    device = engine.device
    out = Path(out)
    teacher, teacher_dir, done = load_student(source_dir)[0].to(device).eval(), source_dir, []
    for m in rounds:
        directory = out / f"steps-{m}"
        teacher.requires_grad_(False)
        settings = {
            "format": FORMAT,
            "stage": "progressive",
            "teacher_weights": weights_fingerprint(teacher),
            "teacher_steps": 2 * m,
            "steps": m,
            "schedule": engine.schedule.fingerprint,
            "train_steps": steps_per_round,
            "batch": batch,
            "lr": lr,
            "w_range": [lo, hi],
            "seed": seed,
            "loss": "x-space, max(SNR, 1)",
            "times": "teacher grid (deterministic and stochastic sampling)",
        }
        run = TrainingRun(directory / "run", settings, name=f"progressive distillation to {m} steps")
        teacher_grid, grid = ddim_grid(engine, 2 * m), ddim_grid(engine, m)
        if not torch.equal(teacher_grid.times[::2], grid.times):
            raise DistillError(f"the {m}-step DDIM times are not every other {2 * m}-step time on this schedule")
        teacher_grid = _on(teacher_grid, device)  # once per round, not per step
        student = copy.deepcopy(teacher).requires_grad_(True)  # starts as its teacher (Algorithm 2)

        def loss_fn(step, g, teacher=teacher, student=student, teacher_grid=teacher_grid, m=m):
            x0, prompts = data.sample(batch, g)
            i = torch.randint(0, 2 * m, (batch,), generator=g)  # every time of the teacher's grid
            eps = torch.randn(x0.shape, generator=g)
            w = lo + (hi - lo) * torch.rand(batch, generator=g)
            x0, eps, w, i = (v.to(device) for v in (x0, eps, w, i))
            a, s = teacher_grid.alpha[i], teacher_grid.sigma[i]
            z = _col(a) * x0 + _col(s) * eps
            with torch.no_grad():
                cond = conditioner.base.encode(prompts, device, torch.float32)
                target = two_step_target(teacher, z, i, teacher_grid, cond, w, prediction)
            t = teacher_grid.times[i]
            guess = data_prediction(student(z, t, cond, w), z, _col(a), _col(s), prediction)
            weight = truncated_snr_weight(a, s)
            return (weight * ((guess - target) ** 2).mean(dim=(1, 2, 3))).mean()

        stop = stop_after[1] if stop_after is not None and stop_after[0] == m else None
        report = train_loop(
            run,
            student,
            loss_fn,
            steps=steps_per_round,
            lr=lr,
            seed=seed + m,
            checkpoint_every=checkpoint_every,
            stop_after=stop,
            progress=progress,
            desc=f"progressive {2 * m}->{m}",
        )
        if "stopped" in report:
            return done
        info = {**settings, "loss_final": report["loss"]}
        save_student(student, directory, teacher_dir=teacher_dir, info=info)
        plan = engine.plan_for("ddim", m)
        (directory / "plans").mkdir(exist_ok=True)
        about = {"steps": m, "teacher_steps": 2 * m, "w_range": [lo, hi]}
        plan.with_metadata(distilled=about).save(directory / "plans" / f"distilled-{m}.json")
        stochastic_plan(engine, 2 * m).with_metadata(distilled=about).save(
            directory / "plans" / f"distilled_stochastic-{2 * m}.json"
        )
        run.finish({"loss": report["loss"], "seconds": round(report["seconds"], 1)})
        done.append(directory)
        teacher, teacher_dir = student.eval(), directory
    return done


def _on(grid: Grid, device) -> Grid:
    return Grid(grid.times.to(device), grid.alpha.to(device), grid.sigma.to(device))


def student_chain(out) -> dict[int, Path]:
    """The finished rounds of a progressive run: {steps: directory}."""
    out = Path(out)
    found = {}
    for d in sorted(out.glob("steps-*")):
        n = d.name.rpartition("-")[2]
        if n.isdigit() and (d / "run" / "done.json").is_file() and (d / "unet" / "config.json").is_file():
            found[int(n)] = d
    return found


__all__ = [
    "Grid",
    "Student",
    "ddim_grid",
    "ddim_step",
    "distill_progressive",
    "stochastic_plan",
    "student_chain",
    "two_step_target",
]
