"""bench/check.py, the benchmark regression check: a run within tolerance of its baseline
passes, a regressed quantity fails naming the benchmark, the quantity and both values, a
machine class without a baseline says how to record one, and the committed baselines hold
exactly the benchmarks marked `check`."""

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_check_module():
    spec = importlib.util.spec_from_file_location("bench_check", ROOT / "bench" / "check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


check = _load_check_module()

RUNTIME = "bench/test_runtime_cpu.py::test_loop_overhead"
GATE = "bench/test_gate_quality.py::test_gate_calls_saved_vs_fidelity[dpmpp_2m-N20-d0.05-sample]"
SOLVER = "bench/test_solver_quality.py::test_gmm_solver_error[dpmpp_2m-N10]"


def bench(fullname, group, extra, seconds=0.01):
    stats = {"min": seconds, "max": seconds, "mean": seconds, "median": seconds, "stddev": 0.0, "rounds": 5}
    return {"fullname": fullname, "name": fullname.split("::")[1], "group": group, "extra_info": extra, "stats": stats}


def run_doc(cpp_seconds=0.001, psnr=24.8, rel_error=0.012, nfe=10):
    latent = "tiny-shapes 4x8x8"
    return {
        "machine_info": {"machine_class": "cpu-2core-test"},
        "commit_info": {"id": "0123456789abcdef", "dirty": False},
        "benchmarks": [
            bench(
                f"{RUNTIME}[python-{latent}]", "runtime-loop-overhead", {"runtime": "python", "latent": latent}, 0.004
            ),
            bench(
                f"{RUNTIME}[cpp-callback-{latent}]",
                "runtime-loop-overhead",
                {"runtime": "cpp-callback", "latent": latent},
                cpp_seconds,
            ),
            bench(GATE, "gate-quality", {"mean_calls": 8.37, "call_reduction": 2.39, "psnr": psnr, "adherence": 0.97}),
            bench(SOLVER, "gmm-solver-quality", {"nfe": nfe, "rel_error": rel_error, "label": "dpmpp_2m"}),
        ],
    }


def cli(*args, env=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "check.py"), *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )


def write(path: Path, doc: dict) -> Path:
    path.write_text(json.dumps(doc))
    return path


def test_a_run_within_tolerance_passes_and_prints_every_quantity(tmp_path):
    baseline = write(tmp_path / "baseline.json", run_doc())
    now = write(tmp_path / "now.json", run_doc(cpp_seconds=0.0011, psnr=24.6, rel_error=0.01205))
    result = cli("compare", now, "--baseline", baseline)
    assert result.returncode == 0, result.stdout + result.stderr
    for quantity in ("speedup_vs_python", "psnr", "mean_calls", "call_reduction", "adherence", "rel_error", "nfe"):
        assert f"  {quantity}  " in result.stdout
    assert "FAIL" not in result.stdout and "quantities within tolerance" in result.stdout


def test_a_regressed_quantity_fails_naming_the_benchmark_and_both_values(tmp_path):
    baseline = write(tmp_path / "baseline.json", run_doc())
    now = write(tmp_path / "now.json", run_doc(psnr=22.0))
    result = cli("compare", now, "--baseline", baseline)
    assert result.returncode == 1
    assert "test_gate_quality.py::test_gate_calls_saved_vs_fidelity[dpmpp_2m-N20-d0.05-sample] psnr" in result.stderr
    assert "baseline 24.8, now 22" in result.stderr
    assert "1 regression(s)" in result.stderr


def test_the_side_by_side_speedup_is_checked_not_the_raw_time(tmp_path):
    # both runtimes 3x slower (a busy machine): the speed-up holds; only the C++ loop slower: it fails
    base = run_doc()
    busy = copy.deepcopy(base)
    for b in busy["benchmarks"]:
        b["stats"]["min"] *= 3
    rows = check.compare(base, busy)
    assert not [r for r in rows if r.failed]
    rows = check.compare(base, run_doc(cpp_seconds=0.002))
    assert [(r.benchmark.split("[")[1], r.quantity) for r in rows if r.failed] == [
        ("cpp-callback-tiny-shapes 4x8x8]", "speedup_vs_python")
    ]


