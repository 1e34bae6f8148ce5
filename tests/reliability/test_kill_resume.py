"""Interrupted work resumes identically (issue 23, part 3): OLSS calibration, the solver search
and guided distillation (stage 1), each run by the CLI in its own process, are
killed with SIGKILL at seeded random moments, then run again with the same command until they
finish: the result must equal an uninterrupted run's, byte for byte where the files carry no
time, and after every kill whatever the job has written must read as complete or be absent
(atomic writes: `fastdiff.files`).

The kill moments are drawn between 15% and 50% (the first) or 80% (the others) of the
uninterrupted run's wall time (the first seconds of each process import torch); a run that
finishes before its first kill (the machine got faster) starts over, aimed by its own time.
FASTDIFF_RELIABILITY_KILLS sets the kills per job (default 3). Each job runs 3-5 times (minutes
in all), so this runs in the full suite only (FASTDIFF_RELIABILITY_FULL=1: `make
test-reliability`, which CI runs after `make test`). The progressive rounds share stage 1's
TrainingRun (checkpoints, log, staged student directory) but are not killed here.
Counted by tests/reliability/counts.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.reliability.counts import record

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("FASTDIFF_RELIABILITY_FULL") != "1",
        reason="kill/resume runs each job 3-5 times (minutes): the full suite runs it (make test-reliability)",
    ),
]

ROOT = Path(__file__).resolve().parents[2]
KILLS = int(os.environ.get("FASTDIFF_RELIABILITY_KILLS", "3"))
TIMEOUT = 600


def _calibrate(d: Path) -> list[str]:
    return [
        "calibrate", "--model", "digits", "--steps", "3", "--samples", "24", "--teacher", "ddim:16",
        "--batch-size", "4", "--trajectories", str(d / "traj"), "--out", str(d / "plan.json"),
    ]  # fmt: skip


def _search(d: Path) -> list[str]:
    return [
        "search", "--model", "digits", "--nfe", "3", "--budget", "16", "--samples", "8", "--teacher",
        "dpmpp_2m:16", "--workers", "1", "--checkpoint", str(d / "search.jsonl"), "--trajectories",
        str(d / "traj"), "--out", str(d / "plan.json"),
    ]  # fmt: skip


def _guided(d: Path) -> list[str]:
    return [
        "distill", "--model", "digits", "--stage", "guided", "--out", str(d / "student"), "--train-steps", "24",
        "--batch", "8", "--checkpoint-every", "4",
    ]  # fmt: skip


JOBS = {"calibrate": _calibrate, "search": _search, "distill-guided": _guided}


def _run(args: list[str], kill_after: float | None) -> tuple[str, subprocess.CompletedProcess | None]:
    """("finished", proc) or ("killed", None); a run past TIMEOUT is a hang."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastdiff.cli", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the kill takes its workers too
    )
    try:
        out, err = proc.communicate(timeout=kill_after if kill_after is not None else TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        if kill_after is None:
            return "hang", None
        return "killed", None
    return "finished", subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _digest(d: Path, job: str) -> dict[str, str]:
    """What the job produced, by file: sha256 of each result file (the run's own bookkeeping
    under run/, the trajectories and the checkpoint excluded: they are the means, not the result)."""
    if job.startswith("distill"):
        files = [p for p in (d / "student").rglob("*") if p.is_file() and "run" not in p.relative_to(d).parts]
    else:
        files = [d / "plan.json"]
    out = {}
    for p in sorted(files):
        data = p.read_bytes()
        if p.name == "plan.json":  # the plan records its command (paths differ) and wall times: the rest
            data = json.dumps(_without(json.loads(data)), sort_keys=True).encode()
        out[str(p.relative_to(d))] = hashlib.sha256(data).hexdigest()
    return out


def _without(doc):
    """doc without the command line and the wall times ("seconds", "wall_seconds", ...)."""
    if isinstance(doc, dict):
        return {k: _without(v) for k, v in doc.items() if k != "command" and not k.endswith("seconds")}
    if isinstance(doc, list):
        return [_without(v) for v in doc]
    return doc


def _check_complete(d: Path, job: str) -> list[str]:
    """What a reader would find half-written after a kill (nothing, when writes are atomic)."""
    from fastdiff.plan import StepPlan

    problems = []
    plan = d / "plan.json"
    if plan.exists():
        try:
            StepPlan.load(plan)
        except Exception as exc:  # noqa: BLE001 - any failure is the finding
            problems.append(f"plan.json: {exc}")
    traj = d / "traj"
    if (traj / "meta.json").exists():
        try:
            json.loads((traj / "meta.json").read_text())
            if (traj / "state.npy").exists():
                import numpy as np

                np.load(traj / "state.npy")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"trajectories: {exc}")
    ckpt = d / "search.jsonl"
    if ckpt.exists() and ckpt.stat().st_size:
        try:
            json.loads(ckpt.read_text().splitlines()[0])
        except Exception as exc:  # noqa: BLE001
            problems.append(f"search checkpoint header: {exc}")
    student = d / "student"
    for f in ("run/settings.json", "run/done.json"):
        if (student / f).exists():
            try:
                json.loads((student / f).read_text())
            except Exception as exc:  # noqa: BLE001
                problems.append(f"{f}: {exc}")
    if (student / "run" / "checkpoint.pt").exists():
        import torch

        try:
            torch.load(student / "run" / "checkpoint.pt", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"checkpoint.pt: {exc}")
    if (student / "fastdiff.json").exists():  # written last: the directory must load whole
        from fastdiff.distill.student import load_student

        try:
            load_student(student)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"student directory: {exc}")
    return problems


@pytest.mark.parametrize("job", list(JOBS))
def test_a_killed_job_resumes_to_the_uninterrupted_result(job, tmp_path):
    make_args = JOBS[job]
    whole = tmp_path / "whole"
    start = time.perf_counter()
    status, proc = _run(make_args(whole), None)
    wall = time.perf_counter() - start
    assert status == "finished" and proc.returncode == 0, proc.stderr[-2000:] if proc else status
    want = _digest(whole, job)

    rng = random.Random(f"23-{job}")
    part = tmp_path / "killed"
    kills, half_written, attempts = 0, [], 0
    while kills < KILLS and attempts < KILLS + 4:
        attempts += 1
        # the first kill in the first half; a resumed run has less to do
        started = time.perf_counter()
        status, proc = _run(make_args(part), rng.uniform(0.15, 0.5 if not kills else 0.8) * wall)
        if status == "finished":
            assert proc.returncode == 0, proc.stderr[-2000:]
            if kills:
                break  # resumed far enough to finish before the kill
            # done before the first kill (the machine is faster than when `wall` was measured):
            # start over, aiming by this run's time
            wall = min(wall, time.perf_counter() - started)
            shutil.rmtree(part)
            continue
        kills += 1
        half_written += _check_complete(part, job)
    status, proc = _run(make_args(part), None)
    assert status != "hang", f"{job}: the resumed run did not finish in {TIMEOUT} s"
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = _digest(part, job)
    same = got == want
    record(
        "kill_resume",
        "kill -9 during calibration, search, distillation; then resume",
        cases=kills,
        crashes=int(proc.returncode != 0),
        silent_loads=len(half_written),
        hangs=int(status == "hang"),
        identical=kills if same else 0,
    )
    assert not half_written, half_written
    assert kills >= 1, f"{job}: no kill landed before the job finished ({wall:.1f} s uninterrupted)"
    assert same, {k: (want.get(k), got.get(k)) for k in set(want) | set(got) if want.get(k) != got.get(k)}
