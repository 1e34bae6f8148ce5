"""Engine backends: how the modules (UNet, text encoder, VAE decoder) run — module execution
only; how the plan runs is the engine's loop (`fastdiff.loops`).

- eager: the modules as they are.
- cuda_graph: each module call captured into a CUDA graph per input signature (static buffers,
  bounded LRU cache, recapture on mismatch); the engine's graph cache also lets the graph loop
  capture the whole sampling loop.
- compiled: torch.compile of each module (artefacts cached on disk, see `compiled`), then, on a
  GPU, the same graph capture as cuda_graph. On the CPU it is torch.compile alone.
- auto: compiled on a GPU with Triton, cuda_graph on a GPU without it, eager on the CPU.

TensorRT is detected (`fastdiff info`) but no backend uses it in this build.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from ..graphs import CaptureError, GraphCache
from .compiled import CompileCache, CompiledCall, module_fingerprint, why_not_compilable

BACKENDS = ("eager", "cuda_graph", "compiled")
CHOICES = ("auto", *BACKENDS)


class BackendUnavailableError(ValueError):
    """The requested backend cannot run on this machine or device."""


def why_unavailable(backend: str, device) -> str | None:
    """None when `backend` can run on `device`, else the reason."""
    device = torch.device(device)
    if backend == "eager":
        return None
    if backend == "cuda_graph":
        return None if device.type == "cuda" else f"CUDA graphs need a CUDA device, the engine is on {device}"
    if backend == "compiled":
        return why_not_compilable(device)
    if backend == "tensorrt":
        try:
            import tensorrt
        except ImportError:
            return (
                "the tensorrt package is not installed (NVIDIA's wheels download from outside PyPI); "
                "`fastdiff export --format onnx` writes the ONNX that TensorRT builds engines from"
            )
        return (
            f"tensorrt {getattr(tensorrt, '__version__', '')} is installed, but this build has no TensorRT backend: "
            "build an engine from `fastdiff export --format onnx` with trtexec"
        )
    raise ValueError(f"unknown backend {backend!r}: expected one of {', '.join(CHOICES)}")


def resolve(backend: str, device) -> tuple[str, str]:
    """(backend, why it was chosen) for a requested backend, "auto" included; an unavailable
    explicit choice is a BackendUnavailableError naming the reason."""
    if backend == "cpp":
        raise ValueError("backend 'cpp' is a loop, not a module backend: use loop='cpp' (the C++ sampling loop)")
    if not isinstance(backend, str) or backend not in (*CHOICES, "tensorrt"):
        raise ValueError(f"unknown backend {backend!r}: expected one of {', '.join(CHOICES)}")
    device = torch.device(device)
    if backend != "auto":
        reason = why_unavailable(backend, device)
        if reason is not None:
            raise BackendUnavailableError(f"backend {backend!r} is unavailable: {reason}")
        return backend, "requested"
    if device.type == "cuda":
        no_compile = why_not_compilable(device)
        if no_compile is None:
            return "compiled", "auto: GPU with Triton -> torch.compile + CUDA graphs (first call per size compiles)"
        return "cuda_graph", f"auto: GPU -> CUDA graphs ({no_compile})"
    return "eager", (
        f"auto: {device.type} -> eager (CUDA graphs need a GPU; torch.compile on the CPU is opt-in with "
        "backend='compiled': minutes of compilation per size for a modest gain)"
    )


def report(device=None) -> list[tuple[str, bool, str]]:
    """(backend, available, detail) for each backend on `device` (default: CUDA when visible)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for name in (*BACKENDS, "tensorrt"):
        reason = why_unavailable(name, device)
        rows.append((name, reason is None, reason or f"available on {device}"))
    chosen, why = resolve("auto", device)
    rows.append(("auto", True, f"-> {chosen}: {why.removeprefix('auto: ')}"))
    return rows


class Runner:
    """Applies one backend to the engine's modules; owns the graph cache and the compile cache.

    graph_mode: "cuda" (default on a GPU for cuda_graph/compiled), "emulate" (the graph cache's
    buffer semantics without graphs: for tests on the CPU) or None (no graphs).
    """

    def __init__(
        self,
        backend: str,
        device,
        *,
        graph_mode: str | None = "default",
        max_graphs: int = 4,
        compile_cache: CompileCache | None = None,
    ):
        self.backend = backend
        self.device = torch.device(device)
        if graph_mode == "default":
            graph_mode = "cuda" if backend in ("cuda_graph", "compiled") and self.device.type == "cuda" else None
        self.graphs = GraphCache("engine", max_graphs=max_graphs, mode=graph_mode) if graph_mode else None
        self.compile_cache = compile_cache
        self._weights: tuple | None = None

    def wrap(self, name: str, fn: Callable, module: torch.nn.Module) -> ModuleCall:
        return ModuleCall(self, name, fn, module)

    def guard(self, *modules: torch.nn.Module) -> bool:
        """Drop captured graphs when a module's parameters were replaced since they were captured
        (in-place updates are seen by the graphs; new tensors are not). True when it dropped any."""
        if self.graphs is None:
            return False
        ptrs = tuple(p.data_ptr() for m in modules for p in m.parameters())
        changed = self._weights is not None and ptrs != self._weights
        self._weights = ptrs
        if changed:
            self.graphs.clear()
        return changed


class ModuleCall:
    """One module's call through the runner: fn(*tensors) -> tensor, compiled and/or captured.

    `inner` is the call without graphs (eager or compiled): what a captured sampling loop calls.
    Calls through the graph cache return a copy of the graph's static output.
    """

    def __init__(self, runner: Runner, name: str, fn: Callable, module: torch.nn.Module):
        self.runner = runner
        self.name = name
        self.fn = fn
        self.module = module
        self.uncapturable: str | None = None  # why capture failed, once it has
        self.rebuild()

    def rebuild(self) -> None:
        """Start over (after the module's dtype changed): recompile, and drop captured graphs."""
        if self.runner.backend == "compiled":
            self.inner = CompiledCall(
                self.name,
                self.fn,
                module_fingerprint(self.module),
                self.runner.device,
                cache=self.runner.compile_cache,
            )
        else:
            self.inner = self.fn
        if self.runner.graphs is not None:
            self.runner.graphs.clear()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def __call__(self, *args):
        graphs = self.runner.graphs
        if graphs is None or self.uncapturable:
            return self.inner(*args)
        try:
            return graphs.run(self.inner, args, extra=(self.name, self.dtype))
        except CaptureError as exc:
            self.uncapturable = str(exc)
            warnings.warn(f"fastdiff: {self.name} runs without CUDA graphs from now on: {exc}", RuntimeWarning)
            return self.inner(*args)
