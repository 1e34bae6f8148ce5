"""The reference loop: a Program run eagerly, one fused step after every model call.

The loop body is the update equation and nothing else: call the model on row x_row[k], then
`fused_step` (guidance, the call's two table rows, the gate statistic), then the gate's
decision for the next call. The fused step is the Triton kernel on a GPU and the torch reference
on the CPU (`impl`), so the CPU runs the code GPU users run. Without a gate nothing reads device
memory back and nothing is copied from the host, so the same code is what the graph loop
captures. A stochastic Program adds fresh noise to the row written after a call (`noise`).
With a gate the flags are read once per call to compact the batch: the model sees only the
samples that need the call (`_Compaction`), the others take the gate's prediction from their
last two outputs (GateSpec.reuse).

`steps` is the loop as a generator (it yields each model call and receives the raw output), so
a caller that owns the model calls — diffusers' pipeline loop driving `PlanScheduler` — runs the
same loop; `run` drives it with a raw_fn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..gate import GateSpec
from ..ops.step import fused_step, resolve_impl
from ..program import Program
from .contract import Callback, LoopResult, NoiseFn, RawFn, check_inputs, checked_raw, fresh_noise, guidance_weights

name = "reference"


@dataclass
class ModelCall:
    """What the loop asks of the model at call k: raw output for x at t (samples `index`)."""

    k: int
    x: torch.Tensor
    t: torch.Tensor
    index: torch.Tensor | None


def run(
    program: Program,
    raw_fn: RawFn,
    x_T: torch.Tensor,
    *,
    guidance=None,
    gate: GateSpec | None = None,
    callback: Callback | None = None,
    impl: str = "auto",
    noise: NoiseFn | None = None,
) -> LoopResult:
    """The loop contract (`fastdiff.loops.contract`) with the model behind raw_fn."""
    loop = steps(program, x_T, guidance=guidance, gate=gate, callback=callback, impl=impl, noise=noise)
    with torch.no_grad():
        call = next(loop)
        while True:
            try:
                call = loop.send(raw_fn(call.x, call.t, call.index))
            except StopIteration as done:
                return done.value


def steps(program, x_T, *, guidance=None, gate=None, callback=None, impl="auto", noise=None):
    """The loop as a generator: yields a ModelCall per model call, expects its raw output sent
    back, and returns the LoopResult (StopIteration.value)."""
    check_inputs(program, x_T, gate)
    impl = resolve_impl(impl, x_T.device)
    batch = x_T.shape[0]
    per_row = 1 if guidance is None else 2
    with torch.no_grad():  # never across a yield: the caller's code runs between them
        w = guidance_weights(guidance, x_T)
        times = program.tables(x_T.device, x_T.dtype).times[:, None].expand(-1, batch).contiguous()
        basis = torch.empty((program.num_rows, *x_T.shape), dtype=x_T.dtype, device=x_T.device)
        torch.mul(x_T, program.init_coef, out=basis[program.init_row])
    compaction = _Compaction(gate, basis, program, impl) if gate is not None else None
    for k in range(program.num_steps):
        x = basis[int(program.x_row[k])]
        if compaction is None:
            raw, rows, computed = (yield ModelCall(k, x, times[k], None)), None, batch
        else:
            raw, rows, computed = yield from compaction.call(k, x, times[k])
        if computed:
            raw = checked_raw(raw, computed * per_row, x, k)
        with torch.no_grad():
            fused_step(k, raw, w, basis, program, rows=rows, impl=impl, **(compaction.buffers() if compaction else {}))
            if program.noise is not None and program.noise[k] != 0:
                row = basis[int(program.dst[k, 1])]
                row.add_(fresh_noise(noise, k, row), alpha=float(program.noise[k]))
            if compaction is not None and k + 1 < program.num_steps:
                compaction.decide(k + 1)
        if callback is not None:
            callback(k, times[k], basis[int(program.dst[k, 1])])
    latents = basis[program.result_row].clone()
    if compaction is None:
        return LoopResult.ungated(latents, program.num_steps)
    return LoopResult(latents, compaction.nfe, compaction.unet_calls, compaction.skipped)


class _Compaction:
    """The gate inside the reference loop: its decision state (one group per sample, or one for
    the batch) and the compaction of each call to the samples that need it."""

    def __init__(self, gate: GateSpec, basis: torch.Tensor, program: Program, impl: str):
        batch, device = basis.shape[1], basis.device
        self.gate, self.batch = gate, batch
        groups = batch if gate.per_sample else 1
        self.d1 = torch.zeros(groups, dtype=torch.float32, device=device)
        self.d2 = torch.zeros_like(self.d1)
        self.run = torch.zeros(groups, dtype=torch.int32, device=device)
        self.out = basis.new_empty((2, *basis.shape[1:]))  # each sample's last two guided outputs (call k: out[k % 2])
        self.reuse = program.reuse_table(device, basis.dtype, gate.reuse)  # a skipped call's row
        self.elements = basis[0, 0].numel()
        if impl == "triton":
            from ..ops.triton_step import num_blocks

            self.stat, self.partials = None, torch.empty(batch, num_blocks(basis), dtype=torch.float32, device=device)
        else:
            self.stat, self.partials = torch.empty(batch, dtype=torch.float32, device=device), None
        self.skip = [False] * batch  # host flags for the next call
        self.nfe, self.skipped, self.unet_calls = [0] * batch, [[] for _ in range(batch)], 0

    def buffers(self) -> dict:
        return {"out": self.out, "stat": self.stat, "partials": self.partials, "reuse": self.reuse}

    def call(self, k: int, x: torch.Tensor, t: torch.Tensor):
        """Yield the model call for the samples that compute call k; returns (raw output, rows
        for the fused step, samples computed)."""
        index = [b for b in range(self.batch) if not self.skip[b]]
        for b in range(self.batch):
            if self.skip[b]:
                self.skipped[b].append(k)
            else:
                self.nfe[b] += 1
        if index:
            self.unet_calls += 1
        if len(index) == self.batch:
            return (yield ModelCall(k, x, t, None)), None, self.batch
        rows_host = [-1] * self.batch
        for r, b in enumerate(index):
            rows_host[b] = r
        rows = torch.tensor(rows_host, dtype=torch.int32, device=x.device)
        if not index:
            return x.new_empty((0, *x.shape[1:])), rows, 0
        sel = torch.tensor(index, dtype=torch.long, device=x.device)
        return (yield ModelCall(k, x.index_select(0, sel), t.index_select(0, sel), sel)), rows, len(index)

    def decide(self, call: int) -> None:
        """The gate's decision for model call `call` from the step's statistic (one host read)."""
        gate = self.gate
        if self.partials is not None:
            from ..ops.triton_step import gate_decide

            per_group = self.partials if gate.per_sample else self.partials.view(1, -1)
            n = self.elements * (1 if gate.per_sample else self.batch)
            flags = torch.empty(self.run.shape, dtype=torch.int8, device=self.run.device)
            gate_decide(
                per_group,
                n,
                self.d1,
                self.d2,
                self.run,
                flags,
                active=gate.active(call),
                delta=gate.delta,
                max_skips=gate.max_skips,
                refresh=gate.refresh,
            )
            flags = flags.view(torch.bool)
        else:
            d = self.stat if gate.per_sample else self.stat.mean().reshape(1)
            flags, self.d1, self.d2, self.run = gate.decide(call, d, self.d1, self.d2, self.run)
        host = flags.tolist()
        self.skip = host if gate.per_sample else host * self.batch
