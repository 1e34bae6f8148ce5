"""The GPU benchmark suite (bench/gpu) skips cleanly without CUDA, runs end to end on the CPU in
its tiny mode, and bench/gpu_summary.py computes the loop overhead, the speedup over diffusers
and the targets from the JSON, refusing to put a tiny run into bench/results."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {
    "device",
    "e2e_5step_768_ms",
    "diffusers_5step_768_ms",
    "diffusers_default_steps_768_ms",
    "unet_step_ms",
    "loop_overhead_fraction",
}


def _load_summary_module():
    spec = importlib.util.spec_from_file_location("gpu_summary", ROOT / "bench" / "gpu_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_summary = _load_summary_module()


def run_suite(json_path: Path, *args: str, tiny: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FASTDIFF_BENCH_GPU_TINY"}
    if tiny:
        env["FASTDIFF_BENCH_GPU_TINY"] = "1"
    cmd = [sys.executable, "-m", "pytest", "bench/gpu", "-q", "-rs", "-p", "no:cacheprovider"]
    cmd += [f"--benchmark-json={json_path}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def bench(kind: str, backend: str, batch: int, steps: int, ms: float, **info) -> dict:
    """One pytest-benchmark entry as bench/gpu writes it (median `ms`)."""
    extra = {
        "device": "NVIDIA H100 80GB HBM3",
        "tiny": False,
        "model": "sd21",
        "dtype": "float16",
        "torch": "2.13.0",
        "resolution": 768,
        "driver": "570.00",
        "kind": kind,
        "backend": backend,
        "batch": batch,
        "steps": steps,
        **info,
    }
    stats = {"median": ms / 1e3, "mean": ms / 1e3, "stddev": 0.0, "min": ms / 1e3, "max": ms / 1e3, "rounds": 10}
    group = {"e2e": "gpu-e2e", "unet": "gpu-unet-step", "text": "gpu-text-encode", "vae": "gpu-vae-decode"}
    name = f"test_{kind}[{backend}-b{batch}-{steps}]"
    return {"name": name, "group": group.get(kind, "gpu-diffusers-e2e"), "extra_info": extra, "stats": stats}


def made_up_run(**device) -> dict:
    """A hand-made run: compiled is the fastest backend; its batch-1 parts add up to
    2 + 5·12 + 20 = 82 ms and the engine's total is 83 ms, so the loop costs 0.2 ms a step."""
    rows = [
        bench("unet", "eager", 1, 1, 27.0),
        bench("unet", "compiled", 1, 1, 12.0),
        bench("text", "compiled", 1, 0, 2.0),
        bench("vae", "compiled", 1, 0, 20.0),
        bench("e2e", "eager", 1, 5, 180.0, total_ms=175.0),
        bench("e2e", "compiled", 1, 5, 90.0, total_ms=83.0),
        bench("e2e", "compiled", 4, 5, 300.0, total_ms=290.0),
        bench("diffusers", "diffusers-eager", 1, 5, 180.0),
        bench("diffusers", "diffusers-eager", 1, 25, 700.0),
        bench("diffusers", "diffusers-eager", 1, 50, 1400.0),
    ]
    for r in rows:
        r["extra_info"].update(device)
    return {"datetime": "2026-01-01T00:00:00", "benchmarks": rows}


def write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the suite runs instead of skipping")
def test_without_cuda_the_whole_suite_is_skipped_with_a_reason(tmp_path):
    done = run_suite(tmp_path / "gpu.json", tiny=False)
    assert done.returncode in (0, 5), done.stdout + done.stderr
    assert "passed" not in done.stdout and "failed" not in done.stdout and " skipped" in done.stdout
    assert "no CUDA device" in done.stdout and "FASTDIFF_BENCH_GPU_TINY=1" in done.stdout
    summary = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_summary.py"), str(tmp_path / "gpu.json"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert summary.returncode == 2 and "every bench/gpu test was skipped" in summary.stderr


