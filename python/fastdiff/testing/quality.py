"""The GMM solver-error experiment shared by the benchmark suite, the report and the CLI.

Problem: an SD-like discrete schedule (scaled_linear 0.00085..0.012, 1000 steps, ε model), a
64-dimensional mixture of 8 Gaussians (stds 0.3..0.8), 64 noise samples x_T at t = 999. Every solver uses
"trailing" spacing so that it starts at t = 999, and its result is compared with the exact
probability-flow ODE solution from the same x_T to the solver's own final noise level.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import solvers
from ..schedules import DiscreteSchedule
from .gmm import GaussianMixture, solver_error

GMM_STEPS = (3, 4, 5, 6, 8, 10, 15, 20, 50)

SOLVER_VARIANTS = solvers.VARIANTS  # label -> (solver name, options)

SCHEDULE_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "epsilon",
    "timestep_spacing": "trailing",
    "clip_sample": False,
    "set_alpha_to_one": False,
}


@dataclass
class Problem:
    schedule: DiscreteSchedule
    mixture: GaussianMixture
    x_T: torch.Tensor
    reference: dict  # out_sigma -> exact x̃, filled lazily


def default_problem(dim: int = 64, components: int = 8, batch: int = 64, seed: int = 0) -> Problem:
    schedule = DiscreteSchedule.from_config(SCHEDULE_CONFIG)
    mixture = GaussianMixture.random(dim, components, seed=seed, std_range=(0.3, 0.8))
    x_T = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return Problem(schedule, mixture, x_T, {})


def measure(problem: Problem, label: str, steps: int) -> dict:
    """One cell of the table: {label, solver, options, steps, nfe, rel_error} (rel_error None
    with a reason when the solver cannot run at this step count)."""
    name, options = SOLVER_VARIANTS[label]
    row = {"label": label, "solver": name, "options": options, "steps": steps}
    try:
        plan = solvers.build(name, problem.schedule, steps, **options)
    except solvers.SolverError as exc:
        return {**row, "nfe": None, "rel_error": None, "skipped": str(exc)}
    error, _ = solver_error(plan, problem.mixture, problem.schedule, problem.x_T, problem.reference)
    return {**row, "nfe": plan.nfe, "rel_error": error}


def markdown_table(rows: list[dict], steps: tuple[int, ...] = GMM_STEPS) -> str:
    """Rows of `measure` as a markdown table: relative RMS error (NFE in brackets if != steps)."""
    cells = {(r["label"], r["steps"]): r for r in rows}
    labels = [label for label in SOLVER_VARIANTS if any((label, n) in cells for n in steps)]
    head = "| solver | " + " | ".join(f"N={n}" for n in steps) + " |"
    lines = [head, "|" + " --- |" * (len(steps) + 1)]
    for label in labels:
        out = []
        for n in steps:
            r = cells.get((label, n))
            if r is None or r["rel_error"] is None:
                out.append("—")
            else:
                nfe = f" ({r['nfe']})" if r["nfe"] != n else ""
                out.append(f"{r['rel_error']:.2e}{nfe}")
        lines.append(f"| {label} | " + " | ".join(out) + " |")
    return "\n".join(lines)
