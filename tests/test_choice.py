"""sampler="auto" follows plans/auto.json (fastdiff.calibration.choice): the shipped plan measured
best on validation samples, only while the plans it compared are unchanged; bad files are named."""

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="engines need diffusers")

import fastdiff  # noqa: E402
from fastdiff.calibration.choice import ChoiceError, choose_default, save_choice  # noqa: E402
from fastdiff.calibration.search import plan_error  # noqa: E402
from fastdiff.calibration.trajectories import make_source, teacher_trajectories  # noqa: E402
from fastdiff.models.registry import calibration_prompts  # noqa: E402


@pytest.fixture()
def engine(tmp_path):
    engine = fastdiff.build_engine("digits", device="cpu")
    shutil.copytree(engine.plans_dir, tmp_path / "plans")
    (tmp_path / "plans" / "auto.json").unlink(missing_ok=True)
    engine.plans_dir = tmp_path / "plans"
    return engine


def test_the_choice_is_the_lowest_measured_error_and_auto_follows_it(engine):
    doc = choose_default(engine, [5, 10], samples=4, seed=3, reference="dpmpp_2m:40", progress=False)
    five, ten = doc["choices"]["5"], doc["choices"]["10"]
    assert set(five["errors"]) == {"usf", "olss", "dpmpp_2m"} and set(ten["errors"]) == {"olss", "dpmpp_2m"}
    # recompute one error independently of the choice code
    source = make_source(engine, calibration_prompts("digits", 4, seed=3), seed=3)
    traj = teacher_trajectories(source, "dpmpp_2m:40", progress=False)
    target = torch.from_numpy(np.asarray(traj.latents[:, -1], dtype=np.float64))
    assert plan_error(source, np.arange(4), target, engine.plan_for("olss", 5)) == pytest.approx(five["errors"]["olss"])
    for c in (five, ten):
        assert c["sampler"] == min(c["errors"], key=c["errors"].get)
    # make dpmpp_2m the recorded winner at 5: auto follows the file, not the usf > olss order
    five["sampler"] = "dpmpp_2m"
    save_choice(doc, engine.plans_dir / "auto.json")
    engine._plans.clear()
    assert engine.resolve_sampler("auto", 5) == "dpmpp_2m" and engine.resolve_sampler(None, 10) == ten["sampler"]
    out = engine.sample(["3"], steps=5, seed=0)
    assert out.plan.metadata["solver"] == "dpmpp_2m"
    assert engine.resolve_sampler("auto", 7) == "usf"  # no entry: the order
    assert engine.resolve_sampler("olss", 5) == "olss"  # an explicit sampler is never overridden


def test_an_entry_for_changed_plans_is_not_used_and_a_corrupt_file_is_named(engine):
    doc = choose_default(engine, [5], samples=2, seed=3, reference="dpmpp_2m:20", progress=False)
    doc["choices"]["5"]["sampler"] = "dpmpp_2m"
    doc["choices"]["5"]["hashes"]["usf"] = "sha256:0"  # the usf plan changed since it was measured
    path = save_choice(doc, engine.plans_dir / "auto.json")
    assert engine.resolve_sampler("auto", 5) == "usf"
    # a built solver's hash is a record only: its last bits may differ on another machine's numpy
    doc["choices"]["5"]["hashes"]["usf"] = engine.plan_for("usf", 5).hash()
    doc["choices"]["5"]["hashes"]["dpmpp_2m"] = "sha256:1"
    save_choice(doc, path)
    assert engine.resolve_sampler("auto", 5) == "dpmpp_2m"
    path.write_text("{")
    with pytest.raises(ChoiceError, match="auto.json: cannot read the sampler choice"):
        engine.sample(["3"], steps=5, seed=0)
    path.write_text(json.dumps({"format": "fastdiff.stepplan"}))
    with pytest.raises(ChoiceError, match="not a sampler choice file: format 'fastdiff.stepplan'"):
        engine.resolve_sampler("auto", 5)
    path.write_text(json.dumps({"format": "fastdiff.auto", "version": 1, "choices": {"5": "usf"}}))
    with pytest.raises(ChoiceError, match="corrupt sampler choice"):
        engine.resolve_sampler("auto", 5)
    assert engine.resolve_sampler("dpmpp_2m", 5) == "dpmpp_2m"  # explicit samplers never read it


def test_cli_choose_prints_the_table_and_writes_the_file(tmp_path, capsys):
    from fastdiff.cli import main

    out = tmp_path / "auto.json"
    argv = ["choose", "--model", "digits", "--device", "cpu", "--steps", "4", "--samples", "2"]
    assert main(argv + ["--reference", "dpmpp_2m:20", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| steps | usf | olss | dpmpp_2m | auto |" in text and f"wrote {out}" in text
    doc = json.loads(out.read_text())
    assert doc["command"].startswith("fastdiff choose --model digits") and list(doc["choices"]) == ["4"]
