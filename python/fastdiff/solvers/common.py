"""What every solver module shares: the symbolic trace, timestep spacings, Karras sigmas, and
option resolution with diffusers' precedence (schedule math lives in ``fastdiff.schedules``).

A solver is written like the diffusers loop it reproduces, but its latents are coefficient
vectors over the basis (x_T, out_0, ..., out_{N-1}) instead of tensors. Every update is linear
with scalar coefficients, so running the loop once on vectors yields the StepPlan exactly.
A stochastic solver (Trace(stochastic=True)) also draws fresh noise, `Trace.noise()`: a further
basis column per call, which the plan keeps as its noise columns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..plan import PlanError, StepPlan
from ..schedules import DiscreteSchedule


class SolverError(ValueError):
    """A solver name, option or step count that cannot produce a plan."""


# ---------------------------------------------------------------------------- symbolic trace
class Trace:
    """Records model calls of a solver running on coefficient vectors."""

    def __init__(self, num_calls: int, *, stochastic: bool = False):
        if num_calls < 1:
            raise SolverError(f"a plan needs at least one model call, got {num_calls}")
        self.num_calls = num_calls
        self.size = num_calls + 1 + (num_calls if stochastic else 0)  # basis columns, then noise columns
        self.rows: list[np.ndarray] = []
        self.times: list[float] = []
        self._drawn = -1  # the call after which noise was last drawn

    def x_T(self) -> np.ndarray:
        v = np.zeros(self.size)
        v[0] = 1.0
        return v

    def noise(self) -> np.ndarray:
        """Fresh standard normal noise drawn after the last call (at most one draw per call)."""
        m = len(self.rows) - 1
        if self.size == self.num_calls + 1:
            raise SolverError("this trace is deterministic: Trace(stochastic=True) draws noise")
        if m < 0 or m == self._drawn:
            raise SolverError("noise is drawn once after a model call (and not before the first)")
        self._drawn = m
        v = np.zeros(self.size)
        v[self.num_calls + 1 + m] = 1.0
        return v

    def call(self, model_input: np.ndarray, t: float) -> np.ndarray:
        """Record that the model is called on model_input at time t; return its output's vector."""
        k = len(self.rows)
        if k >= self.num_calls:
            raise SolverError(f"solver made more than the {self.num_calls} model calls it announced")
        self.rows.append(np.array(model_input, dtype=np.float64))
        self.times.append(float(t))
        out = np.zeros(self.size)
        out[k + 1] = 1.0
        return out

    def finish(
        self,
        result: np.ndarray,
        schedule: DiscreteSchedule,
        *,
        solver: str,
        steps: int,
        options: Mapping[str, Any],
        out_sigma: float,
        diffusers_class: str,
        out_alpha: float | None = None,
    ) -> StepPlan:
        """The plan; its result is out_alpha·(x_0 + out_sigma·ε) along the ODE path (out_alpha
        defaults to the VP scale 1/√(1 + out_sigma²); σ-space solvers such as Euler pass 1)."""
        if len(self.rows) != self.num_calls:
            raise SolverError(f"solver made {len(self.rows)} model calls but announced {self.num_calls}")
        full = np.vstack(self.rows + [np.asarray(result, dtype=np.float64)])
        n = self.num_calls
        # Rows only ever mix earlier columns; exact zeros above the diagonal by construction.
        coef = np.tril(full[:, : n + 1])
        noise = np.tril(full[:, n + 1 :], -1) if full.shape[1] > n + 1 else None
        try:
            return StepPlan(
                self.times,
                coef,
                schedule.prediction_type,
                schedule_fingerprint=schedule.fingerprint,
                num_train_timesteps=schedule.num_train_timesteps,
                metadata={
                    "solver": solver,
                    "steps": int(steps),
                    "options": _jsonable(options),
                    "out_sigma": float(out_sigma),
                    "out_alpha": float(1.0 / np.sqrt(1.0 + out_sigma**2) if out_alpha is None else out_alpha),
                    "diffusers_class": diffusers_class,
                },
                noise=noise,
            )
        except PlanError as exc:
            raise SolverError(f"{solver} with {steps} steps produced an invalid plan: {exc}") from exc


