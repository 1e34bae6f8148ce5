"""S^3: searching USF solver strategies for a model and an NFE budget (Liu et al., "A Unified
Sampling Framework for Solver Searching of Diffusion Probabilistic Models", ICLR 2024, §4), with
the performance predictor the released code lacks, and GITS's tuned time schedule.

The space (`fastdiff.solvers.usf`): per step the time (a point of the teacher's grid), the
prediction type, the Taylor order, the relaxation of the first derivative (USF's 1 + c·h among
them), the scale of the second, the start point and a pseudo-corrector; and the analytical first
step. A candidate (`Genome`) is the teacher indices of its points plus one `usf.Step` per step;
it compiles to a StepPlan (`Space.compile`), so invalid ones (an order above the history, an
unstable step) are rejected with the step and the reason before any model call.

The score (the cheap proxy of §4.1, instead of FID on 1k samples): the relative RMS error of the
candidate's result against the teacher's (a many-step run, `teacher_trajectories`) on the
calibration samples: ||x − x_teacher|| / ||x_teacher|| pooled, `nfe` model calls per sample.

The search (§4.2): a population seeded with the known solvers (DPM-Solver++ 2M/3M, UniPC bh1/bh2,
DDIM) on several time schedules (uniform in t, uniform in λ, GITS), then generations of mutants
of the best candidates. With `predictor=True` every generation proposes `proposals`× more
mutants than it evaluates and a ranking predictor (gradient-boosted trees on the strategy's
features, refitted on everything evaluated so far) chooses which ones the model scores; its
5-fold cross-validated Spearman correlation on the evaluated strategies is reported. With
`refit="olss"` OLSS coefficients are also fitted (closed loop, on the search's samples) on the
times of the few best candidates with distinct times, the refit best on those samples is kept, and
the calibration samples the search did not score choose between it and the searched plan
(`SearchResult.best_plan`).

Runs are reproducible and resumable: generation g draws from seed (seed, g) and proposes from the
candidates of generations < g only, and a checkpoint (JSON lines: the settings, then one record
per evaluated candidate) lets a killed search continue to the same result; a checkpoint made with
other settings is refused. Candidates are evaluated in worker processes (fork, one thread each)
by default, or as tasks on a Ray cluster (`ray_address`).

`tuned_times` is GITS (Chen et al., "On the Trajectory Regularity of ODE-based Diffusion
Sampling", ICML 2024, §4): dynamic programming over the teacher's grid, the cost of a hop the
distance of one DDIM step from the teacher's latent to the teacher's latent at the hop's end.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_write
from ..loops import reference
from ..plan import StepPlan
from ..program import compile as compile_program
from ..schedules import data_prediction, noise_prediction
from ..solvers.common import SolverError
from ..solvers.usf import MAX_ORDER, RELAXATIONS, Grid, Step, Strategy, steps_to_dicts
from .lstsq import CalibrationError
from .trajectories import Source, Trajectories, differing_keys, make_source, teacher_trajectories

FORMAT = "fastdiff.search"
VERSION = 1
SCHEDULES = ("uniform_t", "uniform_lambda", "gits")
SEED_SOLVERS = ("dpmpp_2m", "dpmpp_3m", "unipc_bh2", "unipc_bh1", "ddim")


# ------------------------------------------------------------------ the space
@dataclass(frozen=True)
class Genome:
    """A candidate: `idx` the teacher indices of its K points (strictly increasing, the first 0;
    the grid's last point is the teacher's end), one Step per point, `afs` the analytical first
    step (then the first point costs no call: K = nfe + 1)."""

    idx: tuple[int, ...]
    steps: tuple[Step, ...]
    afs: bool = False

    def to_dict(self) -> dict:
        return {
            "idx": [int(i) for i in self.idx],
            "afs": bool(self.afs),
            "steps": steps_to_dicts(self.steps),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Genome:
        try:
            return cls(tuple(int(i) for i in d["idx"]), tuple(Step.from_dict(s) for s in d["steps"]), bool(d["afs"]))
        except (KeyError, TypeError) as exc:
            raise SolverError(f"search: a candidate needs idx, steps and afs ({exc})") from None

    def key(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @property
    def nfe(self) -> int:
        return len(self.idx) - (1 if self.afs else 0)


class Space:
    """The strategies with `nfe` model calls on the teacher's grid (see the module doc)."""

    def __init__(self, traj: Trajectories, schedule, nfe: int):
        if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 2:
            raise ValueError(f"the search needs nfe >= 2 model calls, got {nfe!r}")
        if nfe > traj.num_teacher_steps:
            raise CalibrationError(
                f"{nfe} calls need a teacher with at least as many calls, got {traj.num_teacher_steps}"
            )
        self.schedule = schedule
        self.nfe = nfe
        self.times = np.asarray(traj.times, dtype=np.float64)
        self.m = self.times.size
        self.ve = schedule.ve_sigma(self.times)
        self.end = float(traj.teacher.metadata.get("out_sigma", 0.0))
        self.lam = np.append(-np.log(self.ve), math.inf if self.end == 0 else -math.log(self.end))

    def grid(self, idx: Sequence[int]) -> Grid:
        idx = list(idx)
        if not idx or idx[0] != 0 or any(b <= a for a, b in zip(idx, idx[1:])) or idx[-1] >= self.m:
            raise SolverError(
                f"search: the points must be teacher indices increasing strictly from 0 below {self.m}, got {idx}"
            )
        return Grid.from_ve_sigmas(self.times[idx], [*self.ve[idx], self.end])

    def strategy(self, g: Genome, name: str = "usf") -> Strategy:
        if g.nfe != self.nfe:
            raise SolverError(f"search: the candidate makes {g.nfe} model calls, the space {self.nfe}")
        return Strategy(self.grid(g.idx), g.steps, afs=g.afs, name=name)

    def compile(self, g: Genome, name: str = "usf") -> StepPlan:
        return self.strategy(g, name).compile(self.schedule)

    def indices(self, times: Sequence[float]) -> tuple[int, ...]:
        """The teacher indices nearest to `times` (decreasing model times), made strictly increasing."""
        out: list[int] = []
        for t in times:
            i = int(np.argmin(np.abs(self.times - t)))
            out.append(max(i, out[-1] + 1) if out else 0)
        if out[-1] >= self.m:
            raise SolverError(f"search: {len(out)} points do not fit the teacher's {self.m}")
        return tuple(out)

    # -- features for the predictor: per step (aligned at the end, so the last steps line up)
    STEP_FEATURES = 13

    def features(self, g: Genome) -> np.ndarray:
        k_max = self.nfe + 1
        lam_lo, lam_hi = self.lam[0], self.lam[self.m - 1]
        out = np.zeros((k_max, self.STEP_FEATURES))
        k = len(g.idx)
        for j, (i, s) in enumerate(zip(g.idx, g.steps)):
            row = out[k_max - k + j]
            nxt = g.idx[j + 1] if j + 1 < k else self.m - 1
            row[0] = 1.0
            row[1] = (self.lam[i] - lam_lo) / (lam_hi - lam_lo)
            row[2] = (self.lam[nxt] - self.lam[i]) / (lam_hi - lam_lo)
            row[3] = s.order / MAX_ORDER
            row[4] = s.prediction == "eps"
            row[5 + RELAXATIONS.index(s.relaxation)] = 1.0
            row[9] = s.c if s.relaxation == "linear" else 0.0
            row[10] = s.scale[1] if s.scale and len(s.scale) > 1 else 1.0
            row[11] = s.start - 1
            row[12] = s.corrector / MAX_ORDER
        return np.concatenate([out.ravel(), [float(g.afs)]])


