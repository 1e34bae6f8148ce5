"""CUDA-graph capture of calls (engine modules, and the whole sampling loop): static input buffers,
one graph per input signature, a bounded LRU cache, recapture on any mismatch.

A captured call replays the kernels recorded at capture time on the same memory: its inputs
are copied into static buffers first and its output is a static buffer that the next replay
of the same graph overwrites. `GraphCache.run` therefore holds the cache's lock from the copy
in to a copy of the output, so that engines may be called from several threads: two threads
never capture the same key twice, never interleave their inputs in one graph's buffers, and
each gets its own result. On a GPU the next caller's stream also waits for the previous
replay's copies (an event), whatever stream each thread uses. The cache key is everything that changes which kernels run or
where they read: the shape, dtype, device and strides of every tensor input plus a caller's
`extra` key (e.g. the plan's hash for a captured sampling loop), so a different resolution,
batch or plan gets its own graph and never replays a wrong one.

mode "cuda" captures real graphs (torch.cuda.CUDAGraph); mode "emulate" keeps the same buffer
semantics (static inputs, one static output per signature, LRU eviction) but runs the function
eagerly on each call: it lets the CPU test suite exercise everything around the capture, and
it is never what a user gets from a backend on a machine without CUDA.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch

MODES = ("cuda", "emulate")


class CaptureError(RuntimeError):
    """A function could not be captured into a CUDA graph."""


def signature(args: tuple) -> tuple:
    """The part of a call that a graph depends on: per tensor its shape, dtype, device, strides."""
    sig = []
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"graph inputs must be tensors; argument {i} is {type(a).__name__}")
        sig.append((tuple(a.shape), a.dtype, a.device, a.stride()))
    return tuple(sig)


def _outputs(out) -> tuple[torch.Tensor, ...]:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    if not outs or not all(isinstance(o, torch.Tensor) for o in outs):
        raise CaptureError(f"a captured function must return a tensor or a tuple of tensors, got {type(out).__name__}")
    return tuple(outs)


class StaticCall:
    """fn captured for one input signature: __call__ copies the inputs in, replays, and returns
    the static output (a tensor or tuple, overwritten by this graph's next replay). Not
    thread-safe by itself: `GraphCache` serialises its calls."""

    def __init__(self, fn: Callable, example: tuple, *, mode: str = "cuda", warmup: int = 2):
        if mode not in MODES:
            raise ValueError(f"graph mode must be one of {MODES}, got {mode!r}")
        self.fn = fn
        self.mode = mode
        self.inputs = tuple(a.detach().clone() for a in example)
        self.graph = None
        with torch.no_grad():
            if mode == "cuda":
                self._capture(warmup)
            else:
                out = fn(*self.inputs)
                self._tuple = isinstance(out, (tuple, list))
                self.outputs = tuple(o.clone() for o in _outputs(out))

    def _capture(self, warmup: int) -> None:
        device = self.inputs[0].device if self.inputs else torch.device("cuda", torch.cuda.current_device())
        if device.type != "cuda":
            raise CaptureError(f"CUDA graphs capture work on a CUDA device; the inputs are on {device}")
        # Warm up on a side stream (lazy initialisation, cuDNN/cuBLAS workspaces, torch.compile's
        # first call), as torch.cuda.graph's documentation asks, then capture.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(max(1, warmup)):
                self.fn(*self.inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                out = self.fn(*self.inputs)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            raise CaptureError(
                f"capturing {getattr(self.fn, '__name__', 'the function')} into a CUDA graph failed: {exc}. "
                "Something in it synchronises with the host or allocates from pageable memory; "
                "use backend='eager' (or 'compiled' without graphs) for this model"
            ) from exc
        self._tuple = isinstance(out, (tuple, list))
        self.outputs = _outputs(out)

    def __call__(self, *args):
        for buf, a in zip(self.inputs, args, strict=True):
            if a is not buf:
                buf.copy_(a)
        if self.graph is not None:
            self.graph.replay()
        else:
            with torch.no_grad():
                for buf, o in zip(self.outputs, _outputs(self.fn(*self.inputs)), strict=True):
                    buf.copy_(o)
        return self.outputs if self._tuple else self.outputs[0]


class GraphCache:
    """Captured calls keyed on (extra, signature(args)), at most max_graphs (least recently used
    evicted: each graph holds its own memory pool).

    run(fn, args, extra=key) replays the graph captured for that key, capturing fn on a miss,
    and returns a copy of its output; fn must compute the same thing for every call with the
    same key (put whatever else it depends on into `extra`). Safe to call from several threads
    (one lock per cache; see the module's docstring).
    """

    def __init__(self, name: str, *, max_graphs: int = 4, mode: str = "cuda", warmup: int = 2):
        if mode not in MODES:
            raise ValueError(f"graph mode must be one of {MODES}, got {mode!r}")
        if not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be an integer >= 1, got {max_graphs!r}")
        self.name = name
        self.mode = mode
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.graphs: OrderedDict[Hashable, StaticCall] = OrderedDict()
        self.captures = self.replays = self.evictions = 0
        # Reentrant: a captured function may itself call through the cache (while capturing).
        self._lock = threading.RLock()
        self._done = None  # CUDA event after the last replay's output copies (mode "cuda")

    def __len__(self) -> int:
        return len(self.graphs)

    def run(self, fn: Callable, args: tuple, *, extra: Hashable = ()):
        """fn(*args) through the graph captured for (extra, signature(args)): a copy of the
        graph's output (a tensor or a tuple of tensors), the caller's to keep."""
        key = (extra, signature(args))
        device = args[0].device if args else None
        with self._lock:
            if self.mode == "cuda" and self._done is not None:
                torch.cuda.current_stream(device).wait_event(self._done)
            call = self.graphs.get(key)
            if call is None:
                call = self._capture(fn, args)
                self.graphs[key] = call
                self.captures += 1
                while len(self.graphs) > self.max_graphs:
                    self.graphs.popitem(last=False)
                    self.evictions += 1
            else:
                self.graphs.move_to_end(key)
            self.replays += 1
            out = call(*args)
            copied = tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()
            if self.mode == "cuda":
                self._done = torch.cuda.Event()
                self._done.record(torch.cuda.current_stream(device))
            return copied

    def _capture(self, fn: Callable, args: tuple) -> StaticCall:
        try:
            return StaticCall(fn, args, mode=self.mode, warmup=self.warmup)
        except torch.OutOfMemoryError:
            if not self.graphs:
                raise
            # The other graphs' pools may be what is missing: drop them and try once more.
            self.clear()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return StaticCall(fn, args, mode=self.mode, warmup=self.warmup)

    def clear(self) -> None:
        """Drop every captured graph (and its memory pool)."""
        with self._lock:
            self.evictions += len(self.graphs)
            self.graphs.clear()

    def stats(self) -> dict:
        return {
            "graphs": len(self.graphs),
            "captures": self.captures,
            "replays": self.replays,
            "evictions": self.evictions,
        }