def _jsonable(options: Mapping[str, Any]) -> dict:
    """Options as plain JSON for plan metadata (non-finite floats such as the default
    lambda_min_clipped = -inf become the strings "inf"/"-inf"/"nan")."""

    def plain(value):
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, float) and not np.isfinite(value):
            return repr(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return {key: plain(value) for key, value in options.items()}


# ---------------------------------------------------------------------------- timestep grids
def check_steps(solver: str, steps: Any, schedule: DiscreteSchedule) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise SolverError(f"{solver}: steps must be an integer, got {steps!r}")
    steps = int(steps)
    if steps < 1:
        raise SolverError(f"{solver}: steps must be >= 1, got {steps}")
    if steps > schedule.num_train_timesteps:
        raise SolverError(
            f"{solver}: steps={steps} is more than the schedule's {schedule.num_train_timesteps} " "training timesteps"
        )
    return steps


def n_point_timesteps(num_train: int, steps: int, spacing: str, offset: int) -> np.ndarray:
    """Descending grid of `steps` timesteps as DDIM/PNDM/Euler space them (float64 values)."""
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, steps).round()[::-1].copy()
    if spacing == "leading":
        ratio = num_train // steps
        return (np.arange(0, steps) * ratio).round()[::-1].astype(np.float64) + offset
    if spacing == "trailing":
        ratio = num_train / steps
        return np.round(np.arange(num_train, 0, -ratio)) - 1
    raise SolverError(f"unknown timestep_spacing {spacing!r}: expected leading, trailing or linspace")


def n_plus_one_timesteps(num_train: int, last: int, steps: int, spacing: str, offset: int) -> np.ndarray:
    """Descending grid as the multistep solvers (DPM-Solver, UniPC, DEIS) space them: steps+1
    points with the last one (t = 0) dropped. ``last`` is the exclusive upper end (T unless
    lambda_min_clipped cuts it)."""
    if spacing == "linspace":
        return np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].copy()
    if spacing == "leading":
        ratio = last // (steps + 1)
        return (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.float64) + offset
    if spacing == "trailing":
        ratio = num_train / steps
        return np.arange(last, 0, -ratio).round() - 1
    raise SolverError(f"unknown timestep_spacing {spacing!r}: expected leading, trailing or linspace")


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: σ_i = (σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ."""
    ramp = np.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


# ---------------------------------------------------------------------------- options
def resolve_options(
    solver: str,
    schedule: DiscreteSchedule,
    options: Mapping[str, Any],
    defaults: Mapping[str, Any],
) -> dict[str, Any]:
    """Explicit option > the schedule config's key > the diffusers scheduler's default."""
    unknown = sorted(set(options) - set(defaults))
    if "prediction_type" in options:
        raise SolverError(
            f"{solver}: prediction_type comes from the model's schedule "
            f"({schedule.prediction_type!r}), it is not a solver option"
        )
    if unknown:
        raise SolverError(f"{solver}: unknown option {unknown[0]!r}; {solver} accepts: {', '.join(sorted(defaults))}")
    return {key: options.get(key, schedule.option(key, default)) for key, default in defaults.items()}


def refuse(solver: str, opts: Mapping[str, Any], rules: Mapping[str, tuple[Any, str]]) -> None:
    """Raise for option values a StepPlan cannot express. rules: key -> (allowed value(s), why)."""
    for key, (allowed, why) in rules.items():
        value = opts.get(key)
        ok = value in allowed if isinstance(allowed, (tuple, list, set)) else value == allowed
        if not ok:
            raise SolverError(f"{solver}: {key}={value!r} is not supported: {why}")


NONLINEAR = "nonlinear in the model output, so no StepPlan (a linear combination) can express it"


def multistep_order(i: int, n: int, order: int, *, last_first_order: bool, lower_order_final: bool) -> int:
    """The order diffusers' multistep schedulers use at step i of n: they warm up from order 1
    (one more past output per step), take a first-order last step when last_first_order, and
    with lower_order_final and fewer than 15 steps at most second order one step before."""
    if order == 1 or i < 1 or (i == n - 1 and last_first_order):
        return 1
    if order == 2 or i < 2 or (i == n - 2 and lower_order_final and n < 15):
        return 2
    return 3


def check_grid(solver: str, timesteps: np.ndarray, schedule: DiscreteSchedule) -> None:
    """Every model time must be a training timestep the schedule knows."""
    t_max = schedule.num_train_timesteps - 1
    bad = (timesteps < 0) | (timesteps > t_max)
    if np.any(bad):
        raise SolverError(
            f"{solver}: the timestep grid reaches {timesteps[bad][0]:g}, outside the schedule's "
            f"[0, {t_max}] (check timestep_spacing / steps_offset for this step count)"
        )
