"""OLSS: Optimal Linear Subspace Search (Duan et al., CIKM 2023) as a StepPlan calibrator.

Every solver's next latent is a linear combination of x_T and the model outputs so far; OLSS
fits those coefficients instead of deriving them (§3.2, eq. 9-10: least squares of the
teacher's latent at the next selected time on the basis [x_T, out_1, ..., out_i], pooled over
samples and elements, one scalar per basis vector). In StepPlan terms (DESIGN §1) it *fits* the
rows of `coef` and chooses `times` among the teacher's times:

- path="planned": §3.3, Algorithms 1-3. Alg. 1 binary-searches the farthest teacher index whose
  latent the current basis reaches with error <= D; Alg. 2 chains Alg. 1 greedily and reports
  whether x_0 is reached within n calls; Alg. 3 bisects D for the smallest feasible value.
  The errors are held-out (cross-validated) errors of the open-loop fit, so the path is chosen
  for samples it was not fitted on.
- path="uniform": OLSS-P, the uniform subsample of the teacher grid.
- path="searched" (beyond the paper): the planned path refined by coordinate descent on the
  closed-loop error of held-out calibration samples (`search_path`). Algorithm 1 judges a hop
  by an open-loop fit on the teacher's outputs, which can be far from what the student does.

Two departures from the reference code, both options: the fit is ridge-regularised with λ
chosen by K-fold cross-validation over samples (the normal equations are ill-conditioned), and
closed_loop=True fits row i on the student's *own* outputs (running the model on the student's
latents, n calls per sample) so errors of earlier rows are corrected instead of compounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..loops import reference
from ..plan import StepPlan
from ..program import compile as compile_program
from .lstsq import CalibrationError, Fit, GramAccumulator
from .trajectories import Source, Trajectories, make_source, teacher_trajectories

MAX_GRAM_BYTES = 256 * 2**20  # float64 working set per batch when accumulating Gram matrices


@dataclass
class OLSSFit:
    plan: StepPlan
    path: list[int]  # teacher call indices of the student's calls
    rows: list[dict]  # per-row residual report
    max_error: float | None  # planned path: the D reached (held-out MSE per element)


def _batches(samples, per_sample_bytes: int, batch_size: int):
    """Chunks of sample indices (`samples`: a count or an index array) within the memory bound."""
    samples = np.arange(samples) if np.isscalar(samples) else np.asarray(samples)
    step = max(1, min(batch_size, MAX_GRAM_BYTES // max(per_sample_bytes, 1)))
    for start in range(0, samples.size, step):
        yield samples[start : start + step]


def teacher_gram(traj: Trajectories, folds: int) -> GramAccumulator:
    """Per-fold Gram of [L_0..L_M, O_0..O_{M-1}] (teacher latents, then outputs) over all samples."""
    m = traj.num_teacher_steps
    names = [f"L{k}" for k in range(m + 1)] + [f"O{k}" for k in range(m)]
    acc = GramAccumulator(names, folds)
    dim = traj.latents.shape[2]
    for ids in _batches(traj.num_samples, (2 * m + 1) * dim * 8, 64):
        vectors = np.concatenate([traj.latents[ids], traj.outputs[ids]], axis=1)
        acc.add(torch.from_numpy(vectors), ids)
    return acc


class _Planner:
    """Open-loop reachability errors from the teacher Gram, memoised."""

    def __init__(self, acc: GramAccumulator, m: int, ridge, relative: bool = False):
        self.acc, self.m, self.ridge, self.relative = acc, m, ridge, relative
        self.cache: dict[tuple, float] = {}
        total = acc.total
        self.energy = {j: total[acc.index[f"L{j}"], acc.index[f"L{j}"]] / acc.count.sum() for j in range(m + 1)}

    def error(self, path: tuple[int, ...], j: int) -> float:
        key = (path, j)
        if key not in self.cache:
            basis = ["L0"] + [f"O{p}" for p in path]
            fit = self.acc.fit(basis, f"L{j}", self.ridge)
            err = fit.cv_mse if fit.cv_mse is not None else fit.mse
            self.cache[key] = err / self.energy[j] if self.relative else err
        return self.cache[key]

    def farthest(self, path: tuple[int, ...], bound: float, target: int) -> int:
        """Algorithm 1: the largest teacher index j in (path[-1], target] reachable with error
        <= bound (binary search; errors grow with the distance), or path[-1] if none is."""
        lo, hi = path[-1], target
        if self.error(path, hi) <= bound:
            return hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.error(path, mid) <= bound:
                lo = mid
            else:
                hi = mid
        return lo

    def greedy(self, n: int, bound: float, target: int) -> list[int] | None:
        """Algorithm 2: chain Algorithm 1 from index 0; the calls of the path if `target` is
        reached within n calls, else None."""
        path = (0,)
        while True:
            j = self.farthest(path, bound, target)
            if j == target:
                return list(path)
            if j == path[-1] or len(path) == n:
                return None
            path = path + (j,)

    def bisect(self, n: int, target: int, iterations: int = 30) -> tuple[list[int], float]:
        """Algorithm 3: bisection on D for the smallest bound with a feasible n-call path."""
        hi = max(self.error((0,), target), 1e-30)
        while self.greedy(n, hi, target) is None:  # a held-out error can exceed the one-hop error
            hi *= 2
            if hi > 1e30:
                raise CalibrationError("path planning found no feasible path: the teacher data is degenerate")
        lo = 0.0
        for _ in range(iterations):
            mid = (lo + hi) / 2
            if self.greedy(n, mid, target) is None:
                lo = mid
            else:
                hi = mid
        return self.greedy(n, hi, target), hi

    def plan(self, n: int) -> tuple[list[int], float]:
        """Algorithm 3 to x_0; when its smallest D is set by one late hop the path needs fewer
        than n calls, and the spare calls go to the prefix: the path up to its last call is
        re-planned with the remaining calls (Algorithm 3 again, targeting that call's latent)."""
        path, bound = self.bisect(n, self.m)
        tail: list[int] = []
        while 1 < len(path) and len(path) + len(tail) < n:
            tail.insert(0, path[-1])
            path, _ = self.bisect(n - len(tail), tail[0])
        return path + tail, bound


PATHS = ("planned", "uniform", "searched")


def uniform_path(m: int, n: int) -> list[int]:
    """OLSS-P: n teacher call indices evenly spread over 0..M-1, starting at 0."""
    return [int(round(i * m / n)) for i in range(n)]


def _fill(path: list[int], n: int, m: int) -> list[int]:
    """Split the widest gaps until the path has n calls (Alg. 2 may reach x_0 in fewer)."""
    path = list(path)
    while len(path) < n:
        ends = path + [m]
        gaps = [ends[i + 1] - ends[i] for i in range(len(path))]
        i = int(np.argmax(gaps))
        if gaps[i] < 2:
            break
        path.insert(i + 1, path[i] + gaps[i] // 2)
    return path


def plan_path(traj: Trajectories, steps: int, *, ridge="auto", folds: int = 5, gram=None, relative=False):
    """Algorithms 1-3 on the teacher's data: (path, D)."""
    acc = gram or teacher_gram(traj, folds)
    planner = _Planner(acc, traj.num_teacher_steps, ridge, relative)
    path, bound = planner.plan(steps)
    return _fill(path, steps, traj.num_teacher_steps), bound


def _row_report(i: int, fit: Fit, target_time: float | None) -> dict:
    return {
        "row": i,
        "target": "x_0" if target_time is None else f"t={target_time:g}",
        "rel_residual": fit.rel_residual,
        "mse": fit.mse,
        "cv_mse": fit.cv_mse,
        "ridge": fit.ridge,
        "condition": fit.condition,
    }


def _targets(traj: Trajectories, path: list[int]) -> list[int]:
    return path[1:] + [traj.num_teacher_steps]


def _fit_open(traj: Trajectories, path: list[int], ridge, acc: GramAccumulator) -> list[Fit]:
    fits = []
    for i, target in enumerate(_targets(traj, path)):
        basis = ["L0"] + [f"O{p}" for p in path[: i + 1]]
        fits.append(acc.fit(basis, f"L{target}", ridge))
    return fits


def _fit_closed(traj, path, ridge, folds, source: Source, batch_size: int, progress: bool, samples=None) -> list[Fit]:
    """Row i fitted on [x_T, ê_0..ê_i], the student's own outputs on its own latents (over
    `samples`, default all). The student's latents come from the reference loop running rows
    0..i (`_prefix`), with the outputs of calls before i replayed: the same loop and arithmetic
    the plan samples with, one model call per row and sample."""
    from tqdm.auto import tqdm

    samples = np.arange(traj.num_samples) if samples is None else np.asarray(samples)
    n = len(path)
    dim = traj.latents.shape[2]
    x_T = source.x_T[torch.as_tensor(samples)]
    replay = torch.empty((samples.size, n, *x_T.shape[1:]), dtype=x_T.dtype, device=x_T.device)
    student = np.zeros((samples.size, n, dim), dtype=np.float32)  # ê_i per sample (by position)
    fits: list[Fit] = []
    coef = np.zeros((n + 1, n + 1))
    coef[0, 0] = 1.0
    for i, target in enumerate(tqdm(_targets(traj, path), desc="closed-loop fit", disable=not progress)):
        names = ["x_T"] + [f"e{j}" for j in range(i + 1)] + ["target"]
        acc = GramAccumulator(names, folds)
        program = _prefix(traj, path, coef, i)
        for pos in _batches(samples.size, (i + 3) * dim * 8, batch_size):
            ids = samples[pos]
            rows = torch.as_tensor(pos, device=x_T.device)
            reference.run(program, _Replay(source.model(ids), replay, rows, i), x_T[rows])
            student[pos, i] = replay[rows, i].reshape(ids.size, -1).float().cpu().numpy()
            vectors = np.concatenate(
                [traj.latents[ids, 0][:, None], student[pos, : i + 1], traj.latents[ids, target][:, None]], axis=1
            )
            acc.add(torch.from_numpy(vectors), ids)
        fit = acc.fit(names[:-1], "target", ridge)
        coef[i + 1, : i + 2] = fit.coef
        fits.append(fit)
    return fits


class _Replay:
    """raw_fn of the closed-loop fit's row i: the stored outputs for calls before i, the model
    (its output checked and stored) at call i."""

    def __init__(self, model, store: torch.Tensor, rows: torch.Tensor, i: int):
        self.model, self.store, self.rows, self.i = model, store, rows, i
        self.calls = 0

    def __call__(self, x, t, index):
        k = self.calls
        self.calls += 1
        if k < self.i:
            return self.store[self.rows, k]
        out = self.model(x, t, index)
        if not bool(torch.isfinite(out).all()):
            raise CalibrationError(
                f"NaN/inf in the model output on the student's latent at call {k} (t={float(t[0]):g})"
            )
        self.store[self.rows, k] = out
        return out


def _prefix(traj, path, coef, i: int):
    """The Program of the student's rows 0..i: calls at path[:i+1]; its result row (out_i) is a
    placeholder, the loop is run for call i's output."""
    c = np.zeros((i + 2, i + 2))
    c[: i + 1, : i + 1] = coef[: i + 1, : i + 1]
    c[i + 1, i + 1] = 1.0
    return compile_program(StepPlan(traj.times[path[: i + 1]], c, traj.teacher.prediction_type))


def _plan_coef(fits: list[Fit]) -> np.ndarray:
    n = len(fits)
    coef = np.zeros((n + 1, n + 1))
    coef[0, 0] = 1.0
    for i, f in enumerate(fits):
        coef[i + 1, : i + 2] = f.coef
    return coef


def _student_error(traj, path, coef, source: Source, samples, batch_size: int) -> float:
    """Relative error of the student (calls at `path`, rows `coef`) against the teacher's result
    on `samples`: ||x − x_teacher|| / ||x_teacher||, pooled."""
    plan = StepPlan(traj.times[path], coef, traj.teacher.prediction_type)
    err = ref = 0.0
    for ids in _batches(samples, 2 * traj.latents.shape[2] * 8, batch_size):
        x = reference.run(compile_program(plan), source.model(ids), source.x_T[torch.as_tensor(ids)]).latents
        x = x.reshape(ids.size, -1).double().cpu().numpy()
        target = traj.latents[ids, -1].astype(np.float64)
        err += float(((x - target) ** 2).sum())
        ref += float((target**2).sum())
    return math.sqrt(err / ref)


def search_path(
    traj: Trajectories,
    path: list[int],
    source: Source,
    *,
    ridge="auto",
    folds: int = 5,
    moves=(-4, -2, -1, 1, 2, 4),
    sweeps: int = 3,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[list[int], float]:
    """Refine a path by coordinate descent on the closed-loop error (beyond the paper).

    The calibration samples are split: every 4th sample is a validation sample, the rest fit
    the rows (closed loop); a move shifts one call (not the first) by one of `moves` teacher
    indices and is kept if the validation error of the student's result against the teacher's
    drops. Up to `sweeps` passes over the calls. Returns (path, validation error).
    Algorithm 1's reachability is an open-loop proxy; this measures what the plan will do.
    """
    from tqdm.auto import tqdm

    num, m = traj.num_samples, traj.num_teacher_steps
    val = np.arange(0, num, 4)
    train = np.setdiff1d(np.arange(num), val)
    if val.size < 1 or train.size < needed_samples(len(path), traj.latents.shape[2], ridge):
        raise CalibrationError(f"searching a path needs more calibration samples than {num} (a quarter is held out)")
    folds = max(1, min(folds, train.size))

    def error(candidate):
        fits = _fit_closed(traj, candidate, ridge, folds, source, batch_size, False, samples=train)
        return _student_error(traj, candidate, _plan_coef(fits), source, val, batch_size)

    path = list(path)
    best = error(path)
    bar = tqdm(total=sweeps * (len(path) - 1) * len(moves), desc="path search", disable=not progress)
    for _ in range(sweeps):
        improved = False
        for i in range(1, len(path)):
            for d in moves:
                bar.update(1)
                cand = path[:i] + [path[i] + d] + path[i + 1 :]
                if not (0 < cand[i] < m and all(b > a for a, b in zip(cand, cand[1:]))):
                    continue
                e = error(cand)
                if e < best:
                    best, path, improved = e, cand, True
        if not improved:
            break
    bar.close()
    return path, best


def needed_samples(steps: int, dim: int, ridge) -> int:
    """Calibration samples needed: >= 2 equations per coefficient of the widest row (steps + 1
    basis vectors, each sample giving `dim` equations), and 2 samples to hold one out for λ."""
    return max(2 if ridge == "auto" else 1, math.ceil(2 * (steps + 1) / dim))


def fit(
    traj: Trajectories,
    path: list[int],
    *,
    ridge="auto",
    closed_loop: bool = False,
    source: Source | None = None,
    folds: int = 5,
    batch_size: int = 16,
    progress: bool = False,
    gram: GramAccumulator | None = None,
    samples=None,
) -> OLSSFit:
    """Fit the rows of an OLSS plan whose calls are at teacher indices `path` (see module doc).

    closed_loop needs `source` (the model) to run the student's own calls. samples: the
    calibration samples to fit on (indices; default all; closed loop only), so that the others
    can judge the fit.
    """
    m = traj.num_teacher_steps
    n = len(path)
    if n < 1 or path[0] != 0 or any(b <= a for a, b in zip(path, path[1:])) or path[-1] >= m:
        raise ValueError(f"path must start at 0 and increase strictly below {m}, got {path}")
    if samples is not None:
        if not closed_loop:
            raise ValueError("samples=... selects the samples of a closed-loop fit (closed_loop=True)")
        samples = np.asarray(samples, dtype=np.int64)
        if samples.ndim != 1 or samples.size < 1 or samples.min() < 0 or samples.max() >= traj.num_samples:
            raise ValueError(f"samples must be indices into the {traj.num_samples} calibration samples")
    count = traj.num_samples if samples is None else int(samples.size)
    need = needed_samples(n, traj.latents.shape[2], ridge)
    if count < need:
        raise CalibrationError(
            f"OLSS with {n} steps fits up to {n + 1} coefficients per row: it needs at least {need} calibration "
            f"samples, got {count}"
        )
    folds = max(1, min(folds, count))
    if closed_loop:
        if source is None:
            raise ValueError("closed_loop=True needs the model (source=...) to run the student's own calls")
        fits = _fit_closed(traj, path, ridge, folds, source, batch_size, progress, samples=samples)
    else:
        fits = _fit_open(traj, path, ridge, gram or teacher_gram(traj, folds))
    coef = _plan_coef(fits)
    targets = _targets(traj, path)
    rows = [
        _row_report(i + 1, f, None if tgt == m else float(traj.times[tgt]))
        for i, (f, tgt) in enumerate(zip(fits, targets))
    ]
    teacher = traj.teacher
    plan = StepPlan(
        traj.times[path],
        coef,
        teacher.prediction_type,
        schedule_fingerprint=teacher.schedule_fingerprint,
        num_train_timesteps=teacher.num_train_timesteps,
        metadata={
            "solver": "olss",
            **{k: teacher.metadata[k] for k in ("out_sigma", "out_alpha") if k in teacher.metadata},
            "calibration": {
                "method": "OLSS (Duan et al. 2023)",
                "teacher": f"{teacher.metadata.get('solver', 'plan')}:{teacher.num_calls}",
                "teacher_hash": teacher.hash(),
                "path": [int(p) for p in path],
                "closed_loop": bool(closed_loop),
                "ridge": ridge if ridge == "auto" else float(ridge),
                "folds": folds,
                "samples": count,
                "rows": rows,
            },
        },
    )
    return OLSSFit(plan, [int(p) for p in path], rows, None)


def calibrate(
    model_or_engine,
    calibration_set,
    steps: int,
    *,
    teacher="ddim:100",
    path: str = "planned",
    ridge="auto",
    closed_loop: bool = True,
    seed: int = 0,
    schedule=None,
    guidance_scale: float | None = None,
    directory=None,
    batch_size: int = 16,
    folds: int = 5,
    progress: bool = True,
) -> StepPlan:
    """Calibrate an OLSS plan with `steps` model calls.

    model_or_engine: an Engine (calibration_set: prompts, one sample each, x_T from `seed`), a
    model_fn(x, t) with `schedule=` (calibration_set: the x_T tensor [samples, ...]), or a
    calibration Source. teacher: 'solver:steps' or a StepPlan on the model's schedule.
    path: "planned" (Algorithms 1-3), "uniform" (OLSS-P) or "searched" (the planned path refined
    by `search_path` on a quarter of the samples held out; closed loop only).
    directory: keep the teacher trajectories there (resumable; bounded memory).
    Returns the plan; its metadata["calibration"] holds the path, ridge and per-row residuals.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if path not in PATHS:
        raise ValueError(f"path must be one of {', '.join(map(repr, PATHS))}, got {path!r}")
    if path == "searched" and not closed_loop:
        raise ValueError("path='searched' optimises the closed-loop error: it needs closed_loop=True")
    source = make_source(model_or_engine, calibration_set, seed=seed, schedule=schedule, guidance_scale=guidance_scale)
    dim = int(np.prod(source.x_T.shape[1:]))
    need = needed_samples(steps, dim, ridge)
    if source.num_samples < need:
        raise CalibrationError(
            f"OLSS with {steps} steps fits up to {steps + 1} coefficients per row: it needs at least {need} "
            f"calibration samples, got {source.num_samples}"
        )
    traj = teacher_trajectories(source, teacher, directory=directory, batch_size=batch_size, progress=progress)
    if steps > traj.num_teacher_steps:
        raise CalibrationError(
            f"{steps} student steps need a teacher with at least as many calls, got {traj.num_teacher_steps}"
        )
    folds = max(1, min(folds, source.num_samples))
    gram = teacher_gram(traj, folds)
    bound = search_error = None
    if path == "uniform":
        chosen = uniform_path(traj.num_teacher_steps, steps)
    else:
        chosen, bound = plan_path(traj, steps, ridge=ridge, folds=folds, gram=gram)
    if path == "searched":
        chosen, search_error = search_path(
            traj, chosen, source, ridge=ridge, folds=folds, batch_size=batch_size, progress=progress
        )
    result = fit(
        traj,
        chosen,
        ridge=ridge,
        closed_loop=closed_loop,
        source=source,
        folds=folds,
        batch_size=batch_size,
        progress=progress,
        gram=gram,
    )
    return result.plan.with_metadata(
        calibration={
            **result.plan.metadata["calibration"],
            "path_kind": path,
            "max_error": bound,
            "search_validation_error": search_error,
            "seed": seed,
            "source": {k: v for k, v in source.describe().items() if k != "prompts"},
        }
    )
