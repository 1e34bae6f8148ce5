"""The side-by-side benchmark of step skipping vs caching (bench/test_skip_peers.py) runs on a tiny
selection and its report renders; the DeepCache adapter (bench/peers.py) really caches and
restores the UNet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import peers  # noqa: E402

needs_deepcache = pytest.mark.skipif(peers.deepcache_available() is not None, reason=str(peers.deepcache_available()))


@needs_deepcache
def test_deepcache_skips_the_deep_modules_and_restores_the_unet():
    import fastdiff

    engine = fastdiff.build_engine("tiny-shapes", device="cpu")
    prompts = ["a red circle on a blue background", "a green square at the top"]
    plan = engine.plan_for("dpmpp_2m", 6)
    deep = []
    handle = engine.unet.mid_block.resnets[0].register_forward_hook(lambda *a: deep.append(1))
    try:
        plain = engine.sample(prompts, plan=plan, seed=0)
        assert len(deep) == 6
        with peers.deepcache(engine, plan, 2):
            cached = engine.sample(prompts, plan=plan, seed=0)
        assert len(deep) == 6 + 3  # calls 0, 2, 4 ran the deep part
        again = engine.sample(prompts, plan=plan, seed=0)
    finally:
        handle.remove()
    assert len(deep) == 6 + 3 + 6 and torch.equal(again.latents, plain.latents)  # the UNet is itself again
    assert not torch.equal(cached.latents, plain.latents)
    assert ((cached.latents - plain.latents).norm() / plain.latents.norm()) < 0.5


def test_the_benchmark_runs_side_by_side_and_the_report_draws_the_pareto_plot(tmp_path):
    out = tmp_path / "peers.json"
    select = "tiny-shapes-N20 and (none or deepcache-interval_2 or batch_ms2_d0.05 or copy_ms4_d0.05 or 10_steps)"
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "bench" / "test_skip_peers.py"), "-q", "-k", select]
    cmd += ["-p", "no:cacheprovider", f"--benchmark-json={out}"]
    env = {**os.environ, "SKIP_PEERS_PROMPTS": "4"}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {b["extra_info"]["method"]: b["extra_info"] for b in json.loads(out.read_text())["benchmarks"]}
    expected = {"none", "gate", "gate-copy", "fewer-steps"} | (
        {"deepcache"} if peers.deepcache_available() is None else set()
    )
    assert set(rows) == expected
    assert rows["none"]["psnr"] == 100.0 and rows["none"]["mean_calls"] == 20
    assert rows["gate"]["mean_calls"] < 20 and rows["gate"]["unet_calls"] < 20  # per-batch: whole calls skipped
    assert rows["fewer-steps"]["mean_calls"] == 10 and rows["fewer-steps"]["call_reduction"] == 2
    assert rows["fewer-steps"]["psnr"] < 100  # a 10-step run against the 20-step reference
    for r in rows.values():
        assert r["speedup"] > 0 and 0 < r["ssim"] <= 1 and r["psnr_worst"] <= r["psnr_median"] <= 100
        assert 0 <= r["adherence"] <= 1 and r["adherence_reference"] == rows["none"]["adherence_reference"]
    report = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "report.py"), str(out), "--out", str(tmp_path / "results")],
        capture_output=True,
        text=True,
    )
    assert report.returncode == 0, report.stderr
    table = (tmp_path / "results" / "skip_peers.md").read_text()
    assert "### tiny-shapes, DPM-Solver++(2M) 20 steps" in table and "| gate | batch ms2 d0.05 extrapolate |" in table
    assert (tmp_path / "results" / "skip_peers.png").read_bytes().startswith(b"\x89PNG")
