"""Teacher trajectories for calibration: what a many-step sampler does from stored x_T.

For each calibration sample the teacher plan (e.g. DDIM with 100 steps) runs from x_T and we
keep, at every teacher call k, its input latent x^(k) and raw model output out_k, plus the
final result (the teacher's x_0). Candidate student times are the teacher's times, so the
open-loop OLSS basis [x_T, out_{p_1}, ..., out_{p_i}] and every fit target are columns of this
data.

Memory is bounded: samples run in batches and land in float32 .npy files opened as memory
maps (in a directory), or in RAM for small sets (no directory). A directory is resumable: a
batch is marked done only after its arrays are flushed, so an interrupted run (Ctrl-C, kill)
continues where it stopped; a directory made for another teacher, model or sample set is
refused instead of mixed in.

    DIR/meta.json        what the trajectories are (teacher, schedule, source): written last
    DIR/latents.npy      [S, M+1, D] float32 memory map
    DIR/outputs.npy      [S, M, D] float32 memory map
    DIR/state.npy        [S, 33] uint8: per sample a done flag and the SHA-256 of its latents and
                         outputs rows, replaced atomically after each batch
    DIR/teacher.json     the teacher plan

On resume every finished sample's rows are checked against their SHA-256: a sample whose rows
were changed or damaged on disk is computed again (with a warning naming it), never used.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..denoisers import GuidedOutput, Unguided
from ..dtypes import dtype_name
from ..files import atomic_write
from ..loops import reference
from ..loops.contract import RawFn
from ..plan import StepPlan
from ..program import compile as compile_program
from ..schedules import DiscreteSchedule
from .lstsq import CalibrationError

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Source(ABC):
    """What calibration needs from a model: a schedule, per-sample x_T and a raw_fn for any
    subset of the samples (conditioning may differ per sample). Calibration runs the reference
    loop without guidance on it: the raw_fn returns the guided output, the basis the plan
    combines."""

    schedule: DiscreteSchedule
    x_T: torch.Tensor  # [S, ...] initial noise, on the model's device and dtype

    @property
    def num_samples(self) -> int:
        return int(self.x_T.shape[0])

    @abstractmethod
    def model(self, ids: np.ndarray) -> RawFn:
        """raw_fn(x, t, index) -> guided output for the samples `ids` (in that order)."""

    @abstractmethod
    def describe(self) -> dict:
        """A JSON description; trajectories on disk are tied to it."""


class FunctionSource(Source):
    """A model_fn that treats samples independently (e.g. the exact Gaussian-mixture denoiser)."""

    def __init__(self, model_fn: ModelFn, schedule: DiscreteSchedule, x_T: torch.Tensor, name: str = "function"):
        if not isinstance(x_T, torch.Tensor) or x_T.dim() < 2 or not x_T.is_floating_point():
            raise ValueError("calibration x_T must be a floating-point tensor of shape [samples, ...]")
        self.model_fn = model_fn
        self.schedule = schedule
        self.x_T = x_T
        self.name = name

    def model(self, ids: np.ndarray) -> RawFn:
        return Unguided(self.model_fn)

    def describe(self) -> dict:
        x = self.x_T.double()
        return {"kind": "function", "name": self.name, "x_T_sum": float(x.sum()), "x_T_sq": float((x * x).sum())}


class EngineSource(Source):
    """An Engine with one prompt per calibration sample; x_T drawn from `seed` like Engine.sample."""

    def __init__(self, engine, prompts: list[str], *, guidance_scale: float | None = None, seed: int = 0):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("the calibration set must be a non-empty list of prompt strings")
        self.engine = engine
        self.prompts = prompts
        self.guidance_scale = engine.guidance_scale if guidance_scale is None else float(guidance_scale)
        self.seed = int(seed)
        self.schedule = engine.schedule
        self.x_T = engine.initial_noise(len(prompts), seed=self.seed)

    def model(self, ids: np.ndarray) -> RawFn:
        return GuidedOutput(self.engine.denoiser([self.prompts[i] for i in ids], guidance_scale=self.guidance_scale))

    def describe(self) -> dict:
        return {
            "kind": "engine",
            "name": self.engine.name,
            "prompts": self.prompts,
            "guidance_scale": self.guidance_scale,
            "seed": self.seed,
            "dtype": dtype_name(self.engine.dtype),
        }


def make_source(model_or_engine, calibration_set, *, seed: int = 0, schedule=None, guidance_scale=None) -> Source:
    """The calibration Source of an Engine (calibration_set: prompts, x_T from `seed`), a
    model_fn(x, t) with `schedule=` (calibration_set: the x_T tensor [samples, ...]), or a Source."""
    from ..engines.engine import Engine

    if isinstance(model_or_engine, Source):
        return model_or_engine
    if isinstance(model_or_engine, Engine):
        return EngineSource(model_or_engine, calibration_set, guidance_scale=guidance_scale, seed=seed)
    if callable(model_or_engine):
        if schedule is None:
            raise ValueError("calibrating a model function needs schedule= (its noise schedule)")
        return FunctionSource(model_or_engine, schedule, calibration_set)
    raise TypeError(f"expected an Engine, a model function or a calibration Source, got {type(model_or_engine)}")


@dataclass
class Trajectories:
    """latents[s, k] = teacher input at call k (k = 0..M-1), latents[s, M] = the teacher's result;
    outputs[s, k] = raw model output of call k. times[k] = model time of call k."""

    teacher: StepPlan
    times: np.ndarray
    latents: np.ndarray  # [S, M+1, D] float32 (maybe a memory map)
    outputs: np.ndarray  # [S, M, D] float32
    shape: tuple  # per-sample latent shape
    directory: Path | None = None

    @property
    def num_samples(self) -> int:
        return int(self.latents.shape[0])

    @property
    def num_teacher_steps(self) -> int:
        return int(self.times.size)


def parse_teacher(teacher, schedule: DiscreteSchedule) -> StepPlan:
    """'ddim:100', 'dpmpp_2m:500' or a StepPlan, checked against the model's schedule."""
    from .. import solvers

    if isinstance(teacher, StepPlan):
        plan = teacher
    else:
        name, _, steps = str(teacher).partition(":")
        if not steps.isdigit():
            raise ValueError(f"teacher {teacher!r}: expected 'solver:steps' such as 'ddim:100' or a StepPlan")
        plan = solvers.build_variant(name, schedule, int(steps))
    if plan.schedule_fingerprint is not None and plan.schedule_fingerprint != schedule.fingerprint:
        raise CalibrationError(
            f"teacher/student schedule mismatch: the teacher plan was made for schedule {plan.schedule_fingerprint}, "
            f"the model's schedule is {schedule.fingerprint}"
        )
    if plan.prediction_type != schedule.prediction_type:
        raise CalibrationError(
            f"teacher/student mismatch: the teacher plan expects {plan.prediction_type} outputs, the model "
            f"predicts {schedule.prediction_type}"
        )
    return plan