def _steps_of(kind: str, k: int, afs: bool) -> tuple[Step, ...]:
    """The steps of a known solver on k points (the last one first order: it lands on σ = 0)."""
    out = []
    for i in range(k):
        avail = i + 1  # outputs known at step i (the afs point's among them)
        last = i == k - 1
        if kind == "ddim" or last:
            out.append(Step(order=1, prediction="eps" if kind == "ddim" else "x0"))
        elif kind == "dpmpp_2m":
            out.append(Step(order=min(2, avail), relaxation="midpoint" if avail >= 2 else "none"))
        elif kind == "dpmpp_3m":
            p = min(3, avail)
            out.append(
                Step(order=p, relaxation="midpoint" if p == 2 else "none", **({"scale": (1.0, 0.5)} if p == 3 else {}))
            )
        else:  # unipc_bh1 / unipc_bh2: UniP-2 with a UniC corrector one order up
            relax = "bh1" if kind == "unipc_bh1" else "midpoint"
            p = min(2, avail)
            q = 0 if i + 2 == k else p + 1  # no corrector before the last (first-order) step's point
            out.append(
                Step(
                    order=p,
                    relaxation=relax if p == 2 else "none",
                    corrector=q,
                    corrector_relaxation=relax if q == 2 else "none",
                )
            )
    del afs
    return tuple(out)