def test_time_relative_to_the_yardstick_fails_at_2x_but_not_when_both_slow_down(tmp_path):
    """relative_time (the benchmark's fastest round over a yardstick timed beside it) is what
    catches a 2x slowdown on a machine whose raw speed moves; only timed benchmarks carry it."""

    def with_relative(doc, python_s, yardstick_s):
        for b in doc["benchmarks"]:
            if b["extra_info"].get("runtime") == "python":
                b["stats"]["min"] = python_s
            b["extra_info"]["relative_time"] = b["stats"]["min"] / yardstick_s
        return doc

    base = with_relative(run_doc(), 0.004, 0.001)
    slower_host = with_relative(run_doc(cpp_seconds=0.0018), 0.0072, 0.0018)  # everything 1.8x, yardstick too
    assert not [r for r in check.compare(base, slower_host) if r.failed]
    slowed = with_relative(run_doc(), 0.008, 0.001)  # the reference loop 2x slower, the machine as fast
    failed = [(r.benchmark, r.quantity) for r in check.compare(base, slowed) if r.failed]
    assert (f"{RUNTIME}[python-tiny-shapes 4x8x8]", "relative_time") in failed
    # not held to it: the C++ loop (its speed-up is checked), plan building (its error is) and the
    # one-round gate case (its calls saved and quality are)
    names = {r.benchmark for r in check.compare(base, base) if r.quantity == "relative_time"}
    assert names == {f"{RUNTIME}[python-tiny-shapes 4x8x8]"}


def test_improvements_pass_and_exact_counts_fail_either_way():
    base = run_doc()
    assert not [r for r in check.compare(base, run_doc(psnr=30.0, rel_error=0.001, cpp_seconds=0.0005)) if r.failed]
    assert [r.quantity for r in check.compare(base, run_doc(nfe=9)) if r.failed] == ["nfe"]
    assert [r.quantity for r in check.compare(base, run_doc(nfe=11)) if r.failed] == ["nfe"]


def test_a_benchmark_missing_from_the_run_fails_and_a_new_one_is_listed():
    base, now = run_doc(), run_doc()
    now["benchmarks"] = [b for b in now["benchmarks"] if b["fullname"] != SOLVER]
    now["benchmarks"].append(bench("bench/test_new.py::test_new", "new", {"nfe": 5}))
    rows = check.compare(base, now)
    assert [(r.benchmark, r.status) for r in rows if r.failed] == [(SOLVER, "FAIL: not in this run")]
    assert any(r.benchmark == "bench/test_new.py::test_new" and r.status.startswith("new") for r in rows)


def test_a_machine_class_without_baseline_says_how_to_record_one(tmp_path):
    result = cli("timing-baseline", env={"BENCH_MACHINE_CLASS": "cpu-3core-nowhere"})
    assert result.returncode == 2 and result.stdout == ""
    assert "no benchmark baseline for machine class 'cpu-3core-nowhere'" in result.stderr
    assert "bench/baselines/cpu-3core-nowhere/check.json" in result.stderr and "make bench-baseline" in result.stderr
    now = write(tmp_path / "now.json", {**run_doc(), "machine_info": {"machine_class": "cpu-3core-nowhere"}})
    result = cli("compare", now)
    assert result.returncode == 2 and "make bench-baseline" in result.stderr


def test_record_keeps_each_benchmark_from_the_run_where_it_was_fastest(tmp_path):
    first, second = run_doc(), run_doc(cpp_seconds=0.0008)
    first["benchmarks"][0]["data"] = [0.004, 0.005]
    second["benchmarks"][0]["stats"]["min"] = 0.005  # the reference loop: faster in the first run
    runs = [write(tmp_path / "1.json", first), write(tmp_path / "2.json", second)]
    result = cli("record", *runs, "--dir", tmp_path / "cls")
    assert result.returncode == 0, result.stderr
    recorded = json.loads((tmp_path / "cls" / "check.json").read_text())
    assert [b["stats"]["min"] for b in recorded["benchmarks"][:2]] == [0.004, 0.0008]
    assert "data" not in recorded["benchmarks"][0] and recorded["run_conditions"]["runs"] == 2
    assert not [r for r in check.compare(recorded, first) if r.failed]


def test_time_json_holds_the_benchmarks_whose_raw_time_is_compared(tmp_path):
    assert cli("record", write(tmp_path / "run.json", run_doc()), "--dir", tmp_path / "cls").returncode == 0
    timed = json.loads((tmp_path / "cls" / "time.json").read_text())
    assert [b["fullname"] for b in timed["benchmarks"]] == [f"{RUNTIME}[python-tiny-shapes 4x8x8]"]
    untimed = [b for b in run_doc()["benchmarks"] if b["fullname"] != f"{RUNTIME}[python-tiny-shapes 4x8x8]"]
    assert all(check.why_untimed(b) for b in untimed)


