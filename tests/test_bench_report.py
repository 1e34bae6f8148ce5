"""The benchmark suite and its report run end to end on a tiny selection."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _report(*args: str) -> subprocess.CompletedProcess:
    """Run bench/report.py with these arguments."""
    return subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), *args], capture_output=True, text=True)


def _render(tmp_path, doc: dict) -> Path:
    """bench/report.py on `doc` written as a pytest-benchmark JSON; the results folder."""
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(doc))
    report = _report(str(path), "--out", str(tmp_path / "results"))
    assert report.returncode == 0, report.stderr
    return tmp_path / "results"


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


def test_search_quality_report_renders_errors_images_cost_and_the_predictor(tmp_path):
    def bench(study, label, nfe, error, group="search-quality", **extra):
        info = {"study": study, "label": label, "steps": nfe, "nfe": nfe, "rel_error": error, **extra}
        stats = {"mean": 0.01, "stddev": 0.0, "min": 0.01, "max": 0.01, "rounds": 1}
        return {"name": f"x[{label}-{nfe}]", "group": f"{group}-{study}", "extra_info": info, "stats": stats}

    search = {"search_calls": 96000, "search_seconds": 125.0, "proxy_error": 0.0466, "rank_correlation": 0.88}
    run = {"seed": 0, "plain_error": 0.05, "predictor_error": 0.04, "plain_calls": 1000, "held_out_plain": 0.06}
    run.update(predictor_calls_to_match=400, saved=0.6, rank_correlation=0.85, held_out_predictor=0.05)
    predictor = {"name": "p", "group": "search-predictor", "extra_info": {"study": "digits", "runs": [run]}}
    predictor["stats"] = {"mean": 1.0, "stddev": 0.0, "min": 1.0, "max": 1.0, "rounds": 1}
    doc = {
        "machine_info": {"cpu": {"brand_raw": "test CPU"}, "python_version": "3"},
        "benchmarks": [
            bench("digits", "dpmpp_2m", 5, 0.0876, fd=3.25, accuracy=0.9),
            bench("digits", "usf_shipped", 5, 0.0458, fd=1.5, accuracy=0.95, chosen="olss", **search),
            bench("digits", "dpmpp_2m", 20, 0.0205, fd=1.0, accuracy=0.97),
            predictor,
        ],
    }
    out = _render(tmp_path, doc)
    text = (out / "search_quality.md").read_text()
    assert "## digits" in text and "## gmm" not in text
    assert "| usf_shipped | 4.58e-02 | — |" in text and "| dpmpp_2m | 8.76e-02 | 2.05e-02 |" in text
    assert "| usf_shipped | 1.50 | — |" in text  # the FD table
    assert "| digits | 5 | 96,000 | 125 s | 0.0466 | OLSS refit | 0.0458 | 0.88 |" in text
    assert "| digits | 0 | 0.05 (0.06) | 0.04 (0.05) | 1,000 | 400 | 60% | 0.85 |" in text
    assert (out / "search_quality.png").read_bytes().startswith(b"\x89PNG")


def test_distill_report_renders_the_frontier_and_the_targets(tmp_path):
    def bench(method, evals, w, fd, accuracy=1.0):
        info = {"method": method, "unet_evaluations": evals, "w": w, "fd": fd, "accuracy": accuracy}
        info.update(seconds_per_image=0.002 * evals, samples=1000)
        stats = {"mean": 1.0, "stddev": 0.0, "min": 1.0, "max": 1.0, "rounds": 1}
        return {"name": f"d[{method}-{evals}-{w}]", "group": "distill-quality", "extra_info": info, "stats": stats}

    rows = [bench("teacher+ddim", 128, 2.0, 40.0), bench("teacher+olss", 4, 2.0, 59.0), bench("guided", 64, 2.0, 41.0)]
    rows += [bench("steps-4", 4, 2.0, 43.0), bench("steps-1", 1, 2.0, 70.0), bench("steps-1 stochastic", 2, 2.0, 50.0)]
    rows += [bench("steps-2", 2, 2.0, 55.0), bench("teacher+dpmpp_2m", 4, 2.0, 280.0, 0.5)]
    rows += [bench("teacher+ddim", 128, 3.0, 60.0), bench("steps-4", 4, 3.0, 70.0), bench("teacher+olss", 4, 3.0, 50.0)]
    rows += [bench("steps-2", 2, 3.0, 80.0)]
    doc = {"machine_info": {"cpu": {"brand_raw": "test CPU"}, "python_version": "3"}, "benchmarks": rows}
    out = _render(tmp_path, doc)
    text = (out / "distill_quality.md").read_text()
    assert "| teacher+ddim | 128 | 40.0 (1.000) | 60.0 (1.000) | 256.0 ms |" in text
    assert "| steps-1 stochastic | 2 | 50.0 (1.000) | — | 4.0 ms |" in text
    assert "- w=2: 4-step student FD 43.0 = 1.07x the teacher's 40.0 (met)" in text
    best = "- w=2: best student at 2 evaluations (steps-1 stochastic) FD 50.0 vs OLSS-2 with CFG (4 evaluations) 59.0"
    assert best + " (met)" in text
    assert "- w=3: 4-step student FD 70.0 = 1.17x the teacher's 60.0 (missed)" in text
    assert "(steps-2) FD 80.0 vs OLSS-2 with CFG (4 evaluations) 50.0 (missed)" in text
    assert (out / "distill_quality.png").read_bytes().startswith(b"\x89PNG")


def test_serving_report_puts_batching_against_the_same_replicas_unbatched(tmp_path):
    def bench(batching, replicas, rate, group="serving-load"):
        info = {"batching": batching, "replicas": replicas, "images_per_s": rate, "p50_ms": 500.0, "p99_ms": 900.0}
        info.update(errors=0, mean_batch_images=6.0 if batching else 1.0, clients=16, requests=96, steps=8)
        stats = {"mean": 1.0, "stddev": 0.0, "min": 1.0, "max": 1.0, "rounds": 1}
        return {"name": f"s[{batching}-{replicas}]", "group": group, "extra_info": info, "stats": stats}

    rows = [bench(True, 1, 27.0), bench(False, 1, 6.0), bench(True, 2, 30.0), bench(False, 2, 12.0)]
    doc = {"machine_info": {"cpu": {"brand_raw": "test CPU"}, "python_version": "3"}, "benchmarks": rows}
    text = (_render(tmp_path, doc) / "serving.md").read_text()
    assert "| on | 1 | 27.0 | 4.50x | 500 ms | 900 ms | 6.0 | 0 |" in text
    assert "| off | 2 | 12.0 | 1.00x |" in text and "| on | 2 | 30.0 | 2.50x |" in text
    assert "16 concurrent HTTP clients" in text


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
    _render(tmp_path, doc)
    parity = (tmp_path / "results" / "parity.md").read_text()
    assert "| ddim {} | 2 | 2.0e-07 | 3.0e-07 | 2.0e-07 | True |" in parity and "commit 0123456 (clean tree)" in parity
    backends = (tmp_path / "results" / "backends.md").read_text()
    assert "| one guided UNet call (batch 2 x CFG) | 24.0 ms | 12.0 ms | 2.00x | 38 s |" in backends


def test_service_report_renders_a_row_per_thread_count_and_names_the_commit(tmp_path):
    def bench(threads, rates, intra_op):
        info = {
            "threads": threads,
            "intra_op_threads": intra_op,
            "requests": 32,
            "guidance_scale": 1.5,
            "unet_calls_per_request": 8.0,
            "images_per_s": sorted(rates)[1],
            "images_per_s_rounds": rates,
            "mean_latency_ms": 41.2,
            "max_latency_ms": 64.0,
            "load_s": 0.012,
            "cores": 2,
        }
        stats = {"mean": 1.5, "median": 1.5, "stddev": 0.0, "min": 1.5, "max": 1.5, "rounds": 3}
        return {
            "name": f"test_service_throughput[T{threads}]",
            "group": "service-cpu",
            "extra_info": info,
            "stats": stats,
        }

    doc = {
        "machine_info": {"cpu": {"brand_raw": "test CPU"}, "python_version": "3"},
        "commit_info": {"id": "fedcba9876543210", "dirty": False},
        "benchmarks": [bench(8, [52.7, 55.4, 52.6], 1), bench(1, [24.8, 24.6, 23.8], 2)],
    }
    _render(tmp_path, doc)
    text = (tmp_path / "results" / "service.md").read_text()
    assert "32 requests of one image each, 8 UNet calls per request" in text and "commit fedcba9 (clean tree)" in text
    rows = [line for line in text.splitlines() if line.startswith("| 1 |") or line.startswith("| 8 |")]
    assert rows == [
        "| 1 | 2 | 24.6 (24.8, 24.6, 23.8) | 41 ms | 64 ms | 0.01 s |",
        "| 8 | 1 | 52.7 (52.7, 55.4, 52.6) | 41 ms | 64 ms | 0.01 s |",
    ]
