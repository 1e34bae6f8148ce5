"""The benchmark suite and its report run end to end on a tiny selection."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _report(*args: str) -> subprocess.CompletedProcess:
    """Run bench/report.py with these arguments."""
    return subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), *args], capture_output=True, text=True)


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

    report = _report(str(out), "--out", str(tmp_path / "results"))
    assert report.returncode == 0, report.stderr
    table = (tmp_path / "results" / "solver_quality.md").read_text()
    assert "| ddim |" in table and "| dpmpp_2m |" in table
    assert (tmp_path / "results" / "solver_quality.png").read_bytes().startswith(b"\x89PNG")


def test_report_refuses_a_missing_file(tmp_path):
    result = _report(str(tmp_path / "none.json"))
    assert result.returncode == 2 and "no such benchmark JSON" in result.stderr


def test_olss_quality_report_renders_a_table_per_study_and_a_plot(tmp_path):
    def bench(study, label, steps, nfe, error):
        info = {"study": study, "label": label, "steps": steps, "nfe": nfe, "rel_error": error}
        stats = {"mean": 0.01, "stddev": 0.0, "min": 0.01, "max": 0.01, "rounds": 1}
        return {"name": f"x[{label}-{steps}]", "group": f"olss-quality-{study}", "extra_info": info, "stats": stats}

    doc = {
        "machine_info": {"cpu": {"brand_raw": "test CPU"}, "python_version": "3"},
        "benchmarks": [
            bench("gmm", "teacher", 3, 1000, 1.2e-3),
            bench("gmm", "dpmpp_2m", 3, 3, 0.25),
            bench("gmm", "dpmpp_2m", 5, 5, 0.15),
            bench("gmm", "olss_uniform_closed", 5, 5, 0.018),
            bench("digits", "ddim", 5, 5, 0.2),
        ],
    }
    path = tmp_path / "olss.json"
    path.write_text(json.dumps(doc))
    report = _report(str(path), "--out", str(tmp_path / "r"))
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "r" / "olss_quality.md").read_text()
    assert "## gmm" in text and "## digits" in text and "## tiny-shapes" not in text
    assert "| dpmpp_2m | 2.50e-01 | 1.50e-01 |" in text
    assert "| olss_uniform_closed | — | 1.80e-02 |" in text
    assert "| teacher (1000 calls) | 1.20e-03 |" in text
    assert (tmp_path / "r" / "olss_quality.png").read_bytes().startswith(b"\x89PNG")


def test_parity_backends_and_runtime_reports_name_the_commit(tmp_path):
    def bench(group, extra, median=0.01):
        stats = {"mean": median, "median": median, "stddev": 0.0, "min": median, "max": median, "rounds": 1}
        return {"name": f"x[{group}-{len(extra)}]", "group": group, "extra_info": extra, "stats": stats}

    case = {"solver": "ddim", "options": {}, "float64_reference": False, "times_equal": True, "input_error": 2e-7}
    doc = {
        "machine_info": {"cpu": {"brand_raw": "test CPU"}, "python_version": "3"},
        "commit_info": {"id": "0123456789abcdef", "dirty": False},
        "benchmarks": [
            bench("solver-parity", {**case, "result_error": 1e-7}),
            bench("solver-parity", {**case, "result_error": 3e-7}),
            bench("cpu-backends-unet-step", {"backend": "eager", "first_call_s": 0.1}, 0.024),
            bench("cpu-backends-unet-step", {"backend": "compiled", "first_call_s": 38.0}, 0.012),
        ],
    }
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(doc))
    report = _report(str(path), "--out", str(tmp_path / "results"))
    assert report.returncode == 0, report.stderr
    parity = (tmp_path / "results" / "parity.md").read_text()
    assert "| ddim {} | 2 | 2.0e-07 | 3.0e-07 | 2.0e-07 | True |" in parity and "commit 0123456 (clean tree)" in parity
    backends = (tmp_path / "results" / "backends.md").read_text()
    assert "| one guided UNet call (batch 2 x CFG) | 24.0 ms | 12.0 ms | 2.00x | 38 s |" in backends
