"""The benchmark suite and its report run end to end on a tiny selection."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_writes_json_and_report_renders_it(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(ROOT / "bench" / "test_solver_quality.py"),
        "-q",
        "-k",
        "N3 and (ddim or dpmpp_2m) and not karras",
        "-p",
        "no:cacheprovider",
        f"--benchmark-json={out}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(out.read_text())
    infos = {b["extra_info"]["label"]: b["extra_info"] for b in doc["benchmarks"]}
    assert set(infos) == {"ddim", "dpmpp_2m"}
    assert all(0 < info["rel_error"] < 1 and info["nfe"] == 3 for info in infos.values())

    report = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "report.py"), str(out), "--out", str(tmp_path / "results")],
        capture_output=True,
        text=True,
    )
    assert report.returncode == 0, report.stderr
    table = (tmp_path / "results" / "solver_quality.md").read_text()
    assert "| ddim |" in table and "| dpmpp_2m |" in table
    assert (tmp_path / "results" / "solver_quality.png").read_bytes().startswith(b"\x89PNG")


def test_report_refuses_a_missing_file(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "report.py"), str(tmp_path / "none.json")], capture_output=True, text=True
    )
    assert result.returncode == 2 and "no such benchmark JSON" in result.stderr
