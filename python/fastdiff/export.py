"""ONNX export of an engine's modules: text encoder, UNet and VAE decoder (TensorRT's input format).

    fastdiff export --model tiny-shapes --format onnx --out DIR

Each module is written as DIR/<name>/model.onnx (the layout of diffusers' ONNX pipelines and
optimum: text_encoder, unet, vae_decoder) with dynamic batch axes, and dynamic height/width for
the UNet and the VAE decoder. Inputs and outputs follow optimum's names: ``input_ids`` ->
``last_hidden_state``; ``sample``, ``timestep``, ``encoder_hidden_states`` (or ``class_labels``)
-> ``out_sample``; ``latent_sample`` -> ``sample`` (the decoder does not divide by the VAE's
scaling factor: callers do, as diffusers does).

Every exported file is validated with onnxruntime on the CPU against the torch module at a batch
and (for the UNet/VAE) a spatial size different from the export's, so the dynamic axes are
exercised; `export_onnx` returns the measured errors and raises `ExportError` when one exceeds
its tolerance. Export runs in float32 on the CPU (a float16 engine's weights are upcast).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

OPSET = 17
TOLERANCE = 1e-3  # max |onnx − torch| / max |torch| accepted in float32


class ExportError(RuntimeError):
    """An export failed or its ONNX model does not reproduce the torch module."""


@dataclass
class ExportedModule:
    name: str
    path: Path
    inputs: list[str]
    outputs: list[str]
    dynamic_axes: dict
    max_rel_error: float | None = None
    checked_shapes: dict = field(default_factory=dict)


def _require(module: str, why: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ExportError(f"ONNX export needs {module} ({why}): pip install {module} ({exc})") from exc


class _TextEncoder(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids, return_dict=False)[0]


class _UNet(torch.nn.Module):
    def __init__(self, unet, cond_key: str):
        super().__init__()
        self.unet = unet
        self.cond_key = cond_key

    def forward(self, sample, timestep, cond):
        return self.unet(sample, timestep, **{self.cond_key: cond}, return_dict=False)[0]


class _VaeDecoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


def _check(session_path: Path, module, feeds: dict[str, torch.Tensor], name: str) -> float:
    ort = _require("onnxruntime", "to validate the exported models")
    session = ort.InferenceSession(str(session_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
    with torch.no_grad():
        want = module(*feeds.values()).numpy()
    if got.shape != want.shape:
        raise ExportError(f"{name}: onnxruntime returned shape {got.shape}, torch {want.shape}")
    scale = max(float(np.abs(want).max()), 1e-12)
    error = float(np.abs(got.astype(np.float64) - want).max() / scale)
    if not np.isfinite(error) or error > TOLERANCE:
        raise ExportError(f"{name}: onnxruntime differs from torch by {error:.3g} (relative; tolerance {TOLERANCE})")
    return error


def _export_module(
    name: str, module, example: dict, outputs: list[str], axes: dict, out: Path, feeds
) -> ExportedModule:
    """Export module(*example.values()) to out/<name>/model.onnx with the inputs named as in
    `example`; with feeds (other inputs, same names), check it with onnxruntime against torch."""
    path = out / name / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs = list(example)
    try:
        # The TorchScript-based exporter: no onnxscript needed, and dynamic_axes as TensorRT expects.
        torch.onnx.export(
            module,
            tuple(example.values()),
            str(path),
            dynamo=False,
            dynamic_axes=axes,
            input_names=inputs,
            output_names=outputs,
            opset_version=OPSET,
        )
    except Exception as exc:  # an exporter missing from this torch, or an op it cannot convert
        raise ExportError(f"exporting {name} failed: {type(exc).__name__}: {exc}") from exc
    item = ExportedModule(name, path, inputs, outputs, axes)
    if feeds is not None:
        item.max_rel_error = _check(path, module, feeds, name)
        item.checked_shapes = {k: list(v.shape) for k, v in feeds.items()}
    return item


def export_onnx(engine, out_dir, *, batch: int = 2, validate: bool = True) -> list[ExportedModule]:
    """Export `engine`'s text encoder (if any), UNet and VAE decoder (if any) to out_dir."""
    from .engines.engine import TextConditioner, VaeDecoder

    _require("onnx", "to write ONNX files")
    out = Path(out_dir)
    cpu = torch.device("cpu")
    size = engine.sample_size
    channels = engine.decoder.channels
    exported: list[ExportedModule] = []
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if isinstance(engine.conditioner, TextConditioner):
            text = _TextEncoder(copy.deepcopy(engine.conditioner.text_encoder).to(cpu, torch.float32).eval())
            length = engine.conditioner.tokenizer.model_max_length
            vocab = int(text.text_encoder.config.vocab_size)
            ids = torch.randint(0, vocab, (batch, length), generator=gen)
            axes = {"input_ids": {0: "batch"}, "last_hidden_state": {0: "batch"}}
            feeds = {"input_ids": torch.randint(0, vocab, (batch + 1, length), generator=gen)} if validate else None
            exported.append(
                _export_module("text_encoder", text, {"input_ids": ids}, ["last_hidden_state"], axes, out, feeds)
            )
            cond_key = "encoder_hidden_states"
            cond = text(ids)
            make_cond = lambda b: torch.randn(b, *cond.shape[1:], generator=gen)  # noqa: E731
        else:
            cond_key = "class_labels"
            classes = int(engine.unet.config.num_class_embeds)
            cond = torch.randint(0, classes, (batch,), generator=gen)
            make_cond = lambda b: torch.randint(0, classes, (b,), generator=gen)  # noqa: E731

        unet = _UNet(copy.deepcopy(engine.unet).to(cpu, torch.float32).eval(), cond_key)
        sample = torch.randn(batch, channels, size, size, generator=gen)
        timestep = torch.full((batch,), 500.0)
        axes = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"}, cond_key: {0: "batch"}}
        axes["out_sample"] = {0: "batch", 2: "height", 3: "width"}
        step = 2 ** (len(engine.unet.config.block_out_channels) - 1)
        other = size + step  # another spatial size the UNet accepts
        feeds = None
        if validate:
            b = batch + 1
            feeds = {
                "sample": torch.randn(b, channels, other, other, generator=gen),
                "timestep": torch.linspace(10.0, 900.0, b),
                cond_key: make_cond(b),
            }
        example = {"sample": sample, "timestep": timestep, cond_key: cond}
        exported.append(_export_module("unet", unet, example, ["out_sample"], axes, out, feeds))

        if isinstance(engine.decoder, VaeDecoder):
            vae = _VaeDecoder(copy.deepcopy(engine.decoder.vae).to(cpu, torch.float32).eval())
            latents = torch.randn(batch, channels, size, size, generator=gen)
            axes = {
                "latent_sample": {0: "batch", 2: "height", 3: "width"},
                "sample": {0: "batch", 2: "height", 3: "width"},
            }
            feeds = None
            if validate:
                feeds = {"latent_sample": torch.randn(batch + 1, channels, other, other, generator=gen)}
            exported.append(
                _export_module("vae_decoder", vae, {"latent_sample": latents}, ["sample"], axes, out, feeds)
            )

    manifest = {
        "format": "fastdiff.onnx-export",
        "model": engine.name,
        "opset": OPSET,
        "torch": torch.__version__,
        "modules": [
            {
                "name": m.name,
                "file": str(m.path.relative_to(out)),
                "inputs": m.inputs,
                "outputs": m.outputs,
                "dynamic_axes": m.dynamic_axes,
                "max_rel_error_vs_torch": m.max_rel_error,
                "validated_at": m.checked_shapes,
            }
            for m in exported
        ],
    }
    (out / "fastdiff_export.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return exported