def test_tiny_run_measures_every_part_and_the_summary_reads_it(tmp_path):
    out = tmp_path / "gpu.json"
    done = run_suite(out, tiny=True)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [b["extra_info"] for b in json.loads(out.read_text())["benchmarks"]]
    assert {(r["kind"], r["batch"]) for r in rows} >= {(k, n) for k in ("e2e", "unet", "text", "vae") for n in (1, 4)}
    assert all(r["tiny"] and r["backend"] in ("eager", "diffusers-eager") for r in rows)
    assert all(r["telemetry_unavailable"] and r["power_w"] is None for r in rows)
    assert {r["steps"] for r in rows if r["kind"] == "diffusers"} == {5, 25, 50}
    assert all(r["unet_calls"] == r["steps"] for r in rows if r["kind"] in ("e2e", "diffusers"))

    results = tmp_path / "results"
    assert gpu_summary.main([str(out), "--out", str(results), "--allow-tiny"]) == 0
    summary = json.loads((results / "gpu_summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary) and summary["tiny"] and summary["device"].startswith("cpu")
    assert summary["e2e_backend"] == "eager" and summary["e2e_5step_768_ms"] > 0
    assert set(summary["diffusers_default_steps_768_ms"]) == {"25", "50"}
    assert summary["loop_overhead_fraction"] is not None
    assert "Tiny CPU smoke run" in (results / "gpu.md").read_text()
    assert (results / summary["raw_json"]).is_file()


def test_loop_overhead_is_the_time_beyond_the_parts_per_step_as_a_share_of_a_unet_step():
    overhead = gpu_summary.loop_overhead(total_ms=83.0, unet_ms=12.0, vae_ms=20.0, text_ms=2.0, steps=5)
    assert overhead["per_step_ms"] == pytest.approx(0.2)
    assert overhead["fraction"] == pytest.approx(0.2 / 12.0)


def test_summary_takes_the_fastest_backend_and_compares_it_with_diffusers():
    summary = gpu_summary.summarize(made_up_run())
    assert summary["device"] == "NVIDIA H100 80GB HBM3" and not summary["tiny"]
    assert summary["e2e_backend"] == "compiled"
    assert summary["e2e_5step_768_ms"] == pytest.approx(90.0)
    assert summary["e2e_5step_768_without_pil_ms"] == pytest.approx(83.0)
    assert summary["e2e_5step_768_batch4_ms"] == pytest.approx(300.0)
    assert summary["diffusers_5step_768_ms"] == pytest.approx(180.0)
    assert summary["diffusers_default_steps_768_ms"] == pytest.approx({"25": 700.0, "50": 1400.0})
    assert summary["speedup_vs_diffusers_5step"] == pytest.approx(2.0)
    assert summary["unet_step_ms"] == pytest.approx({"eager": 27.0, "compiled": 12.0})
    assert summary["loop_overhead_fraction"] == pytest.approx(0.2 / 12.0)
    # eager lacks its text and VAE parts, compiled its batch-4 parts: no overhead for those
    assert summary["loop_overhead"]["eager"]["1"] is None and summary["loop_overhead"]["compiled"]["4"] is None


def test_targets_are_judged_from_the_measured_values():
    targets = gpu_summary.summarize(made_up_run())["targets"]
    assert targets["e2e_5step_768_ms"]["pass"] is True  # 90 ms <= 100 ms
    assert targets["speedup_vs_diffusers_5step"]["pass"] is True  # 2.0x >= 1.6x
    assert targets["loop_overhead_fraction"]["pass"] is False  # 1.7% > 1%

    slow = made_up_run()
    for b in slow["benchmarks"]:
        if b["extra_info"]["kind"] == "e2e" and b["extra_info"]["backend"] == "compiled":
            b["stats"]["median"] *= 1.5  # 135 ms at batch 1
    targets = gpu_summary.summarize(slow)["targets"]
    assert targets["e2e_5step_768_ms"]["pass"] is False and targets["speedup_vs_diffusers_5step"]["pass"] is False


def test_missing_measurements_are_null_and_not_judged():
    doc = made_up_run()
    doc["benchmarks"] = [b for b in doc["benchmarks"] if b["extra_info"]["kind"] != "diffusers"]
    summary = gpu_summary.summarize(doc)
    assert summary["diffusers_5step_768_ms"] is None and summary["speedup_vs_diffusers_5step"] is None
    assert summary["targets"]["speedup_vs_diffusers_5step"]["pass"] is None


def test_summary_writes_the_json_the_table_and_the_raw_file_named_by_device(tmp_path):
    results = tmp_path / "results"
    assert gpu_summary.main([str(write(tmp_path, made_up_run())), "--out", str(results)]) == 0
    summary = json.loads((results / "gpu_summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary) and summary["raw_json"] == "gpu-nvidia-h100-80gb-hbm3.json"
    assert (results / "gpu-nvidia-h100-80gb-hbm3.json").is_file()
    table = (results / "gpu.md").read_text()
    assert "| 5-step end-to-end, batch 1 (compiled) | 90.0 ms (83.0 ms without the PIL images) | <= 100 ms" in table
    assert "| speedup over diffusers at 5 steps, batch 1 | 2.00x | >= 1.6x | pass |" in table
    assert "1.67% of a UNet step" in table and "**FAIL**" in table


def test_a_tiny_run_is_refused_without_allow_tiny(tmp_path, capsys):
    path = write(tmp_path, made_up_run(tiny=True, device="cpu (x86_64)"))
    assert gpu_summary.main([str(path), "--out", str(tmp_path / "results")]) == 2
    assert "tiny CPU smoke run" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_a_tiny_run_never_goes_into_bench_results(tmp_path, capsys):
    path = write(tmp_path, made_up_run(tiny=True, device="cpu (x86_64)"))
    assert gpu_summary.main([str(path), "--out", str(gpu_summary.RESULTS), "--allow-tiny"]) == 2
    assert "never written into" in capsys.readouterr().err


def test_an_empty_benchmark_file_says_every_test_was_skipped(tmp_path, capsys):
    path = tmp_path / "gpu.json"
    path.write_text("")  # what pytest-benchmark leaves when nothing ran
    assert gpu_summary.main([str(path), "--out", str(tmp_path / "results")]) == 2
    assert "every bench/gpu test was skipped" in capsys.readouterr().err