def schedule_indices(space: Space, kind: str, k: int, traj: Trajectories | None = None) -> tuple[int, ...]:
    """k teacher indices of a time schedule: "uniform_t" (the teacher's grid subsampled evenly),
    "uniform_lambda" (evenly in log-SNR up to the teacher's last call) or "gits" (`tuned_times`)."""
    if kind == "uniform_t":
        return space.indices(space.times[[int(round(i * space.m / k)) for i in range(k)]])
    if kind == "uniform_lambda":
        lam = np.linspace(space.lam[0], space.lam[space.m - 1], k + 1)[:k]
        return space.indices(space.schedule.t_of_lambda(lam))
    if kind == "gits":
        if traj is None:
            raise ValueError("the GITS schedule needs the teacher trajectories")
        return tuple(tuned_times(traj, k, space.schedule))
    raise ValueError(f"unknown time schedule {kind!r}: expected one of {', '.join(SCHEDULES)}")


def seed_genomes(space: Space, traj: Trajectories) -> list[Genome]:
    """The first generation: every known solver on every time schedule, with and without AFS."""
    out, seen = [], set()
    for afs in (False, True):
        k = space.nfe + (1 if afs else 0)
        for sched in SCHEDULES:
            try:
                idx = schedule_indices(space, sched, k, traj)
            except SolverError:
                continue
            for kind in SEED_SOLVERS:
                g = Genome(idx, _steps_of(kind, k, afs), afs)
                if g.key() not in seen:
                    seen.add(g.key())
                    out.append(g)
    return out


def mutate(g: Genome, space: Space, rng: np.random.Generator, tries: int = 50) -> Genome | None:
    """One to three random changes of a candidate that still compiles (None if none is found)."""
    for _ in range(tries):
        cand = g
        for _ in range(int(rng.integers(1, 4))):
            cand = _change(cand, space, rng)
        if cand.key() == g.key():
            continue
        try:
            space.compile(cand)
        except SolverError:
            continue
        return cand
    return None