def differing_keys(old: dict, new: dict) -> str:
    """The keys whose values differ between two settings records, for a refusal's message."""
    return ", ".join(sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)))


def _open(directory: Path, meta: dict, shapes: dict) -> tuple[dict, np.ndarray]:
    directory.mkdir(parents=True, exist_ok=True)
    meta_path = directory / "meta.json"
    if meta_path.is_file():
        try:
            old = json.loads(meta_path.read_text())
            if not isinstance(old, dict):
                raise ValueError(f"a JSON {type(old).__name__}, not an object")
        except ValueError as exc:
            raise CalibrationError(f"{meta_path} is corrupt ({exc}): delete {directory} to start over") from exc
        if old != meta:
            raise CalibrationError(
                f"{directory} holds trajectories of another calibration (differs in {differing_keys(old, meta)}): "
                "use another directory or delete it"
            )
        mode = "r+"
    else:
        mode = "w+"
    arrays = {}
    for name, shape in shapes.items():
        try:
            arrays[name] = np.lib.format.open_memmap(
                directory / f"{name}.npy", mode=mode, dtype=np.float32, shape=shape
            )
        except (OSError, ValueError) as exc:
            raise CalibrationError(f"{directory / (name + '.npy')} is unreadable ({exc}): delete {directory}") from exc
        if arrays[name].shape != shape:
            raise CalibrationError(f"{directory / (name + '.npy')} has shape {arrays[name].shape}, expected {shape}")
    state_path = directory / "state.npy"
    num = meta["num_samples"]
    state = np.zeros((num, 33), dtype=np.uint8)
    if mode == "r+" and state_path.is_file():
        try:
            state = np.load(state_path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise CalibrationError(f"{state_path} is unreadable ({exc}): delete {directory} to start over") from exc
        if state.shape != (num, 33) or state.dtype != np.uint8 or not np.isin(state[:, 0], (0, 1)).all():
            raise CalibrationError(
                f"{state_path} holds {state.dtype} {state.shape}, expected uint8 ({num}, 33) with done flags 0/1: "
                f"delete {directory} to start over"
            )
        damaged = [int(i) for i in np.flatnonzero(state[:, 0]) if _digest(arrays, i) != state[i, 1:].tobytes()]
        if damaged:
            warnings.warn(
                f"{directory}: the stored trajectories of samples {damaged} do not match their SHA-256 (changed or "
                "damaged on disk): computing them again",
                RuntimeWarning,
                stacklevel=3,
            )
            state[damaged] = 0
    if mode == "w+":  # written last: a directory without it is started afresh
        atomic_write(meta_path, json.dumps(meta, indent=1))
    return arrays, state


def _digest(arrays: dict, i: int) -> bytes:
    """SHA-256 of sample i's rows (latents, then outputs)."""
    h = hashlib.sha256(np.ascontiguousarray(arrays["latents"][i]).tobytes())
    h.update(np.ascontiguousarray(arrays["outputs"][i]).tobytes())
    return h.digest()


def teacher_trajectories(
    source: Source,
    teacher: StepPlan | str = "ddim:100",
    *,
    directory: str | Path | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> Trajectories:
    """Run the teacher from every x_T in source and keep its latents and outputs (see module doc)."""
    plan = parse_teacher(teacher, source.schedule)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    num, m = source.num_samples, plan.num_calls
    shape = tuple(source.x_T.shape[1:])
    dim = int(np.prod(shape))
    shapes = {"latents": (num, m + 1, dim), "outputs": (num, m, dim)}
    folder = Path(directory) if directory is not None else None
    if folder is not None:
        meta = {
            "format": "fastdiff.trajectories",
            "version": 2,
            "teacher": plan.hash(),
            "schedule": source.schedule.fingerprint,
            "source": source.describe(),
            "num_samples": num,
            "shape": list(shape),
        }
        arrays, state = _open(folder, meta, shapes)
        plan.save(folder / "teacher.json")
    else:
        arrays = {name: np.zeros(s, dtype=np.float32) for name, s in shapes.items()}
        state = np.zeros((num, 33), dtype=np.uint8)
    todo = np.flatnonzero(state[:, 0] == 0)
    program = compile_program(plan)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=num,
        initial=num - todo.size,
        desc=f"teacher {plan.metadata.get('solver', 'plan')}-{m}",
        disable=not progress,
        unit="sample",
    )
    for start in range(0, todo.size, batch_size):
        ids = todo[start : start + batch_size]
        raw_fn = source.model(ids)
        x_T = source.x_T[torch.as_tensor(ids)]
        lat = np.empty((ids.size, m + 1, dim), dtype=np.float32)
        out = np.empty((ids.size, m, dim), dtype=np.float32)
        lat[:, 0] = x_T.reshape(ids.size, -1).float().cpu().numpy()

        calls = [0]

        def record(x, t, index):
            result = raw_fn(x, t, index)
            k = calls[0]
            flat = result.reshape(ids.size, -1).float().cpu()
            if not bool(torch.isfinite(flat).all()):
                raise CalibrationError(
                    f"NaN/inf in the teacher's model output at call {k} (t={plan.times[k]:g}) for samples "
                    f"{ids.tolist()}: the model overflows (float16?) or is broken"
                )
            out[:, k] = flat.numpy()
            calls[0] += 1
            return result

        def keep(k, t, x):
            lat[:, k + 1] = x.reshape(ids.size, -1).float().cpu().numpy()

        reference.run(program, record, x_T, callback=keep)
        arrays["latents"][ids] = lat
        arrays["outputs"][ids] = out
        if folder is not None:
            for array in arrays.values():
                array.flush()
            for i in ids:
                state[i, 0], state[i, 1:] = 1, np.frombuffer(_digest(arrays, i), dtype=np.uint8)
            atomic_write(folder / "state.npy", lambda f: np.save(f, state))  # a kill leaves the old or the new
        bar.update(ids.size)
    bar.close()
    return Trajectories(plan, np.array(plan.times), arrays["latents"], arrays["outputs"], shape, folder)
