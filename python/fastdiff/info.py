"""Feature detection: what this installation can use, and for each missing piece, why not."""

from __future__ import annotations

import importlib
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass

# The oldest CUDA the CUDA runner example builds with: 12.3 brought conditional graph nodes and
# cudaStreamBeginCaptureToGraph (csrc/examples/cuda_runner/cuda_compat.h). CMakeLists.txt skips
# the example with an older nvcc; tests/test_build.py holds the three in step.
CUDA_RUNNER_MIN = (12, 3)


@dataclass(frozen=True)
class Feature:
    name: str
    available: bool
    detail: str  # version or device when available, the reason when not


def _extension() -> Feature:
    try:
        from . import _C  # noqa: F401
    except ImportError as exc:
        try:
            from ._build_info import EXTENSION_STATUS
        except ImportError:
            EXTENSION_STATUS = "never built (running from a source tree without `pip install -e .`?)"
        return Feature("C++ extension fastdiff._C", False, f"{EXTENSION_STATUS}; import failed: {exc}")
    compiler = getattr(_C, "COMPILER", "unknown compiler")
    return Feature("C++ extension fastdiff._C", True, f"built with {compiler}, plan format v{_C.PLAN_VERSION}")


def _torch() -> tuple[Feature, Feature]:
    try:
        import torch
    except ImportError as exc:
        missing = Feature("torch", False, f"not importable: {exc}")
        return missing, Feature("CUDA", False, "torch is missing")
    version = Feature("torch", True, torch.__version__)
    if torch.version.cuda is None:
        return version, Feature("CUDA", False, f"torch {torch.__version__} is a CPU-only build")
    if not torch.cuda.is_available():
        return version, Feature(
            "CUDA", False, f"torch built for CUDA {torch.version.cuda} but no GPU/driver is visible"
        )
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return version, Feature("CUDA", True, f"CUDA {torch.version.cuda}: {names}")


def _module(label: str, module: str, why_missing: str) -> Feature:
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        return Feature(label, False, f"{why_missing} ({exc})")
    return Feature(label, True, getattr(mod, "__version__", "importable"))


def _nvml() -> Feature:
    try:
        import pynvml
    except ImportError as exc:
        return Feature("NVML (power/clock readings)", False, f"pip install nvidia-ml-py ({exc})")
    try:
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
    except Exception as exc:  # NVMLError has many subclasses; all mean "not usable here"
        return Feature("NVML (power/clock readings)", False, f"nvidia-ml-py installed but NVML failed: {exc}")
    return Feature("NVML (power/clock readings)", True, f"{count} device(s)")


def _nvcc(which=shutil.which) -> Feature:
    """The CUDA compiler that CMake builds the CUDA runner example (csrc/examples/cuda_runner) with."""
    label = "nvcc (CUDA runner example, CMake)"
    path = which("nvcc")
    if path is None:
        return Feature(label, False, "nvcc is not on PATH: CMake builds the CPU runtime only")
    try:
        text = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return Feature(label, False, f"{path} does not run: {exc}")
    found = re.search(r"release ([0-9]+)\.([0-9]+)", text)
    if found is None:
        return Feature(label, False, f"{path} --version printed no release number")
    version = (int(found.group(1)), int(found.group(2)))
    release, needed = f"{version[0]}.{version[1]}", "{}.{}".format(*CUDA_RUNNER_MIN)
    if version < CUDA_RUNNER_MIN:
        return Feature(
            label,
            False,
            f"CUDA {release} at {path}, but the CUDA runner example needs CUDA >= {needed} (conditional graph"
            " nodes): CMake skips it and builds the CPU runtime only",
        )
    return Feature(
        label,
        True,
        f"CUDA {release} at {path}: `cmake -S . -B build` builds the CUDA runner example (needs CUDA >= {needed}),"
        f" its test and fastdiff_bench_cuda (they run where a CUDA device is; one graph with the gate needs a"
        f" driver >= {needed}, else it falls back to per-step graphs)",
    )


def _models() -> list[Feature]:
    from .engines.engine import CALIBRATED, shipped_steps
    from .models.loading import engines_dir, sd21_local
    from .models.tokenizer import open_clip_bpe_path

    root = engines_dir()
    out = []
    for name, marker in (("tiny-shapes", "model_index.json"), ("digits", "unet/config.json")):
        path = root / name / marker
        detail = str(path.parent) if path.is_file() else f"missing: {path}"
        plans = root / name / "plans"
        if path.is_file() and plans.is_dir():
            counts = {kind: shipped_steps(plans, kind) for kind in CALIBRATED}
            shipped = "; ".join(f"{k} plans for {', '.join(map(str, v))} steps" for k, v in counts.items() if v)
            auto = "auto.json chooses among them" if (plans / "auto.json").is_file() else "no auto.json"
            detail += f" ({shipped}; {auto})" if shipped else ""
        out.append(Feature(f"model {name}", path.is_file(), detail))
    sd21 = sd21_local()
    vocab = open_clip_bpe_path()
    detail = f"real weights in {sd21}" if sd21 else "no local weights (pass weights=<dir>)"
    detail += "; random-weight architecture " + (
        "available" if vocab else "needs the CLIP BPE vocabulary: pip install --no-deps open_clip_torch"
    )
    out.append(Feature("model sd21", bool(sd21) or bool(vocab), detail))
    return out


def _backends() -> list[Feature]:
    try:
        from .engines import backends
    except ImportError as exc:  # torch missing
        return [Feature("backends", False, f"not importable: {exc}")]
    return [Feature(f"backend {name}", ok, detail) for name, ok, detail in backends.report()]


def _loops() -> list[Feature]:
    """Each loop on the default device in the engine's default dtype."""
    try:
        import torch

        from . import loops
    except ImportError as exc:  # torch missing
        return [Feature("loops", False, f"not importable: {exc}")]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    out = []
    for name in loops.LOOPS:
        if name == "graph" and cuda:  # it runs with the engine's graph cache: a graph backend
            out.append(Feature("loop graph", True, "on cuda with the cuda_graph or compiled backend (auto's choice)"))
            continue
        reason = loops.why_unavailable(name, device, dtype)
        out.append(Feature(f"loop {name}", reason is None, reason or f"available on {device}"))
    return out


def features() -> list[Feature]:
    torch_feature, cuda = _torch()
    triton = _module("Triton", "triton", "not installed (ships with CUDA builds of torch)")
    if triton.available and not cuda.available:
        triton = Feature("Triton", True, f"{triton.detail} (no GPU: kernels run only with TRITON_INTERPRET=1)")
    return [
        torch_feature,
        cuda,
        _extension(),
        triton,
        _module("ONNX (fastdiff export)", "onnx", "pip install onnx"),
        _module("onnxruntime (export validation)", "onnxruntime", "pip install onnxruntime"),
        _module("TensorRT", "tensorrt", "not installed; NVIDIA's wheels download from outside PyPI"),
        _nvml(),
        _nvcc(),
        _module("diffusers (engines, interop)", "diffusers", "pip install diffusers"),
        _module("transformers (text encoders)", "transformers", "pip install transformers"),
        *_models(),
        *_backends(),
        *_loops(),
    ]


def report() -> str:
    from ._version import __version__

    lines = [f"fastdiff {__version__} on Python {platform.python_version()} ({platform.machine()})"]
    for f in features():
        mark = "yes" if f.available else "no "
        lines.append(f"  [{mark}] {f.name}: {f.detail}")
    return "\n".join(lines)
