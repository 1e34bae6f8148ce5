"""Loops: run a Program — `run(program, raw_fn, x_T, *, guidance, gate, callback) -> LoopResult`
(`fastdiff.loops.contract`). One implementation per way of driving it:

- reference: eager, the fused step after every call (Triton on a GPU, torch on the CPU),
  per-sample batch compaction under the gate (`fastdiff.loops.reference`);
- graph: the reference loop captured whole into one CUDA graph (`fastdiff.loops.graph`);
- cpp: the loop in C++ (`fastdiff.loops.cpp`), CPU float32.

Engines choose one at construction (`create`, "auto" = graph when the engine captures graphs,
else reference); sampling, calibration, the diffusers scheduler and the benches all run through
this contract. Loops never see a StepPlan, only its compiled Program.
"""

from __future__ import annotations

from . import cpp, graph, reference
from .contract import Callback, LoopResult, ModelOutputError, RawFn

LOOPS = ("reference", "graph", "cpp")
CHOICES = ("auto", *LOOPS)

__all__ = ["CHOICES", "LOOPS", "Callback", "LoopResult", "ModelOutputError", "RawFn", "create", "why_unavailable"]


class _Module:
    """A stateless loop module as a loop object (name, run, notes)."""

    def __init__(self, module):
        self.name = module.name
        self.run = module.run
        self.notes: list[str] = []


def why_unavailable(name: str, device=None, dtype=None, graphs=None) -> str | None:
    """None when loop `name` can run here, else the reason. graphs: the engine's graph cache
    (None when its backend captures no graphs)."""
    if name == "reference":
        return None
    if name == "graph":
        if graphs is None:
            return "the graph loop captures CUDA graphs: it needs a cuda_graph or compiled backend on a GPU"
        return None
    if name == "cpp":
        return cpp.why_unavailable(device, dtype)
    raise ValueError(f"unknown loop {name!r}: expected one of {', '.join(CHOICES)}")


def create(name: str, *, device=None, dtype=None, graphs=None):
    """The loop object for `name` ("auto": graph when `graphs` is given, else reference); a
    ValueError names why an explicit choice cannot run here."""
    if not isinstance(name, str) or name not in CHOICES:
        raise ValueError(f"unknown loop {name!r}: expected one of {', '.join(CHOICES)}")
    if name == "auto":
        name = "graph" if graphs is not None else "reference"
    reason = why_unavailable(name, device, dtype, graphs)
    if reason is not None:
        raise ValueError(f"loop {name!r} is unavailable: {reason}")
    if name == "graph":
        return graph.GraphLoop(graphs)
    return _Module(reference if name == "reference" else cpp)
