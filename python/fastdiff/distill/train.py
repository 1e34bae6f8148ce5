"""A resumable training run in a directory: the one home of what every distillation round shares.

    DIR/settings.json    what the run is (teacher, stage, hyper-parameters): a resume with other
                         settings is refused, naming the keys that differ
    DIR/checkpoint.pt    student, EMA, optimizer and random-generator state at a step, written
                         atomically (a temporary file, then os.replace): a kill at any point leaves
                         the previous complete checkpoint
    DIR/log.jsonl        the loss, learning rate and time of every logged step
    DIR/done.json        written last, when the round finished

A run resumed from its checkpoint continues with the same random draws, so it ends with the
same weights as an uninterrupted run with the same seed (tested). A loss that is not finite
stops the run with the round and the step; the last checkpoint is kept.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from ..calibration.trajectories import differing_keys
from ..files import atomic_write
from ..models.training.common import EMA, cosine_lr


class DistillError(ValueError):
    """A distillation run that cannot start or continue (other settings, a non-finite loss, a
    teacher that cannot be distilled); the CLI reports it as a clear error."""


class TrainingRun:
    """One round of training in `directory` (see the module doc). settings: JSON-able values.
    Use: `start = run.resume(student, optimizer, generator)`, then per step `run.step(...)`."""

    def __init__(self, directory, settings: dict, *, name: str):
        self.directory = Path(directory)
        self.settings = json.loads(json.dumps(settings))  # as stored
        self.name = name
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / "settings.json"
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except ValueError as exc:
                raise DistillError(f"{path} is corrupt ({exc}); delete the directory to start over") from exc
            if old != self.settings:
                raise DistillError(
                    f"{self.directory} holds a {name} run with other settings ({differing_keys(old, self.settings)} "
                    f"differ): resume with the same settings or use another directory"
                )
        else:
            atomic_write(path, json.dumps(self.settings, indent=1, sort_keys=True) + "\n")
        self.ema: EMA | None = None

    @property
    def done(self) -> bool:
        return (self.directory / "done.json").is_file()

    def resume(self, student: torch.nn.Module, optimizer, generator: torch.Generator, ema_decay: float) -> int:
        """Load the checkpoint into student/optimizer/generator if there is one; returns the step to
        continue from (0 for a new run). Keeps an EMA of the student's weights."""
        self.ema = EMA(student, ema_decay)
        path = self.directory / "checkpoint.pt"
        if not path.is_file():
            return 0
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            student.load_state_dict(state["student"])
            optimizer.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"])
            self.ema.shadow = {k: v.to(self.ema.shadow[k].device) for k, v in state["ema"].items()}
        except Exception as exc:  # torch raises several types for a damaged file
            raise DistillError(f"{path} cannot be loaded ({exc}); delete it to restart the {self.name} round") from exc
        step = int(state["step"])
        self._trim_log(step)
        return step

    def _trim_log(self, step: int) -> None:
        """Keep the log's records up to the checkpoint's step: the steps after it run again on
        resume (and log again), and a line cut by a kill is dropped."""
        path = self.directory / "log.jsonl"
        if not path.is_file():
            return
        kept = [
            r for r in self.losses() if isinstance(r, dict) and isinstance(r.get("step"), int) and r["step"] <= step
        ]
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))  # as log() writes them

    def last_loss(self) -> float:
        """The last logged loss (NaN when none): a run resumed at its end reports what it ended with."""
        losses = self.losses()
        return float(losses[-1]["loss"]) if losses else math.nan

    def checkpoint(self, step: int, student: torch.nn.Module, optimizer, generator: torch.Generator) -> None:
        state = {
            "step": step,
            "student": student.state_dict(),
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
            "ema": self.ema.shadow,
        }
        atomic_write(self.directory / "checkpoint.pt", lambda f: torch.save(state, f))

    def log(self, record: dict) -> None:
        with open(self.directory / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def finish(self, info: dict) -> None:
        atomic_write(self.directory / "done.json", json.dumps(info, indent=1) + "\n")

    def losses(self) -> list[dict]:
        path = self.directory / "log.jsonl"
        if not path.is_file():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a kill (resume drops it)
        return out


def train_loop(
    run: TrainingRun,
    student: torch.nn.Module,
    loss_fn,
    *,
    steps: int,
    lr: float,
    seed: int,
    ema_decay: float = 0.999,
    checkpoint_every: int = 100,
    log_every: int = 10,
    stop_after: int | None = None,
    progress: bool = True,
    desc: str = "distill",
) -> dict:
    """AdamW with warm-up and cosine decay; loss_fn(step, generator) -> the batch loss. Resumes from
    the run's checkpoint; checkpoints every `checkpoint_every` steps and at the end; the EMA
    weights are copied into the student at the end. stop_after: stop (checkpointed) after this
    step, as a kill would (tests). Returns {"loss": last logged loss, "seconds": ...}."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    start = run.resume(student, optimizer, generator, ema_decay)
    warmup = min(100, max(1, steps // 10))
    bar = tqdm(total=steps, initial=start, desc=desc, unit="step", disable=not progress)
    started = time.perf_counter()
    last = run.last_loss() if start else math.nan
    try:
        for step in range(start, steps):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, steps, lr, warmup=warmup)
            student.train()
            loss = loss_fn(step, generator)
            value = float(loss.detach())
            if not math.isfinite(value):
                kept = run.directory / "checkpoint.pt"
                raise DistillError(
                    f"{run.name}: the loss is {value} at step {step + 1} of {steps}; stopped. "
                    + (f"The last checkpoint is kept: {kept}" if kept.is_file() else "No checkpoint was written yet")
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            run.ema.decay = min(ema_decay, (1 + step) / (10 + step))  # warm-up: short runs are not the initial weights
            run.ema.update(student)
            last = value
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4g}")
            if (step + 1) % log_every == 0 or step + 1 == steps:
                run.log({"step": step + 1, "loss": value, "lr": optimizer.param_groups[0]["lr"]})
            if (step + 1) % checkpoint_every == 0 or step + 1 == steps or step + 1 == stop_after:
                run.checkpoint(step + 1, student, optimizer, generator)
            if stop_after is not None and step + 1 >= stop_after and step + 1 < steps:
                return {"loss": last, "seconds": time.perf_counter() - started, "stopped": step + 1}
    finally:
        bar.close()
    run.ema.copy_to(student)
    student.eval()
    return {"loss": last, "seconds": time.perf_counter() - started}
