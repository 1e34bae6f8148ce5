"""USF: a solver as a per-step strategy (Liu et al., "A Unified Sampling Framework for Solver
Searching of Diffusion Probabilistic Models", ICLR 2024, §3), compiled to a StepPlan.

Every step of a USF solver integrates the probability-flow ODE in its exponential-integrator form
from a start point s to the next point t over h = λ_t − λ_s (λ = log α − log σ), with the model
output F expanded as a Taylor polynomial in λ around s:

    data prediction (F = x̂_0):  x_t = (σ_t/σ_s)·x_s + α_t·Σ_k J_k(h)·F^(k)(λ_s),
                                 J_k(h) = ∫_0^h e^{−(h−u)} u^k/k! du
    noise prediction (F = ε̂):   x_t = (α_t/α_s)·x_s − σ_t·Σ_k K_k(h)·F^(k)(λ_s),
                                 K_k(h) = ∫_0^h e^{(h−u)} u^k/k! du

(J_k = h^{k+1}·φ_{k+1}(−h) and K_k = h^{k+1}·φ_{k+1}(h) in the φ-function notation of the paper's
eq. 6-7; order 1 is DDIM / DPM-Solver-1). The choices a step makes (`Step`):

- `prediction`: which output is expanded, "x0" (data) or "eps" (noise). v is not an expansion
  variable of this integrator (the paper's spaces are noise and data prediction); a v-model's
  output converts to either, which is what the plan does with the schedule's prediction type;
- `order`: Taylor terms, 1-4;
- `points`: how the k-th derivative at s is estimated: from the Taylor expansions of that many
  other outputs around s (nearest first, the paper's "Difference_m"): the m × m system
  F_j − F_s = Σ_q F^(q)·Δλ_j^q / q! solved for F^(k) (m >= k; default order − 1 for every k);
- `scale`: a constant factor on each derivative (k = 1, 2, ...; default 1), and `relaxation` of
  the first one by a function of h: "linear" (1 + c·h, the paper's searched relaxation) or
  the B(h) forms of a second-order step: DPM-Solver-2's midpoint rule and UniPC-bh2's
  ("midpoint": the two coincide) and UniPC-bh1's ("bh1");
- `start`: the point the step starts from, 1 = the last one (multistep), 2 or 3 = earlier ones
  (singlestep-like steps that reuse the outputs in between);
- `corrector`: a pseudo-corrector of that Taylor order (UniC-like): once the model has been
  called at the new point, the step is redone with that output among the points (derivatives
  from corrector − 1 points each, relaxed by `corrector_relaxation`); the model's output stays
  the one at the uncorrected point, so no call is added (0 = none; not on the last step, where it
  would cost a call at the clean end).

`Strategy(grid, steps, afs=False)`: the points (`Grid`: model times and the (α, σ) of every point,
the last one the plan's end) and one Step per step; `afs=True` is the analytical first step
(x̂_0 = 0 at the first point, i.e. ε̂ = x_T/σ_T: one call fewer). Everything is linear in the model
outputs, so `compile(schedule)` runs the strategy on coefficient vectors (`common.Trace`) and
returns a StepPlan that every loop runs unchanged. `dpm_solver_pp(...)` and `ddim(...)` express
those solvers as strategies on their own grids (tests hold them to the solvers' plans).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..plan import StepPlan
from ..schedules import DiscreteSchedule, data_prediction, log_snr, noise_prediction, vp_from_ve
from .common import SolverError, Trace

PREDICTIONS = ("x0", "eps")
RELAXATIONS = ("none", "linear", "midpoint", "bh1")
MAX_ORDER = 4
MAX_START = 3
# A step whose new point's coefficients (over x_T and the outputs) sum above this in absolute value
# amplifies the model's errors that much: rejected as unstable. The built-in solvers stay below
# 4.2 at 3-50 steps on the shipped schedules.
MAX_GAIN = 50.0


@dataclass(frozen=True)
class Step:
    """The strategy of one step (module docstring)."""

    order: int = 1
    prediction: str = "x0"
    points: tuple[int, ...] | None = None  # per derivative k = 1..order-1; None: order − 1 each
    scale: tuple[float, ...] | None = None  # per derivative k = 1..order-1; None: 1 each
    relaxation: str = "none"  # of the first derivative
    c: float = 0.0  # "linear" relaxation: F' *= 1 + c·h
    start: int = 1
    corrector: int = 0
    corrector_relaxation: str = "none"

    def __post_init__(self):
        if isinstance(self.order, bool) or not isinstance(self.order, int) or not 1 <= self.order <= MAX_ORDER:
            raise SolverError(f"usf: order must be an integer in 1..{MAX_ORDER}, got {self.order!r}")
        if self.prediction not in PREDICTIONS:
            raise SolverError(f"usf: prediction must be one of {', '.join(PREDICTIONS)}, got {self.prediction!r}")
        for name in ("relaxation", "corrector_relaxation"):
            if getattr(self, name) not in RELAXATIONS:
                raise SolverError(f"usf: {name} must be one of {', '.join(RELAXATIONS)}, got {getattr(self, name)!r}")
        if not math.isfinite(self.c):
            raise SolverError(f"usf: the relaxation coefficient c must be finite, got {self.c!r}")
        for name, values in (("points", self.points), ("scale", self.scale)):
            if values is not None and len(values) != self.order - 1:
                raise SolverError(
                    f"usf: {name} needs one entry per derivative (order − 1 = {self.order - 1}), got {len(values)}"
                )
        for k, m in enumerate(self.points or (), start=1):
            if isinstance(m, bool) or not isinstance(m, int) or not k <= m <= MAX_ORDER:
                raise SolverError(f"usf: derivative {k} needs {k}..{MAX_ORDER} points to be estimated from, got {m!r}")
        if self.scale is not None and not all(math.isfinite(s) for s in self.scale):
            raise SolverError(f"usf: scale must be finite, got {self.scale!r}")
        if isinstance(self.start, bool) or not isinstance(self.start, int) or not 1 <= self.start <= MAX_START:
            raise SolverError(f"usf: start must be 1 (the last point) .. {MAX_START}, got {self.start!r}")
        if (
            isinstance(self.corrector, bool)
            or not isinstance(self.corrector, int)
            or not 0 <= self.corrector <= MAX_ORDER
        ):
            raise SolverError(f"usf: corrector must be an order in 0..{MAX_ORDER} (0: none), got {self.corrector!r}")

    @classmethod
    def from_dict(cls, d: dict) -> Step:
        """The inverse of `Strategy.to_dict`'s step entries (lists back to tuples)."""
        if not isinstance(d, dict):
            raise SolverError(f"usf: a step must be a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise SolverError(f"usf: unknown step fields {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def derivative_points(self) -> tuple[int, ...]:
        return self.points if self.points is not None else (self.order - 1,) * (self.order - 1)


@dataclass(frozen=True)
class Grid:
    """The points of a strategy: `times` the model times of the N calls' points (schedule units),
    `alphas`/`sigmas` the VP (α, σ) of all N + 1 points, the last one the plan's end (σ may be 0)."""

    times: tuple[float, ...]
    alphas: tuple[float, ...]
    sigmas: tuple[float, ...]

    def __post_init__(self):
        n = len(self.times)
        if n < 1 or len(self.alphas) != n + 1 or len(self.sigmas) != n + 1:
            raise SolverError(
                f"usf: a grid of {n} model times needs {n + 1} alphas and sigmas (the last: the end), "
                f"got {len(self.alphas)} and {len(self.sigmas)}"
            )
        lam = self.lambdas()
        if not all(math.isfinite(a) and a > 0 for a in self.alphas) or not all(s >= 0 for s in self.sigmas):
            raise SolverError("usf: every point needs alpha > 0 and sigma >= 0")
        if any(s == 0 for s in self.sigmas[:-1]):
            raise SolverError("usf: only the last point may have sigma 0 (the model is called at the others)")
        for i in range(n):
            if not lam[i + 1] > lam[i]:
                raise SolverError(
                    f"usf: the grid's points must go from noise to data (λ increasing): point {i + 1} has "
                    f"λ {lam[i + 1]:.6g} after {lam[i]:.6g}"
                )

    @classmethod
    def from_ve_sigmas(cls, times, ve_sigmas) -> Grid:
        """The points of a diffusers grid: model times and the diffusers "sigmas" (σ/α) of the N + 1
        points."""
        vp = [vp_from_ve(float(s)) for s in ve_sigmas]
        return cls(tuple(float(t) for t in times), tuple(a for a, _ in vp), tuple(s for _, s in vp))

    def lambdas(self) -> list[float]:
        return [log_snr(a, s) for a, s in zip(self.alphas, self.sigmas)]


@dataclass(frozen=True)
class Strategy:
    """A USF solver: a Grid and one Step per step (module docstring)."""

    grid: Grid
    steps: tuple[Step, ...]
    afs: bool = False
    name: str = "usf"
    metadata: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if len(self.steps) != len(self.grid.times):
            raise SolverError(f"usf: {len(self.grid.times)} grid steps but {len(self.steps)} step strategies")
        if self.steps[-1].corrector:
            raise SolverError(
                "usf: step "
                + str(len(self.steps) - 1)
                + ": no corrector on the last step (it would need a model call at the plan's end)"
            )

    @property
    def num_calls(self) -> int:
        return len(self.steps) - (1 if self.afs else 0)

    def compile(self, schedule: DiscreteSchedule, *, max_gain: float = MAX_GAIN) -> StepPlan:
        """The StepPlan of this strategy on `schedule` (its prediction type converts the model's raw
        output to x̂_0 or ε̂). SolverError names the step and the reason when a step cannot run or
        is unstable (a new point's coefficients summing above `max_gain` in absolute value)."""
        grid, lam = self.grid, self.grid.lambdas()
        pred = schedule.prediction_type
        trace = Trace(self.num_calls)
        xs = [trace.x_T()]  # x at each point reached so far (corrected where a corrector ran)
        outputs: dict[str, list] = {"x0": [], "eps": []}  # the outputs at each point, converted

        def observe(i: int, raw) -> None:
            a, s = grid.alphas[i], grid.sigmas[i]
            outputs["x0"].append(data_prediction(raw, xs[i], a, s, pred))
            outputs["eps"].append(noise_prediction(raw, xs[i], a, s, pred))

        if self.afs:  # x̂_0 = 0: ε̂ = x_T / σ_T, no model call
            outputs["x0"].append(np.zeros_like(xs[0]))
            outputs["eps"].append(xs[0] / grid.sigmas[0])
        else:
            observe(0, trace.call(xs[0], grid.times[0]))
        for i, step in enumerate(self.steps):
            known = list(range(len(outputs["x0"])))
            x_new = _update(
                i, step, step.order, step.derivative_points(), step.relaxation, xs, outputs, lam, grid, known
            )
            _check_gain(i, x_new, max_gain)
            xs.append(x_new)
            if i + 1 < len(self.steps):
                observe(i + 1, trace.call(x_new, grid.times[i + 1]))
                if step.corrector:
                    q = step.corrector
                    points = (q - 1,) * (q - 1)
                    xs[i + 1] = _update(
                        i, step, q, points, step.corrector_relaxation, xs[: i + 1], outputs, lam, grid, known + [i + 1]
                    )
                    _check_gain(i, xs[i + 1], max_gain, "corrected ")
        return trace.finish(
            xs[-1],
            schedule,
            solver=self.name,
            steps=len(self.steps),
            options={"strategy": self.to_dict(), **self.metadata},
            out_sigma=grid.sigmas[-1] / grid.alphas[-1],
            diffusers_class="",
            out_alpha=grid.alphas[-1],
        )

    def to_dict(self) -> dict:
        return {"afs": self.afs, "steps": steps_to_dicts(self.steps)}


def steps_to_dicts(steps) -> list[dict]:
    """JSON form of Steps (`Step.from_dict` reads it back)."""
    return [{k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(s).items()} for s in steps]


def _update(i, step: Step, order: int, points, relaxation: str, xs, outputs, lam, grid: Grid, known: list[int]):
    """x at point i + 1 by `step` with Taylor order `order` from the outputs at the points `known`."""
    s = i + 1 - step.start
    if s < 0 or s not in known:
        raise SolverError(f"usf: step {i}: start {step.start} reaches before the first point")
    h = lam[i + 1] - lam[s]
    a_t, s_t, a_s, s_s = grid.alphas[i + 1], grid.sigmas[i + 1], grid.alphas[s], grid.sigmas[s]
    F = outputs[step.prediction]
    data = step.prediction == "x0"
    if s_t == 0 and order > 1:
        raise SolverError(
            f"usf: step {i}: a Taylor order above 1 into σ = 0 (the plan's clean end) has infinite coefficients; "
            "use order 1 on the last step"
        )
    weights = _integrals(h, order, data)
    if data:
        x = (s_t / s_s) * xs[s] + a_t * weights[0] * F[s]
    elif s_t == 0:  # σ_t·K_0 = α_t·σ_s/α_s − σ_t at the clean end
        x = (a_t / a_s) * xs[s] - (a_t * s_s / a_s) * F[s]
    else:
        x = (a_t / a_s) * xs[s] - s_t * weights[0] * F[s]
    scale = step.scale or (1.0,) * (order - 1)
    for k in range(1, order):
        others = _nearest(s, [j for j in known if j != s], points[k - 1])
        if len(others) < points[k - 1]:
            raise SolverError(
                f"usf: step {i}: derivative {k} needs {points[k - 1]} other outputs, only {len(others)} exist "
                f"(order {order} is too high this early)"
            )
        d = _derivative(k, [lam[j] - lam[s] for j in others], [F[j] - F[s] for j in others])
        factor = scale[k - 1] if k - 1 < len(scale) else 1.0
        if k == 1:
            factor *= _relaxation(relaxation, step.c, h if not data or relaxation == "linear" else -h, h)
        if data:
            x = x + a_t * weights[k] * factor * d
        else:
            x = x - s_t * weights[k] * factor * d
    if not np.all(np.isfinite(x)):
        raise SolverError(f"usf: step {i}: the coefficients are not finite (h = {h:.6g})")
    return x


def _check_gain(i: int, x, max_gain: float, what: str = "") -> None:
    gain = float(np.abs(x).sum())
    if gain > max_gain:
        raise SolverError(
            f"usf: step {i}: unstable coefficients: the {what}new point's coefficients sum to {gain:.3g} in absolute "
            f"value (above {max_gain:g}): the model's errors would be amplified that much"
        )


def _nearest(s: int, candidates: list[int], m: int) -> list[int]:
    """The m points nearest to s, later ones first at equal distance (USF's active points)."""
    return sorted(candidates, key=lambda j: (abs(j - s), -j))[:m]


def _derivative(k: int, dlam: list[float], dF: list):
    """F^(k) at s from F_j − F_s = Σ_q F^(q)·Δλ_j^q / q! over the m given points."""
    m = len(dlam)
    taylor = np.array([[d**q / math.factorial(q) for d in dlam] for q in range(1, m + 1)])
    e = np.zeros(m)
    e[k - 1] = 1.0
    try:
        a = np.linalg.solve(taylor, e)
    except np.linalg.LinAlgError:
        raise SolverError(f"usf: derivative {k}: two points share a noise level (singular system)") from None
    return sum(a_j * f for a_j, f in zip(a, dF))


def _relaxation(relaxation: str, c: float, hh: float, h: float) -> float:
    """The factor on the first derivative (USF's relaxations; hh is h for noise prediction, −h for
    data prediction, as the paper's empirical forms are written): B(h)/2 over the exact weight
    K_1(h)/h (J_1(h)/h), with B(h) = e^hh − 1 (midpoint, UniPC-bh2) or hh (UniPC-bh1)."""
    if relaxation == "none":
        return 1.0
    if relaxation == "linear":
        return 1.0 + c * h
    e = math.expm1(hh)
    b = e if relaxation == "midpoint" else hh
    return 0.5 * hh * b / (e - hh)


def _integrals(h: float, order: int, data: bool) -> list[float]:
    """J_k(h) (data) or K_k(h) (noise) for k < order (module docstring); h = ∞ gives J_0 = 1."""
    sign = -1.0 if data else 1.0
    if math.isinf(h):
        return [1.0] + [math.inf] * (order - 1)
    if abs(h) < 0.2:  # series: no cancellation for small steps
        out = []
        for k in range(order):
            term, total, n = h ** (k + 1) / math.factorial(k + 1), 0.0, 0
            while abs(term) > 1e-18 * max(abs(total), 1e-300) and n < 60:
                total += term
                n += 1
                term *= sign * h / (k + 1 + n)
            out.append(total)
        return out
    first = -math.expm1(-h) if data else math.expm1(h)
    out = [first]
    for k in range(1, order):
        out.append(h**k / math.factorial(k) - out[-1] if data else out[-1] - h**k / math.factorial(k))
    return out


# ---------------------------------------------------------------- known solvers as strategies
def dpm_solver_pp(
    schedule: DiscreteSchedule, steps: int, *, order: int = 2, midpoint: bool = True, **options
) -> Strategy:
    """DPM-Solver++ multistep (data prediction) on diffusers' grid, as `solvers.build("dpmpp_2m",
    schedule, steps, solver_order=order, solver_type=...)` runs it: orders warm up from 1, the last
    step is first order (final sigma 0), the third-order update weighs F'' by 1/2 (its D2 term)."""
    from . import dpmpp
    from .common import multistep_order, resolve_options

    opts = resolve_options("dpmpp_2m", schedule, {**options, "solver_order": order}, dpmpp.DEFAULTS)
    timesteps, sigmas = dpmpp.multistep_grid(schedule, steps, opts, "usf")
    sigmas = np.append(sigmas, dpmpp.final_sigma(schedule, sigmas, opts["final_sigmas_type"], "usf", False))
    n = len(timesteps)
    last_first = opts["euler_at_final"] or (opts["lower_order_final"] and n < 15) or opts["final_sigmas_type"] == "zero"
    plan = []
    for i in range(n):
        p = multistep_order(i, n, order, last_first_order=last_first, lower_order_final=opts["lower_order_final"])
        if p == 1:
            plan.append(Step(order=1))
        elif p == 2:
            plan.append(Step(order=2, relaxation="midpoint" if midpoint else "none"))
        else:
            plan.append(Step(order=3, points=(2, 2), scale=(1.0, 0.5)))
    return Strategy(Grid.from_ve_sigmas(timesteps, sigmas), tuple(plan), name=f"usf:dpmpp_{order}m")


def ddim(schedule: DiscreteSchedule, steps: int, **options) -> Strategy:
    """DDIM as diffusers' DDIMScheduler runs it (η = 0, no clipping): first-order noise prediction
    from each call's point to the next. Only "leading" spacing: with the others diffusers steps
    to a noise level that is not the next call's (`solvers.ddim` reproduces that; a USF grid has
    one noise level per point)."""
    from . import ddim as ddim_solver
    from .common import n_point_timesteps, resolve_options

    opts = resolve_options("ddim", schedule, {"clip_sample": False, **options}, ddim_solver.DEFAULTS)
    if opts["timestep_spacing"] != "leading":
        raise SolverError(
            f"usf.ddim: only timestep_spacing='leading' has one noise level per point, got {opts['timestep_spacing']!r}"
        )
    num_train = schedule.num_train_timesteps
    timesteps = n_point_timesteps(num_train, steps, "leading", opts["steps_offset"]).astype(np.int64)
    ac = schedule.alphas_cumprod
    final = 1.0 if opts["set_alpha_to_one"] else float(ac[0])
    bars = [float(ac[t]) for t in timesteps] + [final]
    grid = Grid(
        tuple(float(t) for t in timesteps), tuple(math.sqrt(a) for a in bars), tuple(math.sqrt(1 - a) for a in bars)
    )
    return Strategy(grid, tuple(Step(order=1, prediction="eps") for _ in timesteps), name="usf:ddim")


def unipc(
    schedule: DiscreteSchedule, steps: int, *, order: int = 2, bh1: bool = False, predict_x0: bool = True, **options
) -> Strategy:
    """UniPC (predictor UniP-p, corrector UniC-p) as `solvers.build("unipc", ...)` runs it: the
    predictor of order p >= 3 and the corrector of order q >= 2 solve UniPC's system exactly, i.e.
    integrate the polynomial through their points (Taylor order p from p − 1 points; q + 1 from
    q, the new output among them); the second-order predictor and the corrector after a
    first-order step use the fixed weight 1/2 on B(h) (the "midpoint"/"bh1" relaxations)."""
    from . import unipc as unipc_solver
    from .common import resolve_options
    from .dpmpp import final_sigma, multistep_grid

    opts = resolve_options(
        "unipc",
        schedule,
        {**options, "solver_order": order, "solver_type": "bh1" if bh1 else "bh2", "predict_x0": predict_x0},
        unipc_solver.DEFAULTS,
    )
    if opts["disable_corrector"]:
        raise SolverError("usf.unipc: disable_corrector is not expressed here (a Step without a corrector is)")
    timesteps, sigmas = multistep_grid(schedule, steps, opts, "usf")
    karras = bool(opts["use_karras_sigmas"])
    sigmas = np.append(sigmas, final_sigma(schedule, sigmas, opts["final_sigmas_type"], "usf", karras))
    n = len(timesteps)
    relax = "bh1" if bh1 else "midpoint"
    prediction = "x0" if predict_x0 else "eps"
    plan = []
    for i in range(n):
        p = min(order, n - i) if opts["lower_order_final"] else order
        p = min(p, i + 1)
        q = p + 1 if i + 1 < n else 0  # the corrector at the next call corrects this step's point
        plan.append(
            Step(
                order=p,
                prediction=prediction,
                relaxation=relax if p == 2 else "none",
                corrector=q,
                corrector_relaxation=relax if q == 2 else "none",
            )
        )
    return Strategy(Grid.from_ve_sigmas(timesteps, sigmas), tuple(plan), name=f"usf:unipc_{'bh1' if bh1 else 'bh2'}")
