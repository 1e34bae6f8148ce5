"""The fastdiff command line: every subcommand runs, explains itself and fails clearly."""

import json
import re
import subprocess
import sys

import pytest

from fastdiff.cli import build_parser, main
from fastdiff.plan import StepPlan


def test_info_reports_features_and_reasons(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("torch", "CUDA", "C++ extension", "Triton", "TensorRT", "NVML"):
        assert name in out
    assert "[no ]" in out or "[yes]" in out
    # the shipped models say which calibrated plans they carry and whether auto.json picks among them
    for name in ("tiny-shapes", "digits"):
        line = next(x for x in out.splitlines() if f"model {name}:" in x)
        assert "usf plans for 3, 4, 5, 6, 7, 8 steps" in line and "olss plans for" in line and "auto.json" in line


def test_solvers_lists_names_and_options(capsys):
    assert main(["solvers", "--options"]) == 0
    out = capsys.readouterr().out
    assert "dpmpp_2m" in out and "use_karras_sigmas = False" in out


def test_plan_writes_a_loadable_file(tmp_path, capsys):
    path = tmp_path / "plan.json"
    argv = [
        "plan",
        "dpmpp_2m",
        "--steps",
        "7",
        "--preset",
        "sd21",
        "--set",
        "use_karras_sigmas=true",
        "--out",
        str(path),
    ]
    assert main(argv) == 0
    plan = StepPlan.load(path)
    assert plan.nfe == 7 and plan.prediction_type == "v_prediction"
    assert plan.metadata["options"]["use_karras_sigmas"] is True
    assert "latents at peak" in capsys.readouterr().out


def test_plan_reads_a_scheduler_config(tmp_path):
    config = tmp_path / "scheduler_config.json"
    config.write_text(json.dumps({"beta_schedule": "linear", "clip_sample": False}))
    assert main(["plan", "ddim", "--steps", "4", "--config", str(config), "--out", str(tmp_path / "p.json")]) == 0


def test_errors_exit_with_code_2_and_a_message(capsys):
    assert main(["plan", "ddim", "--steps", "4", "--set", "clip_sample=true"]) == 2
    assert "clip_sample=True is not supported" in capsys.readouterr().err
    assert main(["plan", "nope", "--steps", "4"]) == 2
    assert main(["plan", "ddim", "--steps", "4", "--set", "karras"]) == 2
    assert "fastdiff: error: --set expects key=value, got 'karras'" in capsys.readouterr().err
    assert main(["bench", "gmm", "--solvers", "lms"]) == 2
    assert "fastdiff: error: unknown solver variant 'lms'" in capsys.readouterr().err


def test_bench_gmm_prints_a_table(tmp_path, capsys):
    out_json = tmp_path / "rows.json"
    assert main(["bench", "gmm", "--steps", "3", "6", "--solvers", "ddim", "unipc_bh2", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "| ddim |" in out and "| unipc_bh2 |" in out and "N=6" in out
    assert len(json.loads(out_json.read_text())) == 4


COMMANDS = [
    [],
    ["plan"],
    ["bench"],
    ["info"],
    ["solvers"],
    ["bench", "gmm"],
    ["sample"],
    ["calibrate"],
    ["search"],
    ["choose"],
    ["calibrate-gate"],
    ["export"],
]


def test_choice_lists_come_from_the_registries():
    from fastdiff import loops, solvers
    from fastdiff.dtypes import NAMES
    from fastdiff.engines.backends import CHOICES

    sample = build_parser()._subparsers._group_actions[0].choices["sample"]
    choices = {a.dest: a.choices for a in sample._actions if a.choices}
    assert tuple(choices["backend"]) == CHOICES and tuple(choices["loop"]) == loops.CHOICES
    from fastdiff.engines.engine import CALIBRATED

    assert tuple(choices["dtype"]) == NAMES and "distilled_stochastic" in CALIBRATED
    assert set(solvers.VARIANTS) | {"auto", *CALIBRATED} == set(choices["sampler"])


@pytest.mark.parametrize("argv", COMMANDS)
def test_every_command_has_help(argv):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv + ["--help"])
    assert info.value.code == 0


def test_sample_writes_pngs_and_says_where(untrained_shapes_dir, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "img" / "x.png"
    argv = ["sample", "a red circle on a blue background", "--model", str(untrained_shapes_dir), "--device", "cpu"]
    argv += ["--steps", "3", "--seed", "5", "--guidance", "2", "--num-images", "2", "--scale", "3", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    written = [tmp_path / "img" / "x-0.png", tmp_path / "img" / "x-1.png"]
    assert f"wrote {written[0]}, {written[1]}" in printed and "3 UNet calls" in printed and "seed 5" in printed
    assert "backend eager: auto: cpu -> eager" in printed and "loop reference" in printed
    assert all(Image.open(p).size == (96, 96) for p in written)


def test_sample_with_skipping_prints_the_calls_per_image(untrained_shapes_dir, tmp_path, capsys):
    argv = ["sample", "a green square", "--model", str(untrained_shapes_dir), "--device", "cpu", "--steps", "12"]
    argv += ["--seed", "2", "--num-images", "2", "--skip-delta", "0.5", "--out", str(tmp_path / "s.png")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert re.search(r"\d+ UNet calls of 12 \(per image: \d+, \d+\)", printed), printed


def test_sample_with_the_calibrated_gate_and_the_feature_cache(tmp_path, capsys):
    base = ["sample", "a green square", "--device", "cpu", "--steps", "20", "--seed", "2", "--num-images", "2"]
    base += ["--out", str(tmp_path / "s.png")]
    assert main(base + ["--skip", "adaptive"]) == 0  # tiny-shapes ships settings for dpmpp_2m at 20 steps
    printed = capsys.readouterr().out
    calls = re.search(r"(\d+) UNet calls of 20 \(per image: \1, \1\)", printed)  # per-batch decisions
    assert calls and int(calls.group(1)) < 20, printed
    assert main(base + ["--skip-delta", "0.5", "--batch-decisions", "--reuse", "copy", "--feature-cache", "2"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"(\d+) UNet calls of 20 \(per image: (\d+), \2\), (\d+) of them shallow", printed), printed
    assert main(base + ["--skip", "adaptive", "--skip-delta", "0.1"]) == 2
    assert "give --skip adaptive or --skip-delta, not both" in capsys.readouterr().err
    assert main(base + ["--skip-delta", "0.1", "--feature-cache", "2"]) == 2
    assert "feature_cache with skipping needs per-batch gate decisions" in capsys.readouterr().err


def test_sample_errors_exit_with_code_2(untrained_shapes_dir, tmp_path, capsys):
    base = [
        "sample",
        "a red circle",
        "--model",
        str(untrained_shapes_dir),
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "a.png"),
    ]
    assert main(base + ["--steps", "0"]) == 2
    assert "steps must be an integer >= 1" in capsys.readouterr().err
    assert main(base + ["--height", "30"]) == 2
    assert "multiple of 4" in capsys.readouterr().err
    assert main(["sample", "x", "--model", "sd15"]) == 2
    assert "unknown model 'sd15'" in capsys.readouterr().err
    assert main(base + ["--backend", "cuda_graph"]) == 2
    assert "backend 'cuda_graph' is unavailable: CUDA graphs need a CUDA device" in capsys.readouterr().err
    assert main(base + ["--loop", "graph"]) == 2
    assert "loop 'graph' is unavailable: the graph loop captures CUDA graphs" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "fastdiff.cli", "solvers"], capture_output=True, text=True)
    assert result.returncode == 0 and "unipc" in result.stdout