def test_record_refuses_a_slowed_run_and_runs_of_different_subsets(tmp_path):
    doc = run_doc()
    other = {**doc, "benchmarks": doc["benchmarks"][:2]}
    result = cli(
        "record", write(tmp_path / "run.json", doc), write(tmp_path / "other.json", other), "--dir", tmp_path / "x"
    )
    assert result.returncode == 2 and "run 2 holds other benchmarks than run 1" in result.stderr
    doc["run_conditions"] = {"bench_slowdown": 2}
    result = cli("record", write(tmp_path / "slow.json", doc), "--dir", tmp_path / "other")
    assert result.returncode == 2 and "BENCH_SLOWDOWN=2" in result.stderr
    assert not (tmp_path / "other").exists() and not (tmp_path / "x").exists()


def test_a_run_on_a_busy_machine_is_flagged_and_cannot_become_a_baseline(tmp_path):
    baseline = write(tmp_path / "baseline.json", run_doc())
    busy = run_doc()
    busy["run_conditions"] = {"other_processes_cores": 1.3}
    result = cli("compare", write(tmp_path / "busy.json", busy), "--baseline", baseline)
    assert result.returncode == 0 and "other processes kept 1.30 cores busy" in result.stderr
    result = cli("record", tmp_path / "busy.json", "--dir", tmp_path / "new")
    assert result.returncode == 2 and "Record on an idle machine" in result.stderr
    assert not (tmp_path / "new").exists()
    assert cli("record", tmp_path / "busy.json", "--dir", tmp_path / "new", "--allow-busy").returncode == 0


def test_busy_cores_counts_other_processes_only():
    assert check.busy_cores((0.0, 100.0, 5.0), (10.0, 118.0, 13.0)) == pytest.approx(1.0)  # 18 busy, 8 own
    assert check.busy_cores(None, (10.0, 118.0, 13.0)) is None
    start = check.cpu_usage()
    if start is None:
        pytest.skip("no /proc/stat here")
    assert start[1] > 0 and start[2] > 0


def test_slowed_down_runs_the_loop_n_times_and_returns_the_last_result():
    calls = []

    def run(x, *, scale):
        calls.append(x)
        return len(calls) * scale

    assert check.slowed_down(run, 3)(7, scale=10) == 30
    assert calls == [7, 7, 7]


def test_machine_class_names_cores_and_vendor_or_the_override(monkeypatch):
    monkeypatch.delenv("BENCH_MACHINE_CLASS", raising=False)
    cls = check.machine_class()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert re.fullmatch(rf"cpu-{cores}core-[a-z0-9-]+(\+[a-z0-9-]+)?", cls), cls
    monkeypatch.setenv("BENCH_MACHINE_CLASS", "a100-box")
    assert check.machine_class() == "a100-box"


def test_every_committed_baseline_holds_exactly_the_benchmarks_marked_check():
    classes = sorted(p.parent for p in (ROOT / "bench" / "baselines").glob("*/check.json"))
    assert classes, "no committed baseline: CI (cpu-2core-intel) needs bench/baselines/cpu-2core-intel/"
    cmd = [sys.executable, "-m", "pytest", "bench", "-m", "check", "--ignore=bench/gpu", "--collect-only", "-q"]
    result = subprocess.run([*cmd, "-p", "no:cacheprovider"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    marked = {line for line in result.stdout.splitlines() if "::" in line}
    assert len(marked) >= 4
    for folder in classes:
        run = json.loads((folder / "check.json").read_text())["benchmarks"]
        recorded = {b["fullname"] for b in run}
        assert recorded == marked, f"{folder}: re-record it with `make bench-baseline` ({recorded ^ marked})"
        timed = [b["fullname"] for b in json.loads((folder / "time.json").read_text())["benchmarks"]]
        assert timed == [b["fullname"] for b in run if check.why_untimed(b) is None]


@pytest.mark.parametrize("value", ["1.5"])
def test_a_bad_bench_slowdown_is_a_usage_error(value):
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "bench/test_solver_quality.py",
        "-q",
        "--collect-only",
        "-p",
        "no:cacheprovider",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "BENCH_SLOWDOWN": value})
    assert result.returncode == 4 and f"BENCH_SLOWDOWN={value!r}: expected a whole number >= 1" in result.stderr