def _change(g: Genome, space: Space, rng: np.random.Generator) -> Genome:
    idx, steps = list(g.idx), list(g.steps)
    k = len(idx)
    what = rng.choice(
        ["time", "time", "time", "order", "prediction", "relaxation", "scale", "corrector", "start", "afs"]
    )
    i = int(rng.integers(0, k - 1)) if k > 1 else 0  # a step before the last (the last stays first order)
    s = steps[i]
    if what == "time" and k > 1:
        j = int(rng.integers(1, k))
        lo, hi = idx[j - 1] + 1, (idx[j + 1] - 1 if j + 1 < k else space.m - 1)
        d = int(rng.choice([-8, -4, -2, -1, 1, 2, 4, 8]))
        idx[j] = int(min(max(idx[j] + d, lo), hi))
    elif what == "order":
        order = int(rng.integers(1, min(MAX_ORDER, i + 1) + 1))
        scale = None if order < 3 else (s.scale + (1.0,) * order)[: order - 1] if s.scale else None
        steps[i] = Step(
            order=order,
            prediction=s.prediction,
            scale=scale,
            relaxation=s.relaxation if order > 1 else "none",
            c=s.c,
            start=s.start,
            corrector=s.corrector,
            corrector_relaxation=s.corrector_relaxation,
        )
    elif what == "prediction":
        steps[i] = _replace(s, prediction="eps" if s.prediction == "x0" else "x0")
    elif what == "relaxation" and s.order > 1:
        relax = str(rng.choice(RELAXATIONS))
        c = float(np.round(s.c + rng.normal(0, 0.3), 3)) if relax == "linear" else 0.0
        steps[i] = _replace(s, relaxation=relax, c=c)
    elif what == "scale" and s.order > 2:
        scale = list(s.scale or (1.0,) * (s.order - 1))
        scale[1] = (
            float(rng.choice([0.5, 1.0])) if rng.random() < 0.5 else float(np.round(scale[1] + rng.normal(0, 0.2), 3))
        )
        steps[i] = _replace(s, scale=tuple(scale))
    elif what == "corrector":
        q = int(rng.choice([0, 0, 1, 2, 3, 4]))
        steps[i] = _replace(
            s, corrector=q, corrector_relaxation=str(rng.choice(["none", "midpoint", "bh1"])) if q == 2 else "none"
        )
    elif what == "start":
        steps[i] = _replace(s, start=int(rng.choice([1, 1, 2])))
    elif what == "afs" and k > 2:
        if g.afs:  # drop the analytical point: the first call's point is index 0 again
            idx = [0] + idx[2:]
            steps = steps[1:]
            steps[0] = Step(order=1)
        else:  # add an analytical point before the first call
            second = idx[1] if k > 1 else space.m - 1
            idx = [0, max(1, second // 2)] + idx[1:]
            steps = [Step(order=1)] + steps
        return Genome(tuple(idx), tuple(steps), not g.afs)
    return Genome(tuple(idx), tuple(steps), g.afs)


def _replace(s: Step, **changes) -> Step:
    return Step(**{**vars(s), **changes})


# ------------------------------------------------------------------ GITS: a tuned time schedule
def tuned_times(traj: Trajectories, points: int, schedule, samples: int = 256) -> list[int]:
    """GITS's time schedule: the `points` teacher indices (the first 0) minimising the sum over
    hops of the RMS distance between one DDIM step from the teacher's latent at the hop's start
    (with the teacher's output there) and the teacher's latent at its end (the last hop ends at
    the teacher's result), by dynamic programming over the teacher's grid (GITS §4, eq. 9)."""
    m = traj.num_teacher_steps
    if not 1 <= points <= m:
        raise ValueError(f"a tuned schedule of {points} points needs 1..{m} (the teacher's calls)")
    ids = np.arange(min(samples, traj.num_samples))
    times = np.asarray(traj.times, dtype=np.float64)
    pred = traj.teacher.prediction_type
    alphas = np.append(schedule.alpha(times), 1.0)
    sigmas = np.append(schedule.sigma(times), 0.0)
    out_sigma = float(traj.teacher.metadata.get("out_sigma", 0.0))
    if out_sigma > 0:
        alphas[-1], sigmas[-1] = 1 / math.sqrt(1 + out_sigma**2), out_sigma / math.sqrt(1 + out_sigma**2)
    lat = torch.from_numpy(np.asarray(traj.latents[ids], dtype=np.float64))  # [S, M+1, D]
    cost = np.full((m + 1, m + 1), np.inf)
    for i in range(m):
        x = lat[:, i]
        raw = torch.from_numpy(np.asarray(traj.outputs[ids, i], dtype=np.float64))
        x0 = data_prediction(raw, x, alphas[i], sigmas[i], pred)
        eps = noise_prediction(raw, x, alphas[i], sigmas[i], pred)
        j = torch.arange(i + 1, m + 1)
        step = (
            torch.from_numpy(alphas[i + 1 :])[None, :, None] * x0[:, None]
            + torch.from_numpy(sigmas[i + 1 :])[None, :, None] * eps[:, None]
        )
        diff = step - lat[:, j]
        cost[i, i + 1 :] = torch.sqrt((diff**2).mean(dim=(0, 2))).numpy()
    best = np.full((points + 1, m + 1), np.inf)  # best[h, j]: h hops from 0 ending at j
    back = np.zeros((points + 1, m + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for h in range(1, points + 1):
        total = best[h - 1][:, None] + cost  # [from, to]
        back[h] = np.argmin(total, axis=0)
        best[h] = total[back[h], np.arange(m + 1)]
    path, j = [], m
    for h in range(points, 0, -1):
        j = int(back[h, j])
        path.append(j)
    return path[::-1]


def gits_strategy(traj: Trajectories, schedule, nfe: int, solver: str = "dpmpp_2m") -> Strategy:
    """A known solver's steps on GITS's tuned times (the training-free baseline of the solver
    table: DPM-Solver++(2M) by default)."""
    space = Space(traj, schedule, nfe)
    idx = schedule_indices(space, "gits", nfe, traj)
    return space.strategy(Genome(idx, _steps_of(solver, nfe, False)), name=f"gits_{solver}")


# ------------------------------------------------------------------ the predictor
class Predictor:
    """Predicts a candidate's log error from its features (gradient-boosted trees, seeded)."""

    def __init__(self, seed: int = 0):
        try:
            from sklearn.ensemble import GradientBoostingRegressor
        except ImportError as exc:  # pragma: no cover - scikit-learn is in the models extra
            raise ImportError("the search predictor needs scikit-learn: pip install 'fastdiff[models]'") from exc
        self.model = GradientBoostingRegressor(
            n_estimators=150, max_depth=3, learning_rate=0.05, subsample=0.8, random_state=seed
        )

    def fit(self, x: np.ndarray, y: np.ndarray) -> Predictor:
        self.model.fit(x, y)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict(x)


def spearman(a, b) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def rank_correlation(x: np.ndarray, y: np.ndarray, *, folds: int = 5, seed: int = 0) -> float:
    """The predictor's Spearman correlation on held-out strategies: k-fold over the evaluated ones,
    each fold predicted by a predictor fitted on the others."""
    n = len(y)
    if n < 2 * folds:
        return math.nan
    order = np.random.default_rng(seed).permutation(n)
    pred = np.empty(n)
    for f in range(folds):
        test = order[f::folds]
        train = np.setdiff1d(order, test)
        pred[test] = Predictor(seed).fit(x[train], y[train]).predict(x[test])
    return spearman(pred, y)


# ------------------------------------------------------------------ evaluation
class Evaluator:
    """Scores candidates: the relative error of the result against the teacher's on `ids`."""

    def __init__(self, source: Source, space: Space, traj: Trajectories, ids: np.ndarray, batch_size: int = 64):
        self.source, self.space, self.ids, self.batch_size = source, space, np.asarray(ids), batch_size
        self.target = torch.from_numpy(np.asarray(traj.latents[self.ids, -1], dtype=np.float64))

    def __call__(self, genome: dict) -> dict:
        try:
            plan = self.space.compile(Genome.from_dict(genome))
        except SolverError as exc:
            return {"error": None, "reason": str(exc), "calls": 0}
        value = self.error_of(plan)
        calls = plan.num_calls * int(self.ids.size)
        if not math.isfinite(value):
            return {"error": None, "reason": "the result is not finite", "calls": calls}
        return {"error": value, "reason": None, "calls": calls}

    def error_of(self, plan: StepPlan) -> float:
        return plan_error(self.source, self.ids, self.target, plan, self.batch_size)


def plan_error(source: Source, ids: np.ndarray, target: torch.Tensor, plan: StepPlan, batch_size: int = 64) -> float:
    """Relative RMS error of `plan`'s results from the samples `ids` of `source` against `target`
    (float64 [len(ids), D], e.g. a teacher's results), pooled over the samples."""
    program = compile_program(plan)
    err = ref = 0.0
    for start in range(0, ids.size, batch_size):
        batch = ids[start : start + batch_size]
        x_T = source.x_T[torch.as_tensor(batch)]
        x = reference.run(program, source.model(batch), x_T).latents
        x = x.reshape(batch.size, -1).double().cpu()
        t = target[start : start + batch.size]
        err += float(((x - t) ** 2).sum())
        ref += float((t**2).sum())
    return math.sqrt(err / ref)


_WORKER: Evaluator | None = None


def _fork_evaluate(genome: dict) -> dict:
    return _WORKER(genome)


def _fork_init() -> None:
    torch.set_num_threads(1)


class _Executor:
    """Evaluates lists of candidates: in this process, in forked worker processes, or on Ray."""

    def __init__(self, evaluator: Evaluator, workers: int, ray_address: str | None):
        self.evaluator, self.workers, self.ray_address = evaluator, workers, ray_address
        self.pool = self._remote = self._ref = None
        if ray_address is not None:
            try:
                import ray
            except ImportError as exc:
                raise ImportError("searching on a Ray cluster needs ray: pip install 'ray[default]'") from exc
            try:
                _check_reachable(ray_address)
                if not ray.is_initialized():
                    ray.init(
                        address=None if ray_address == "local" else ray_address,
                        include_dashboard=False,
                        log_to_driver=False,
                        configure_logging=False,
                    )
            except Exception as exc:  # ray raises ConnectionError, RuntimeError, ... by version
                raise CalibrationError(
                    f"cannot reach the Ray cluster at {ray_address!r} ({type(exc).__name__}: {exc}); the checkpoint "
                    "keeps every candidate evaluated so far"
                ) from exc
            self._ref = ray.put(evaluator)
            self._remote = ray.remote(num_cpus=1)(_ray_evaluate)
        elif workers > 1:
            import multiprocessing as mp

            global _WORKER
            _WORKER = evaluator
            self.pool = mp.get_context("fork").Pool(workers, initializer=_fork_init)

    def map(self, genomes: list[dict]) -> list[dict]:
        if self._remote is not None:
            import ray

            return ray.get([self._remote.remote(self._ref, g) for g in genomes])
        if self.pool is not None:
            return self.pool.map(_fork_evaluate, genomes, chunksize=1)
        return [self.evaluator(g) for g in genomes]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a host:port nobody listens at (ray.init retries for minutes)."""
    import socket

    if address in ("local", "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected host:port, ray://host:port, 'auto' or 'local', got {address!r}")
    with socket.create_connection((host, int(port)), timeout=timeout):
        pass


def _ray_evaluate(evaluator: Evaluator, genome: dict) -> dict:
    torch.set_num_threads(1)
    return evaluator(genome)


# ------------------------------------------------------------------ checkpoint
def _read_checkpoint(path: Path, header: dict) -> list[dict]:
    if not path.is_file() or path.stat().st_size == 0:
        atomic_write(path, json.dumps(header, sort_keys=True) + "\n")
        return []
    try:
        lines = path.read_text().splitlines()
        old = json.loads(lines[0])
        if not isinstance(old, dict):
            raise ValueError(f"its first line is a JSON {type(old).__name__}, not the settings object")
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{path} is not a search checkpoint ({exc}): use another file or delete it") from exc
    if old != header:
        raise CalibrationError(
            f"{path} holds a search with other settings (differs in {differing_keys(old, header)}): it will not mix "
            "results; use another checkpoint file or delete it"
        )
    records = []
    for n, line in enumerate(lines[1:], start=2):
        try:
            records.append(_checked_record(json.loads(line)))
        except ValueError:
            if n == len(lines):  # a line cut by a kill: dropped (its candidate is evaluated again)
                atomic_write(path, "\n".join(lines[:-1]) + "\n")
                break
            raise CalibrationError(f"{path}: line {n} is corrupt: delete the file to start over") from None
    return records


def _checked_record(r) -> dict:
    """A checkpoint line as the search wrote it; ValueError otherwise."""
    if not isinstance(r, dict) or not isinstance(r.get("key"), str) or not isinstance(r.get("genome"), dict):
        raise ValueError("not a candidate record")
    error, calls = r.get("error"), r.get("calls")
    number = isinstance(error, (int, float)) and not isinstance(error, bool)
    if error is not None and not (number and math.isfinite(error)):
        raise ValueError("its error is not a finite number or null")
    if isinstance(calls, bool) or not isinstance(calls, int) or calls < 0:
        raise ValueError("its calls is not a count")
    if r["key"] != Genome.from_dict(r["genome"]).key():
        raise ValueError("its key is not its genome's")
    return r


def _append(path: Path | None, records: list[dict]) -> None:
    if path is None or not records:
        return
    with path.open("a") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------ the search
@dataclass
class SearchResult:
    """The best candidate found: its strategy and plan, the proxy error on the calibration samples,
    every evaluated candidate (`history`: generation, genome, error or reason, model calls), the
    model calls and wall time spent, the predictor's held-out rank correlation, and the OLSS refit
    when asked for."""

    strategy: Strategy
    plan: StepPlan
    error: float
    history: list[dict]
    calls: int
    seconds: float
    rank_correlation: float | None = None
    refit_plan: StepPlan | None = None
    refit_error: float | None = None
    settings: dict = field(default_factory=dict)
    validation: dict | None = None

    @property
    def best_plan(self) -> StepPlan:
        """The plan to use: the searched one, or with refit="olss" whichever of it and the refit
        has the lower error on the validation samples (`validation`)."""
        if self.validation is not None and self.validation["chosen"] == "olss":
            return self.refit_plan
        return self.plan

    def best_so_far(self) -> list[tuple[int, float]]:
        """(model calls spent, best error so far) after each evaluated candidate."""
        out, calls, best = [], 0, math.inf
        for r in self.history:
            calls += r["calls"]
            if r["error"] is not None:
                best = min(best, r["error"])
            out.append((calls, best))
        return out


def search(
    model_or_engine,
    calibration_set=None,
    nfe: int = 5,
    *,
    budget: int = 200,
    teacher="dpmpp_2m:100",
    samples: int | None = None,
    seed: int = 0,
    predictor: bool = True,
    parents: int = 8,
    per_generation: int = 8,
    proposals: int = 8,
    refit: str | None = None,
    refit_candidates: int = 8,
    checkpoint=None,
    trajectories=None,
    workers: int | None = None,
    ray_address: str | None = None,
    schedule=None,
    guidance_scale: float | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> SearchResult:
    """Search a USF strategy with `nfe` model calls for a model (S^3 with a ranking predictor).

    model_or_engine / calibration_set / schedule / guidance_scale: as `olss.calibrate` (an Engine
    and prompts, a model function and x_T, or a calibration Source). teacher: the many-step run the
    proxy compares with (its grid is the candidates' times; 'solver:steps' or a StepPlan).
    budget: candidates evaluated in all (the seeds included); each costs nfe × samples model calls.
    samples: the calibration samples the proxy runs on (default all). predictor: rank
    `proposals` × `per_generation` mutants per generation and evaluate the best `per_generation`
    (False: evaluate `per_generation` random mutants). refit="olss": also fit OLSS coefficients
    (closed loop, on the search's samples) on the times of the best `refit_candidates` candidates
    with distinct times and keep the refit with the lowest error on those samples (`refit_plan`);
    the times the search ranks best are not always the ones OLSS's free coefficients use best.
    checkpoint: a JSON-lines file to resume
    from and append to. trajectories: keep the teacher's run in this directory (resumable).
    workers: processes evaluating candidates (default: the CPU count for a CPU model, else 1);
    ray_address: evaluate on this Ray cluster instead ("local" starts one on this machine).
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a number of candidates >= 1, got {budget!r}")
    if refit not in (None, "olss"):
        raise ValueError(f"refit must be None or 'olss', got {refit!r}")
    for name, value in (
        ("parents", parents),
        ("per_generation", per_generation),
        ("proposals", proposals),
        ("refit_candidates", refit_candidates),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    source = make_source(model_or_engine, calibration_set, seed=seed, schedule=schedule, guidance_scale=guidance_scale)
    traj = teacher_trajectories(source, teacher, directory=trajectories, progress=progress)
    space = Space(traj, source.schedule, nfe)
    n = source.num_samples if samples is None else int(samples)
    if not 1 <= n <= source.num_samples:
        raise ValueError(f"samples must be in 1..{source.num_samples} (the calibration set), got {samples!r}")
    ids = np.arange(n)
    settings = {
        "format": FORMAT,
        "version": VERSION,
        "nfe": nfe,
        "teacher": traj.teacher.hash(),
        "schedule": source.schedule.fingerprint,
        "source": source.describe(),
        "samples": n,
        "seed": seed,
        "predictor": bool(predictor),
        "parents": parents,
        "per_generation": per_generation,
        "proposals": proposals,
    }
    path = Path(checkpoint) if checkpoint is not None else None
    cache = {r["key"]: r for r in _read_checkpoint(path, settings)} if path is not None else {}
    if workers is None:
        workers = (os.cpu_count() or 1) if source.x_T.device.type == "cpu" else 1
    evaluator = Evaluator(source, space, traj, ids, batch_size)
    history: list[dict] = []
    from tqdm.auto import tqdm

    bar = tqdm(total=budget, desc=f"search nfe={nfe}", unit="cand", disable=not progress)
    started = time.perf_counter()
    executor = None

    def run(gen: int, genomes: list[Genome]) -> None:
        nonlocal executor
        genomes = genomes[: budget - len(history)]
        todo = [g for g in genomes if g.key() not in cache]
        if todo:
            if executor is None:
                executor = _Executor(evaluator, workers, ray_address)
            results = executor.map([g.to_dict() for g in todo])
            new = [{"key": g.key(), "gen": gen, "genome": g.to_dict(), **r} for g, r in zip(todo, results)]
            _append(path, new)
            cache.update((r["key"], r) for r in new)
        for g in genomes:
            history.append({**cache[g.key()], "gen": gen})
        bar.update(len(genomes))
        best = min((r["error"] for r in history if r["error"] is not None), default=math.nan)
        bar.set_postfix(best=f"{best:.4g}")

    try:
        run(0, seed_genomes(space, traj))
        gen = 0
        while len(history) < budget:
            gen += 1
            rng = np.random.default_rng([seed, gen])
            valid = sorted((r for r in history if r["error"] is not None), key=lambda r: (r["error"], r["key"]))
            if not valid:
                raise CalibrationError("no candidate of the first generation could be evaluated")
            top = [Genome.from_dict(r["genome"]) for r in valid[:parents]]
            seen = {r["key"] for r in history}
            want = per_generation * (proposals if predictor else 1)
            pool: list[Genome] = []
            for _ in range(want * 4):
                if len(pool) >= want:
                    break
                parent = top[int(rng.integers(0, len(top)))] if rng.random() < 0.8 else top[0]
                child = mutate(parent, space, rng)
                if child is not None and child.key() not in seen:
                    seen.add(child.key())
                    pool.append(child)
            if not pool:
                break  # the neighbourhood of the best candidates is exhausted
            if predictor and len(valid) >= 16:
                x = np.stack([space.features(Genome.from_dict(r["genome"])) for r in valid])
                y = np.log([r["error"] for r in valid])
                scores = Predictor(seed).fit(x, y).predict(np.stack([space.features(g) for g in pool]))
                pool = [pool[i] for i in np.argsort(scores, kind="stable")]
            run(gen, pool[:per_generation])
    finally:
        bar.close()
        if executor is not None:
            executor.close()
    valid = sorted((r for r in history if r["error"] is not None), key=lambda r: (r["error"], r["key"]))
    if not valid:
        raise CalibrationError("no candidate could be evaluated")
    best = Genome.from_dict(valid[0]["genome"])
    strategy = space.strategy(best)
    x = np.stack([space.features(Genome.from_dict(r["genome"])) for r in valid])
    corr = rank_correlation(x, np.log([r["error"] for r in valid]), seed=seed)
    calls = sum(r["calls"] for r in history)
    seconds = time.perf_counter() - started
    info = {
        "method": "S^3 over USF strategies (Liu et al. 2024), proxy: error vs the teacher",
        "teacher": f"{traj.teacher.metadata.get('solver', 'plan')}:{traj.teacher.num_calls}",
        "teacher_hash": traj.teacher.hash(),
        "samples": n,
        "seed": seed,
        "budget": budget,
        "evaluated": len(history),
        "model_calls": calls,
        "proxy_error": valid[0]["error"],
        "predictor": bool(predictor),
        "rank_correlation": None if math.isnan(corr) else corr,
        "path": [int(i) for i in best.idx],
        "source": {k: v for k, v in source.describe().items() if k != "prompts"},
    }
    plan = strategy.compile(source.schedule).with_metadata(solver="usf", search=info)
    result = SearchResult(
        strategy, plan, valid[0]["error"], history, calls, seconds, info["rank_correlation"], settings=settings
    )
    if refit == "olss":
        result.refit_plan, result.refit_error, tried = _refit(
            traj, valid, refit_candidates, source, evaluator, progress
        )
        result.validation = _validate(result, source, space, traj, n, batch_size)
        info = {**info, "refit": "olss", "refit_candidates": tried, "validation": result.validation}
        result.plan = result.plan.with_metadata(search=info)
        result.refit_plan = result.refit_plan.with_metadata(solver="usf", search=info)
    return result


def _validate(result: SearchResult, source: Source, space: Space, traj, n: int, batch_size: int) -> dict:
    """Error of the searched plan and of its OLSS refit on the calibration samples the search did
    not score (samples n.. of the set; in-sample when the search used them all), and the winner."""
    held_out = n < source.num_samples
    ids = np.arange(n, source.num_samples) if held_out else np.arange(n)
    evaluator = Evaluator(source, space, traj, ids, batch_size)
    errors = {"search": evaluator.error_of(result.plan), "olss": evaluator.error_of(result.refit_plan)}
    chosen = "olss" if errors["olss"] < errors["search"] else "search"
    return {"samples": int(ids.size), "held_out": held_out, **errors, "chosen": chosen}


def _refit(traj, valid: list[dict], k: int, source: Source, evaluator: Evaluator, progress: bool):
    """OLSS rows (closed loop, fitted on the evaluator's samples) on the calls' times of each of
    the best `k` candidates with distinct times (with AFS: the first call moves to the teacher's
    first point, where OLSS's basis starts); returns the refit with the lowest error on those
    samples, its error, and [path, error] for every refit tried."""
    from tqdm.auto import tqdm

    from . import olss

    paths: list[list[int]] = []
    for r in valid:
        g = Genome.from_dict(r["genome"])
        path = [0, *g.idx[2:]] if g.afs else [0, *g.idx[1:]]
        if all(b > a for a, b in zip(path, path[1:])) and path not in paths:
            paths.append(path)
        if len(paths) == k:
            break
    best, tried = None, []
    for path in tqdm(paths, desc="OLSS refit", unit="plan", disable=not progress):
        fitted = olss.fit(traj, path, closed_loop=True, source=source, samples=evaluator.ids).plan
        err = evaluator.error_of(fitted)
        tried.append([[int(i) for i in path], err])
        if best is None or err < best[1]:
            best = (fitted, err)
    if best is None:
        raise CalibrationError("no searched candidate has times an OLSS refit can use")
    return best[0], best[1], tried
