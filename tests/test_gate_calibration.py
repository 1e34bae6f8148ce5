"""The self-calibrating gate (fastdiff.calibration.gate), its settings files, the engine's use of
shipped settings, the CLI, and the fidelity metrics it measures with."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from fastdiff.calibration.fidelity import PSNR_CAP, fidelity, psnr, ssim, to_pixels
from fastdiff.calibration.gate import GateCalibration, GateCalibrationError, GateTrial, _cliffs, calibrate_gate, choose
from fastdiff.gate import GateSettingsError, GateSpec


# ---------------------------------------------------------------- choosing from a grid
def trial(delta, max_skips, psnr_pooled, worst, speedup, per_sample=False):
    quality = {"psnr": psnr_pooled, "psnr_median": psnr_pooled, "psnr_worst": worst, "ssim": 0.99}
    gate = GateSpec(delta=delta, max_skips=max_skips, per_sample=per_sample)
    return GateTrial(gate, 50 / speedup, speedup, quality, 1.0, speedup)


GRID = [
    trial(0.01, 2, 45, 36, 1.8),
    trial(0.02, 2, 42, 33, 2.0),
    trial(0.05, 2, 36, 27, 2.2),  # meets 35 / 25, but its next delta does not: no margin
    trial(0.1, 2, 28, 20, 2.4),
    trial(0.01, 4, 40, 31, 2.1),
    trial(0.02, 4, 33, 30, 2.6),  # misses the pooled target
]


def test_the_fastest_setting_with_a_margin_in_delta_is_chosen():
    chosen, met, message = choose(GRID, 35.0, 25.0)
    assert met and chosen.gate == GateSpec(0.02, 2, per_sample=False) and "margin" in message
    # without any setting that has a margin, the fastest feasible one, said so
    chosen, met, message = choose([GRID[2], GRID[3]], 35.0, 25.0)
    assert met and chosen is GRID[2] and "without margin" in message


def test_the_worst_image_floor_refuses_a_setting_with_a_good_pooled_figure():
    chosen, met, _ = choose(GRID, 35.0, 34.0)
    assert met and chosen is GRID[0]  # 0.02/2 has 33 dB worst


def test_a_target_nothing_meets_returns_the_closest_setting_and_says_so():
    chosen, met, message = choose(GRID, 60.0, 50.0)
    assert not met and chosen is GRID[0]
    assert "cannot be met" in message and "delta=0.01, max_skips=2" in message and "skip=None" in message


def test_the_cliff_is_the_largest_drop_between_neighbouring_deltas():
    cliffs = {c["max_skips"]: c for c in _cliffs(GRID)}
    assert cliffs[2]["delta_before"] == 0.05 and cliffs[2]["delta_after"] == 0.1 and cliffs[2]["drop_db"] == 8
    assert cliffs[4]["drop_db"] == 7


# ---------------------------------------------------------------- on the shipped model
@pytest.fixture(scope="module")
def engine():
    import fastdiff

    # DPM-Solver++(2M) at every step count (the default, "auto", would pick the shipped plans)
    return fastdiff.build_engine("tiny-shapes", device="cpu", sampler="dpmpp_2m")


SMALL = {"steps": 10, "samples": 3, "held_out": 2, "deltas": (0.05, 0.5), "max_skips": (2,), "progress": False}


@pytest.fixture(scope="module")
def calibrated(engine):
    return calibrate_gate(engine, target_psnr=20.0, per_sample=(False, True), **SMALL)


def test_calibration_measures_the_grid_and_checks_the_choice_on_held_out_prompts(calibrated):
    result = calibrated
    assert len(result.trials) == 4 and result.prompts == 3 and result.held_out_prompts == 2
    assert {(t.gate.delta, t.gate.per_sample) for t in result.trials} == {
        (d, s) for d in (0.05, 0.5) for s in (False, True)
    }
    chosen = result.chosen
    assert result.met == chosen.meets(20.0, 10.0) and result.gate == chosen.gate
    for t in result.trials + [result.held_out]:
        assert 1.0 <= t.speedup and 1 <= t.calls <= 10 and 0 < t.unet_speedup
        assert set(t.fidelity) >= {"psnr", "psnr_median", "psnr_worst", "ssim", "ssim_worst"}
    assert result.cost_model["alpha"] >= 0 and result.cost_model["beta"] >= 0
    assert "| batch | 0.05 | 2 |" in result.table()


def test_calibration_measures_the_sampler_with_fewer_steps_at_the_same_calls(engine, calibrated):
    base = calibrated.fewer_steps
    assert base["steps"] == max(1, round(calibrated.chosen.calls)) and base["calls"] == base["steps"]
    for key in ("calibration", "held_out"):
        assert set(base[key]) >= {"psnr", "psnr_median", "psnr_worst", "ssim", "ssim_worst"}
    from fastdiff.models.registry import calibration_prompts  # the baseline is what it says: recompute it

    prompts = calibration_prompts(engine.name, 2, seed=1)
    reference = engine.sample(prompts, steps=10, seed=1, guidance_scale=engine.guidance_scale)
    fewer = engine.sample(prompts, steps=base["steps"], seed=1, guidance_scale=engine.guidance_scale)
    assert fidelity(fewer.images, reference.images) == base["held_out"]


def test_held_out_prompts_get_their_own_noise(engine, monkeypatch):
    seen = []
    sample = engine.sample

    def spy(prompts, **kwargs):
        seen.append((tuple(prompts), kwargs["seed"]))
        return sample(prompts, **kwargs)

    monkeypatch.setattr(engine, "sample", spy)
    calibrate_gate(engine, target_psnr=20.0, per_sample=(False,), seed=5, **{**SMALL, "deltas": (0.05,)})
    calibration = {p for p, s in seen if s == 5}
    held_out = {p for p, s in seen if s == 6}
    # 2 references, the grid of 1, the check, the fewer-steps baseline on each prompt set
    assert len(calibration) == 1 and len(held_out) == 1 and len(seen) == 6


def test_an_unreachable_target_returns_the_closest_setting(engine):
    result = calibrate_gate(engine, target_psnr=99.0, worst_psnr=99.0, per_sample=(False,), **SMALL)
    assert not result.met and "cannot be met" in result.message
    assert result.gate == max(result.trials, key=lambda t: t.fidelity["psnr"]).gate


def test_settings_files_round_trip_and_corrupt_ones_are_named(calibrated, tmp_path):
    path = calibrated.save(tmp_path / "gates" / "dpmpp_2m-10.json")
    again = GateCalibration.load(path)
    assert again.gate == calibrated.gate and again.to_dict() == calibrated.to_dict()
    older = calibrated.to_dict()
    del older["fewer_steps"]  # files written before the baseline was measured still load
    path.write_text(json.dumps(older))
    assert GateCalibration.load(path).fewer_steps == {}
    path.write_text(path.read_text()[:100])
    with pytest.raises(GateSettingsError, match=f"{path}: cannot read gate settings"):
        GateCalibration.load(path)
    path.write_text(json.dumps({"schema": "fastdiff.plan/1"}))
    with pytest.raises(GateSettingsError, match="not a gate settings file: schema 'fastdiff.plan/1'"):
        GateCalibration.load(path)
    doc = calibrated.to_dict()
    doc["gate"]["delta"] = -1
    path.write_text(json.dumps(doc))
    with pytest.raises(GateSettingsError, match="corrupt gate settings: ValueError: GateSpec: delta must be"):
        GateCalibration.load(path)


def test_skip_adaptive_uses_the_settings_shipped_for_the_plan(engine, calibrated, tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "plans_dir", tmp_path / "plans")
    assert engine.gate_for("dpmpp_2m", 10) is None
    special = GateSpec(delta=0.5, max_skips=1, per_sample=False, reuse="copy")
    settings = GateCalibration.from_dict({**calibrated.to_dict(), "gate": special.to_dict()})
    settings.save(tmp_path / "gates" / "dpmpp_2m-10.json")
    assert engine.gate_for("dpmpp_2m", 10) == special
    prompts = ["a red circle on a blue background", "a green square at the top"]
    got = engine.sample(prompts, steps=10, seed=0, skip="adaptive")
    want = engine.sample(prompts, steps=10, seed=0, skip=special)
    assert got.skipped == want.skipped and (got.latents == want.latents).all()
    default = engine.sample(prompts, steps=12, seed=0, skip="adaptive")  # no settings for 12 steps: defaults
    assert default.skipped == engine.sample(prompts, steps=12, seed=0, skip=GateSpec()).skipped
    # settings calibrated for another plan (another hash) are not used
    GateCalibration.from_dict({**settings.to_dict(), "plan_hash": "sha256:0"}).save(
        tmp_path / "gates" / "dpmpp_2m-10.json"
    )
    assert engine.gate_for("dpmpp_2m", 10) is None
    (tmp_path / "gates" / "dpmpp_2m-10.json").write_text("{")  # a corrupt shipped file is named, not ignored
    with pytest.raises(GateSettingsError, match="dpmpp_2m-10.json: cannot read gate settings"):
        engine.sample(prompts, steps=10, seed=0, skip="adaptive")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 3}, "makes 3 model calls: the gate decides from call 3 on"),
        ({"target_psnr": 0}, "target_psnr must be a number of dB in"),
        ({"target_psnr": 30, "worst_psnr": 31}, "worst_psnr must be in"),
        ({"deltas": (0.1, -1)}, "deltas must be positive finite numbers"),
        ({"max_skips": (0,)}, "max_skips must be integers >= 1"),
        ({"per_sample": ()}, "per_sample must be a non-empty sequence"),
        ({"samples": 1}, "samples must be an integer >= 2"),
    ],
)
def test_bad_calibration_settings_are_named(engine, kwargs, message):
    with pytest.raises(GateCalibrationError, match=message):
        calibrate_gate(engine, **{"steps": 10, "progress": False, **kwargs})


def test_the_cli_writes_the_settings_and_reports_the_choice(tmp_path):
    out = tmp_path / "gate.json"
    cmd = [sys.executable, "-m", "fastdiff.cli", "calibrate-gate", "--steps", "10", "--samples", "2", "--held-out", "2"]
    cmd += ["--sampler", "dpmpp_2m"]
    cmd += ["--deltas", "0.05", "--max-skips", "2", "--decisions", "batch", "--target-psnr", "15", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode in (0, 1), run.stderr
    assert ("chosen: delta=0.05" in run.stdout) == (run.returncode == 0)
    assert "held out (2 prompts)" in run.stdout and f"wrote {out}" in run.stdout
    steps = GateCalibration.load(out).fewer_steps["steps"]
    assert f"without skipping, dpmpp_2m at {steps} steps (as many calls): calibration " in run.stdout
    assert GateCalibration.load(out).gate.delta == 0.05


# ---------------------------------------------------------------- fidelity metrics
def loop_ssim(a: np.ndarray, b: np.ndarray, w: int) -> float:
    """SSIM of one [H, W, C] pair, window by window (the obviously correct form of eq. 13)."""
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for ch in range(a.shape[2]):
        for i in range(a.shape[0] - w + 1):
            for j in range(a.shape[1] - w + 1):
                x, y = a[i : i + w, j : j + w, ch].ravel(), b[i : i + w, j : j + w, ch].ravel()
                mx, my = x.mean(), y.mean()
                vx, vy = x.var(ddof=1), y.var(ddof=1)
                cxy = ((x - mx) * (y - my)).sum() / (x.size - 1)
                values.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


@pytest.mark.parametrize(
    "shape, window", [((3, 32, 32, 3), 7), ((2, 8, 8, 1), 7), ((1, 5, 6, 1), 5), ((1, 4, 9, 2), 3)]
)
def test_ssim_matches_the_windowed_formula(shape, window):
    rng = np.random.default_rng(0)
    a = rng.random(shape)
    b = np.clip(a + rng.normal(0, 0.1, shape), 0, 1)
    got = ssim(a, b)
    for i in range(shape[0]):
        assert got[i] == pytest.approx(loop_ssim(a[i], b[i], window), rel=1e-9)
    assert ssim(a, a) == pytest.approx(np.ones(shape[0]))


def test_fidelity_reports_pooled_median_and_worst():
    from PIL import Image

    rng = np.random.default_rng(1)
    ref = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(3)]
    out = [ref[0], Image.fromarray(np.asarray(ref[1]) ^ 1), Image.fromarray(255 - np.asarray(ref[2]))]
    f = fidelity(out, ref)
    mse = ((to_pixels(out) - to_pixels(ref)) ** 2).reshape(3, -1).mean(1)
    assert f["psnr"] == pytest.approx(psnr(mse.mean())) and f["psnr_worst"] == pytest.approx(psnr(mse[2]))
    assert f["psnr_median"] == pytest.approx(psnr(mse[1])) and f["identical"] == 1 and f["images"] == 3
    assert psnr(0.0) == PSNR_CAP and f["ssim_worst"] < f["ssim"] < 1
    with pytest.raises(ValueError, match="images of different sizes"):
        to_pixels([ref[0], Image.new("RGB", (4, 4))])
    with pytest.raises(ValueError, match="2 images of .* against 3 references"):
        fidelity(out[:2], ref)
