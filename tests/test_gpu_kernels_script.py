"""bench/gpu_kernels.py runs end to end on a tiny setting (interpreted Triton on the CPU) and
writes the JSON the GPU run will write; without a usable device it says why."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastdiff.ops import triton_step

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_kernels.py"


def run_script(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.skipif(not triton_step.available(), reason=str(triton_step.why_unavailable()))
def test_tiny_run_writes_json(tmp_path):
    out = tmp_path / "k.json"
    done = run_script(
        "--device", "cpu", "--tiny", "--dtypes", "float32", "--out", str(out), env_extra={"TRITON_INTERPRET": "1"}
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text())
    assert doc["interpreted"] is True and len(doc["results"]) == 2
    row = doc["results"][0]
    assert row["bytes"] > 0 and row["fused_s"] > 0 and row["reference_s"] > 0 and row["copy_s"] > 0
    assert row["launches_fused"] is None  # the profiler cannot count launches of the interpreter


def test_cpu_without_the_interpreter_is_refused(tmp_path):
    done = run_script(
        "--device", "cpu", "--tiny", "--out", str(tmp_path / "k.json"), env_extra={"TRITON_INTERPRET": "0"}
    )
    assert done.returncode == 2 and "TRITON_INTERPRET=1" in done.stderr
