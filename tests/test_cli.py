"""The fastdiff command line: every subcommand runs, explains itself and fails clearly."""

import json
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


def test_bench_gmm_prints_a_table(tmp_path, capsys):
    out_json = tmp_path / "rows.json"
    assert main(["bench", "gmm", "--steps", "3", "6", "--solvers", "ddim", "unipc_bh2", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "| ddim |" in out and "| unipc_bh2 |" in out and "N=6" in out
    assert len(json.loads(out_json.read_text())) == 4


@pytest.mark.parametrize("argv", [[], ["plan"], ["bench"], ["info"], ["solvers"], ["bench", "gmm"]])
def test_every_command_has_help(argv):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv + ["--help"])
    assert info.value.code == 0


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "fastdiff.cli", "solvers"], capture_output=True, text=True)
    assert result.returncode == 0 and "unipc" in result.stdout
