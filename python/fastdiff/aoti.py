"""AOTInductor packages for the C++ runtime: a model's UNet (and VAE decoder) compiled ahead of
time, with the plan and pre-encoded prompts, so a C++ service samples with no Python at all.

    fastdiff export --model tiny-shapes --format aoti --out DIR --prompt "a red circle" --steps 8

DIR holds
  unet.pt2             torch._inductor.aoti_compile_and_package of unet(x, t, encoder_hidden_states)
                       -> raw output, dynamic batch (loaded in C++ by AOTIModelPackageLoader)
  vae.pt2              latents -> images in [-1, 1] (divides by the VAE's scaling factor itself)
  plan.json            the StepPlan with its compiled program as a cache (fastdiff.program.save)
  prompts.safetensors  "cond" [P, L, D] and, with guidance, "uncond" [1, L, D] (float32)
  package.json         the manifest the C++ runtime checks first: torch version and device the
                       packages were built for, shapes, the schedule fingerprint, guidance, and
                       the SHA-256 of each file above (a damaged or swapped file is refused
                       before anything in it is parsed or loaded)

The packages are compiled for this machine's torch and device (CPU here; the CUDA device of a
GPU engine there). The C++ loader refuses a package built by another torch version or for
another device kind with a message naming both, before touching the compiled code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path

import torch

from .export import _UNet  # unet(sample, timestep, cond) -> raw output, the ONNX export's wrapper
from .files import atomic_write
from .plan import StepPlan
from .program import compile as compile_program
from .program import save as save_program

PACKAGE_FORMAT = "fastdiff.aoti"
PACKAGE_VERSION = 2  # 2: the manifest records the SHA-256 of every file ("files")


class AOTIExportError(RuntimeError):
    """An AOTInductor package could not be built (or does not reproduce the module)."""


class _VaeDecode(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]


def target(device) -> dict:
    """What a package is built for: torch version (without the local tag) and device kind."""
    device = torch.device(device)
    out = {"torch": torch.__version__.split("+")[0], "device": device.type}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        out["sm"] = f"sm_{major}{minor}"
    return out


def _size_oblivious():
    """Let batch 1 stay dynamic (torch specialises sizes 0/1 otherwise)."""
    try:
        import torch.fx.experimental._config as fx_config

        return fx_config.patch(backed_size_oblivious=True)
    except (ImportError, AttributeError):  # older torch: batch starts at 2
        return contextlib.nullcontext()


def _compile(module: torch.nn.Module, example: tuple, path: Path, metadata: dict) -> tuple[int, int]:
    """Export with a dynamic batch, AOT-compile to `path`; returns the batch range."""
    batch = torch.export.Dim.DYNAMIC
    with torch.no_grad(), _size_oblivious():
        ep = torch.export.export(module, example, dynamic_shapes=tuple({0: batch} for _ in example))
    ranges = list(ep.range_constraints.values())
    lo = max([int(r.lower) for r in ranges] + [1])
    hi = min([int(r.upper) for r in ranges if r.upper != float("inf") and str(r.upper) != "int_oo"] + [2**31 - 1])
    configs = {"aot_inductor.metadata": {f"fastdiff.{k}": str(v) for k, v in metadata.items()}}
    torch._inductor.aoti_compile_and_package(ep, package_path=str(path), inductor_configs=configs)
    return lo, hi


def _check(path: Path, module: torch.nn.Module, example: tuple, name: str, tolerance: float) -> float:
    loaded = torch._inductor.aoti_load_package(str(path))
    with torch.no_grad():
        want = module(*example)
        got = loaded(*example)
    got = got[0] if isinstance(got, (list, tuple)) else got
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    if not err <= tolerance:
        raise AOTIExportError(f"{name}: the AOTInductor package differs from torch by {err:.2e} (relative)")
    return err


def _package(name: str, module: torch.nn.Module, example: tuple, out: Path, meta: dict, log) -> dict:
    """Compile `module` to out/<name>.pt2, check it at batch 1; returns its manifest entry."""
    start = time.perf_counter()
    path = out / f"{name}.pt2"
    lo, hi = _compile(module, example, path, {**meta, "module": name})
    err = _check(path, module, tuple(x[:1] for x in example), name, 1e-4)
    log(f"{path.name}: batch {lo}..{hi}, AOTI vs torch {err:.1e} relative, {time.perf_counter() - start:.0f} s")
    return {"file": path.name, "min_batch": lo, "max_batch": hi, "max_rel_error": err}


def export_aoti(
    engine,
    out,
    *,
    prompts: list[str],
    negative_prompt: str = "",
    guidance_scale: float | None = None,
    sampler: str | None = None,
    steps: int = 8,
    plan: StepPlan | None = None,
    decoder: bool = True,
    log=print,
) -> Path:
    """Write an AOTInductor package directory for the C++ runtime (see the module docstring);
    returns the manifest's path. Compiling takes about a minute per module for tiny-shapes on
    2 CPU cores, far longer for SD-size models."""
    if engine.dtype != torch.float32:
        raise AOTIExportError(f"AOTI export needs a float32 engine, got {engine.dtype}")
    keys = tuple(engine.conditioner.keys)
    if keys != ("encoder_hidden_states",):
        raise AOTIExportError(
            f"{engine.name} conditions its UNet on {keys}; the C++ runtime's package format takes "
            "encoder_hidden_states (text-conditioned models)"
        )
    if not prompts:
        raise AOTIExportError("give at least one prompt to pre-encode")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan if plan is not None else engine.plan_for(sampler, steps)
    plan.check_schedule(engine.schedule)
    guidance = engine.guidance_scale if guidance_scale is None else float(guidance_scale)
    device = engine.device

    cond = engine.conditioner.encode(list(prompts), device, torch.float32)["encoder_hidden_states"]
    tensors = {"cond": cond.detach().cpu().contiguous()}
    if guidance > 1:
        uncond = engine.conditioner.encode([negative_prompt], device, torch.float32)["encoder_hidden_states"]
        tensors["uncond"] = uncond.detach().cpu().contiguous()
    from safetensors.torch import save_file

    save_file(tensors, str(out / "prompts.safetensors"), metadata={"prompts": json.dumps(list(prompts))})
    save_program(compile_program(plan), out / "plan.json")

    channels, size = engine.decoder.channels, engine.sample_size
    x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    t = torch.full((2,), float(plan.times[0]), device=device)
    c = torch.cat([cond[:1], cond[:1]]).to(device)
    built = target(device)
    meta = {"model": engine.name, **built}
    manifest = {
        "format": PACKAGE_FORMAT,
        "version": PACKAGE_VERSION,
        "model": engine.name,
        **built,
        "latent_shape": [channels, size, size],
        "cond_shape": list(cond.shape[1:]),
        "prediction_type": engine.schedule.prediction_type,
        "schedule_fingerprint": engine.schedule.fingerprint,
        "plan": "plan.json",
        "plan_hash": plan.hash(),
        "prompts": {"file": "prompts.safetensors", "texts": list(prompts), "guidance_scale": guidance},
    }
    unet = _UNet(engine.unet, "encoder_hidden_states").eval()
    # the input shapes go into each compiled module too (its metadata is covered by the file's
    # SHA-256): the C++ loader refuses a manifest whose shapes disagree with the compiled code
    shapes = {"latent_shape": manifest["latent_shape"], "cond_shape": manifest["cond_shape"]}
    manifest["unet"] = _package("unet", unet, (x, t, c), out, {**meta, **shapes}, log)
    manifest["vae"] = None
    if decoder:
        vae = _VaeDecode(engine.decoder.vae).eval()
        manifest["image_shape"] = [3, size * engine.decoder.factor, size * engine.decoder.factor]
        shapes = {"latent_shape": manifest["latent_shape"], "image_shape": manifest["image_shape"]}
        manifest["vae"] = _package("vae", vae, (x,), out, {**meta, **shapes}, log)
    names = [manifest["plan"], manifest["prompts"]["file"], manifest["unet"]["file"]]
    names += [manifest["vae"]["file"]] if manifest["vae"] else []
    manifest["files"] = {n: "sha256:" + hashlib.sha256((out / n).read_bytes()).hexdigest() for n in names}
    return atomic_write(out / "package.json", json.dumps(manifest, indent=1) + "\n")
