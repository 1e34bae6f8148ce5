"""ONNX export: text encoder, UNet and VAE decoder with dynamic axes, checked by onnxruntime at
another batch and spatial size; the CLI; clear errors when the ONNX packages are missing."""

import json
import sys

import pytest

import fastdiff
from fastdiff.cli import main
from fastdiff.export import TOLERANCE, ExportError, export_onnx

pytest.importorskip("onnx", reason="ONNX export needs onnx (pip install onnx)")
pytest.importorskip("onnxruntime", reason="export validation needs onnxruntime (pip install onnxruntime)")


@pytest.fixture(scope="module")
def engine(untrained_shapes_dir):
    return fastdiff.build_engine(untrained_shapes_dir, device="cpu")


def test_export_writes_validated_models_with_dynamic_axes(engine, tmp_path):
    import onnx

    modules = export_onnx(engine, tmp_path, batch=2)
    assert [m.name for m in modules] == ["text_encoder", "unet", "vae_decoder"]
    for m in modules:
        assert m.path.is_file() and m.max_rel_error is not None and m.max_rel_error <= TOLERANCE
        model = onnx.load(str(m.path))
        onnx.checker.check_model(model)
        first = model.graph.input[0].type.tensor_type.shape.dim[0]
        assert first.dim_param == "batch", m.name  # a named (dynamic) batch axis
    unet = modules[1]
    assert unet.checked_shapes["sample"][0] == 3 and unet.checked_shapes["sample"][2] != engine.sample_size
    manifest = json.loads((tmp_path / "fastdiff_export.json").read_text())
    assert [m["file"] for m in manifest["modules"]] == [
        "text_encoder/model.onnx",
        "unet/model.onnx",
        "vae_decoder/model.onnx",
    ]


def test_cli_export(untrained_shapes_dir, tmp_path, capsys):
    assert main(["export", "--model", str(untrained_shapes_dir), "--out", str(tmp_path / "x"), "--no-validate"]) == 0
    printed = capsys.readouterr().out
    assert "unet: " in printed and "not validated" in printed and (tmp_path / "x" / "unet" / "model.onnx").is_file()


def test_missing_onnxruntime_is_named(engine, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(ExportError, match="needs onnxruntime .*pip install onnxruntime"):
        export_onnx(engine, tmp_path)
