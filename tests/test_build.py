"""Packaging rules: setup.py never imports torch; the pure-Python package works without _C."""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_setup_py_does_not_import_torch():
    tree = ast.parse((ROOT / "setup.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "torch" not in imported


def test_build_requirements_do_not_pull_torch():
    text = (ROOT / "pyproject.toml").read_text()
    requires = text.split("requires = [", 1)[1].split("]", 1)[0]
    assert "torch" not in requires


def test_package_works_without_the_extension():
    script = """
import sys
sys.modules["fastdiff._C"] = None  # as if the extension were never built
import torch
from fastdiff import solvers
from fastdiff.info import features
from fastdiff.loops import reference
from fastdiff.program import compile
from fastdiff.schedules import PRESETS, DiscreteSchedule
plan = solvers.build("dpmpp_2m", DiscreteSchedule.from_config(PRESETS["sd15"]), 5)
out = reference.run(compile(plan), lambda x, t, i: torch.zeros_like(x), torch.ones(2, 4)).latents
ext = [f for f in features() if f.name.startswith("C++ extension")][0]
assert not ext.available and "import failed" in ext.detail, ext
loop = [f for f in features() if f.name == "loop cpp"][0]
assert not loop.available and "fastdiff._C is not built" in loop.detail, loop
print("ok", out.shape)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def test_info_reports_nvcc(tmp_path):
    from fastdiff.info import _nvcc

    missing = _nvcc(which=lambda name: None)
    assert not missing.available and "not on PATH" in missing.detail
    fake = tmp_path / "nvcc"
    fake.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    fake.chmod(0o755)
    found = _nvcc(which=lambda name: str(fake))
    assert found.available and "CUDA 12.4" in found.detail and ">= 12.3" in found.detail, found
    fake.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.2, V12.2.140'\n")
    old = _nvcc(which=lambda name: str(fake))
    assert not old.available and "CUDA 12.2" in old.detail and "needs CUDA >= 12.3" in old.detail, old
    fake.write_text("#!/bin/sh\necho nonsense\n")
    broken = _nvcc(which=lambda name: str(fake))
    assert not broken.available and "no release number" in broken.detail


def test_cuda_minimum_is_the_same_everywhere():
    """The CUDA runner example's minimum CUDA: its compat header, CMake and `fastdiff info` agree."""
    from fastdiff.info import CUDA_RUNNER_MIN

    header = (ROOT / "csrc/examples/cuda_runner/cuda_compat.h").read_text()
    cmake = (ROOT / "CMakeLists.txt").read_text()
    in_header = int(re.search(r"#define FASTDIFF_CUDA_MIN_VERSION (\d+)", header).group(1))
    in_cmake = re.search(r"set\(FASTDIFF_CUDA_MIN_VERSION (\d+)\.(\d+)\)", cmake).groups()
    assert in_header == CUDA_RUNNER_MIN[0] * 1000 + CUDA_RUNNER_MIN[1] * 10
    assert tuple(int(part) for part in in_cmake) == CUDA_RUNNER_MIN
