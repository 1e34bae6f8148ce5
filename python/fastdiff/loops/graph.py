"""The graph loop: the whole sampling loop — every model call and fused step — as one CUDA graph.

What is captured is the reference loop itself (`fastdiff.loops.reference`), which without a
gate is device work only, once per (program, batch, size, dtype, conditioning layout) in the
engine's graph cache (`fastdiff.engines.graphs.GraphCache`). x_T, the raw_fn's conditioning
tensors and the guidance weights are the graph's static inputs; a replay copies new values into
them. The model inside the graph must run without graphs of its own: a raw_fn offers that by
`capture_inputs()` (its tensors) and `captured(inputs)` (a twin over the static copies, its
modules called without graphs), as `fastdiff.denoisers.GuidedDenoiser` does; any other callable
is captured as it is, with no tensors of its own.

What one graph cannot do runs as the reference loop (the modules still replay their per-call
graphs): a gate (its decisions need the host to compact the batch), a callback, a stochastic
program (its noise comes from the caller's generator on the host), and a loop that
failed to capture once (something in the model synchronises), which is reported once as a
RuntimeWarning and in `notes`.
"""

from __future__ import annotations

import warnings

from ..graphs import CaptureError
from . import reference
from .contract import LoopResult, check_inputs, guidance_weights

name = "graph"


class GraphLoop:
    name = name

    def __init__(self, graphs, *, impl: str = "auto"):
        """graphs: a `GraphCache` (the engine's, shared with its module graphs)."""
        self.graphs = graphs
        self.impl = impl
        self.uncapturable: str | None = None  # why the loop could not be captured, once known
        self.notes: list[str] = []

    def run(self, program, raw_fn, x_T, *, guidance=None, gate=None, callback=None, noise=None) -> LoopResult:
        check_inputs(program, x_T, gate)
        if gate is not None or callback is not None or program.stochastic or self.uncapturable:
            return reference.run(
                program, raw_fn, x_T, guidance=guidance, gate=gate, callback=callback, impl=self.impl, noise=noise
            )
        try:
            latents = self._replay(program, raw_fn, x_T, guidance)
        except CaptureError as exc:
            self.uncapturable = f"the sampling loop could not be captured whole: {exc}"
            self.notes.append(self.uncapturable)
            warnings.warn(f"fastdiff: {self.uncapturable}", RuntimeWarning, stacklevel=2)
            return reference.run(program, raw_fn, x_T, guidance=guidance, impl=self.impl)
        return LoopResult.ungated(latents, program.num_steps)

    def _replay(self, program, raw_fn, x_T, guidance):
        """The captured loop's result for these inputs (the cache returns a copy of the graph's output)."""
        inputs = tuple(raw_fn.capture_inputs()) if hasattr(raw_fn, "capture_inputs") else ()
        w = guidance_weights(guidance, x_T)
        count = len(inputs)
        impl = self.impl

        def sampling_loop(x_T, *rest):
            static = raw_fn.captured(rest[:count]) if count else raw_fn
            weights = rest[count] if w is not None else None
            return reference.run(program, static, x_T, guidance=weights, impl=impl).latents

        args = (x_T, *inputs) + ((w,) if w is not None else ())
        key = ("loop", program.key, getattr(raw_fn, "capture_key", None))
        return self.graphs.run(sampling_loop, args, extra=key)
