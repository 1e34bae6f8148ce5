"""Ahead-of-time compilation of every launch variant of the Triton kernels in `triton_step`.

Triton compiles one kernel per specialisation of a launch: the constexprs, each pointer's element
type and, unasked, each integer's value (1 becomes a constexpr, a multiple of 16 an alignment
hint) and each pointer's 16-byte alignment. The interpreter the CPU tests run the kernels in
specialises nothing, so a variant that does not compile (an integer equal to 1 used as a tensor,
which is every batch of one) shows only on a GPU. Here:

- `variants()` enumerates the launches the ops can make, each built by the launchers themselves
  (`step_launch`, `gate_launch`) on meta tensors and reduced to its specialisation by the rules
  of Triton's JIT (`specialise`); launches with equal specialisations are kept once;
- `compile_variant(variant, arch)` compiles one for a CUDA compute capability down to a cubin
  with the ptxas bundled with Triton: no GPU is needed, but a process whose Triton was imported
  without TRITON_INTERPRET (the interpreter replaces Triton's own library too).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import numpy as np
import torch

from ..dtypes import compute_dtype
from ..plan import StepPlan
from ..program import Program
from . import triton_step
from .triton_step import JIT_OPTIONS, KERNELS, STEP_DTYPES, gate_launch, step_launch

ARCHS = (80, 90)  # compute capabilities checked: A100 (sm_80) and H100/H200 (sm_90)

# Table widths (`Program.width`, a multiple of program.MIN_WIDTH: the most terms of a row). On the
# SD schedule every solver variant fits in 8 except PNDM, whose warm-up rows reach 11 terms at
# some step counts (e.g. 39, 121): 16 (scanned at 1-200, 250, 300, 400, 500 and 999 steps); the
# shipped plans (engines/*/plans, OLSS with up to 10 calls) reach 16 too. An OLSS plan with N
# calls can need N terms, so its width is N rounded up to 8 and has no bound: 24 and 32 cover
# plans calibrated with up to 32 calls, and a wider plan launches a variant not compiled here.
WIDTHS = (8, 16, 24, 32)
SHIPPED_WIDTHS = (8, 16)  # solvers and shipped plans: compiled with every flag combination

# Latents of one sample, by what Triton sees: SD's 4x64x64 (n and its 16 blocks are multiples of
# 16), an odd one of one block (nblocks = 1) and a single element (n = nblocks = 1).
LATENT = (4, 64, 64)
LATENTS = (LATENT, (3, 5, 7), (1,))

# (HAS_ROWS, HAS_OUT, HAS_STAT) the op accepts: rows (a compacted batch) need out (the skipped
# samples' previous output). The loops (reference, graph; calibration runs them too) pass three:
# no gate, a gate with every sample computed, a gate with some skipped. The other three come only
# from a direct call of `fastdiff.ops.fused_step`.
LOOP_FLAGS = ((False, False, False), (False, True, True), (True, True, True))
OTHER_FLAGS = ((False, False, True), (False, True, False), (True, True, False))

# The gate reduces a decision group's blocks (one sample's, or the batch's for a per-batch gate)
# in one program of RBLOCK = max(16, next power of two) lanes. Up to 2^24 elements a group
# (a batch of 16 latents of 2^20 elements) that is at most 2^14 lanes.
MAX_GATE_BLOCKS = 2**14

_POINTEE = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int32: "i32",
    torch.int8: "i8",
}


@dataclass(frozen=True)
class Specialisation:
    """What Triton compiles a launch into: the key of one compiled kernel."""

    kernel: str  # key of triton_step.KERNELS
    types: tuple[tuple[str, str], ...]  # (runtime parameter, Triton type), in the kernel's order
    constexprs: tuple[tuple[str, object], ...]  # the declared constexpr parameters
    ones: tuple[str, ...]  # integer parameters equal to 1, which Triton makes constexprs
    divisible: tuple[str, ...]  # parameters with the divisible-by-16 hint (pointers: aligned)


@dataclass(frozen=True)
class Variant:
    label: str  # the first launch found with this specialisation, in words
    spec: Specialisation


def _argument(value, specialise: bool) -> tuple[str, bool, bool]:
    """(Triton type, equal to 1, divisible by 16) of a runtime argument, as Triton's JIT
    specialises it (runtime/jit.py, specialize_impl); do_not_specialize turns the last two off."""
    if isinstance(value, torch.Tensor):
        return "*" + _POINTEE[value.dtype], False, specialise and value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        raise TypeError("a bool kernel argument: pass int() of it, as the launchers do")
    if isinstance(value, int):
        if specialise and value == 1:
            return "i32", True, False
        kind = "i32" if -(2**31) <= value < 2**31 else "u64" if value >= 2**63 else "i64"
        return kind, False, specialise and value % 16 == 0
    if isinstance(value, float):
        return "fp32", False, False
    raise TypeError(f"no Triton specialisation for a kernel argument of type {type(value).__name__}")


def _parameters(kernel: str) -> list[str]:
    return list(inspect.signature(KERNELS[kernel].fn).parameters)


def specialise(launch: triton_step.Launch, jit_options: dict | None = None) -> Specialisation:
    """The specialisation of a launch under the kernel's JIT options (`triton_step.JIT_OPTIONS`
    unless given)."""
    options = JIT_OPTIONS[launch.kernel] if jit_options is None else jit_options
    frozen = set(options.get("do_not_specialize", ()))
    names = _parameters(launch.kernel)
    runtime, declared = names[: len(launch.args)], names[len(launch.args) :]
    if sorted(declared) != sorted(launch.constexprs):
        raise ValueError(f"{launch.kernel}: constexprs {sorted(launch.constexprs)}, the kernel declares {declared}")
    types, ones, divisible = [], [], []
    for name, value in zip(runtime, launch.args):
        kind, one, div = _argument(value, name not in frozen)
        types.append((name, kind))
        if one:
            ones.append(name)
        if div:
            divisible.append(name)
    constexprs = tuple((name, launch.constexprs[name]) for name in declared)
    return Specialisation(launch.kernel, tuple(types), constexprs, tuple(ones), tuple(divisible))


# ------------------------------------------------------------------------------- enumeration
@functools.lru_cache(maxsize=None)
def _program(width: int) -> Program:
    """A one-call Program with tables `width` wide: their values do not matter to the compiler."""
    return Program(
        plan=StepPlan([999.0], [[1.0, 0.0], [0.0, 1.0]], "epsilon"),
        num_rows=2,
        width=width,
        dst=np.array([[1, 0]], np.int32),
        src=np.full((1, 2, width), -1, np.int32),
        coef=np.zeros((1, 2, width)),
        gcoef=np.ones((1, 2)),
        x_row=np.zeros(1, np.int32),
        init_row=0,
        init_coef=1.0,
        result_row=0,
        max_error=0.0,
    )


def _meta(shape, dtype, aligned: bool = True) -> torch.Tensor:
    """A contiguous meta tensor; unaligned: starting one element past a 16-byte boundary."""
    if aligned:
        return torch.empty(shape, dtype=dtype, device="meta")
    return torch.empty(int(np.prod(shape)) + 1, dtype=dtype, device="meta")[1:].view(shape)


def fused_step_launch(dtype, width, *, guided, rows, out, stat, batch, computed, latent=LATENT, k=0, aligned=True):
    """`step_launch` of call k for meta tensors: `computed` of `batch` samples in the model output
    (all of them without rows), `stat` = the gate's partial sums wanted."""
    if not rows and computed != batch:
        raise ValueError(f"without rows the model output holds the whole batch of {batch}, not {computed}")
    program = _program(width)
    basis = _meta((program.num_rows, batch, *latent), dtype, aligned)
    raw = _meta(((2 if guided else 1) * computed, *latent), dtype, aligned)
    guidance = _meta((batch,), torch.float32, aligned) if guided else None
    rows_ = _meta((batch,), torch.int32, aligned) if rows else None
    out_ = _meta((2, batch, *latent), dtype, aligned) if out else None
    reuse = _meta((program.num_steps, 2), compute_dtype(dtype), aligned) if out else None
    partials = _meta((batch, triton_step.num_blocks(basis)), torch.float32, aligned) if stat else None
    return step_launch(k, raw, guidance, basis, program, rows=rows_, out=out_, partials=partials, reuse=reuse)


def decision_launch(nblocks, n, *, active, max_skips=4, refresh=2, groups=2):
    """`gate_launch` for meta tensors: `groups` decision groups of `nblocks` partial sums over n elements."""
    partials = torch.empty(groups, nblocks, dtype=torch.float32, device="meta")
    state = [torch.empty(groups, dtype=dt, device="meta") for dt in (torch.float32, torch.float32, torch.int32)]
    flags = torch.empty(groups, dtype=torch.int8, device="meta")
    return gate_launch(partials, n, *state, flags, active=active, delta=0.01, max_skips=max_skips, refresh=refresh)


def _step_scenarios():
    """(label, launch) for the fused step. A variant's code depends on the dtype, the flags
    (which blocks of the kernel exist), the width (how often the table loop is unrolled) and
    which integers are constexprs; the scenarios cross what interacts:

    1. every dtype x guided or not x the loops' flags x the widths of the solvers and the shipped
       plans, at SD's latent, batch 2 (3 with rows, 2 of them computed);
    2. the flags only a direct call passes, guided or not, at float32 and width 8: they select
       other subsets of the same blocks, which 1 compiles at every dtype;
    3. the OLSS widths beyond, at every dtype with every flag on: the largest kernel of a width;
    4. every combination of integers equal to 1 a launch can have (batch, computed, n, nblocks:
       nblocks is 1 whenever n is, computed is batch without rows; the step index k is never
       specialised), guided or not, with the loops' flags (HAS_W decides whether computed is
       read, HAS_STAT nblocks, HAS_ROWS whether computed can differ from batch), at float32 and
       width 8: neither the dtype nor the width changes the code that reads the integers;
    5. every dtype with every flag on and every pointer unaligned (a caller's views).
    """
    for width in SHIPPED_WIDTHS:
        for dtype in STEP_DTYPES:
            for guided in (False, True):
                for flags in LOOP_FLAGS:
                    yield _step(dtype, width, guided, flags)
    for guided in (False, True):
        for flags in OTHER_FLAGS:
            yield _step(torch.float32, 8, guided, flags)
    for width in WIDTHS:
        if width not in SHIPPED_WIDTHS:
            for dtype in STEP_DTYPES:
                yield _step(dtype, width, True, (True, True, True))
    for guided in (False, True):
        for flags in LOOP_FLAGS:
            counts = ((3, 2), (3, 1), (1, 0), (1, 1)) if flags[0] else ((2, 2), (1, 1))
            for batch, computed in counts:
                for latent in LATENTS:
                    yield _step(torch.float32, 8, guided, flags, batch=batch, computed=computed, latent=latent)
    for dtype in STEP_DTYPES:
        yield _step(dtype, 8, True, (True, True, True), aligned=False)


def _step(dtype, width, guided, flags, *, batch=None, computed=None, latent=LATENT, aligned=True):
    """(label, launch) of one fused-step scenario: by default batch 2, or 3 with rows of which 2
    are computed."""
    rows, out, stat = flags
    batch = batch or (3 if rows else 2)
    computed = computed if computed is not None else (2 if rows else batch)
    launch = fused_step_launch(
        dtype, width, guided=guided, rows=rows, out=out, stat=stat, batch=batch, computed=computed, latent=latent,
        aligned=aligned,
    )  # fmt: skip
    on = [name for name, flag in zip(("w", "rows", "out", "stat"), (guided, *flags)) if flag]
    words = [_POINTEE[dtype], f"W{width}", *on, f"batch={batch}", f"computed={computed}"]
    words.append("latent=" + "x".join(map(str, latent)))
    return " ".join(words + ([] if aligned else ["unaligned pointers"])), launch


def _gate_scenarios():
    """(label, launch) for the gate's decision kernel (its pointers' dtypes are fixed):

    1. every RBLOCK the launcher chooses up to MAX_GATE_BLOCKS blocks, for an active call (the
       common case; `active` = 1 is a constexpr): RBLOCK only widens the reduction;
    2. every combination of integers equal to 1 (nblocks, n, active, max_skips, refresh: 1 for
       copied reuse, 2 for extrapolated; nblocks is 1 whenever n is) at RBLOCK 16.
    """
    nblocks = 16
    while nblocks <= MAX_GATE_BLOCKS:
        yield _gate(nblocks, nblocks * 1024, True, 4, 2)
        nblocks *= 2
    for nblocks, n in ((5, 5 * 1024 - 3), (1, 105), (1, 1)):
        for active in (False, True):
            for max_skips in (4, 1):
                for refresh in (2, 1):
                    yield _gate(nblocks, n, active, max_skips, refresh)


def _gate(nblocks, n, active, max_skips, refresh):
    launch = decision_launch(nblocks, n, active=active, max_skips=max_skips, refresh=refresh)
    words = (
        f"RBLOCK={launch.constexprs['RBLOCK']} nblocks={nblocks} n={n} active={int(active)} max_skips={max_skips}"
        f" refresh={refresh}"
    )
    return words, launch


def scenarios() -> list[tuple[str, triton_step.Launch]]:
    """(label, launch) of every scenario of both kernels (see `_step_scenarios`, `_gate_scenarios`)."""
    if not triton_step.available():
        raise RuntimeError(f"triton_aot: {triton_step.why_unavailable()}")
    steps = [(f"fused_step {words}", launch) for words, launch in _step_scenarios()]
    return steps + [(f"gate {words}", launch) for words, launch in _gate_scenarios()]


def variants() -> list[Variant]:
    """Every specialisation of the two kernels that the launchers can produce, each once (with
    the label of its first scenario)."""
    found: dict[Specialisation, Variant] = {}
    for label, launch in scenarios():
        spec = specialise(launch)
        found.setdefault(spec, Variant(label, spec))
    return list(found.values())


# ---------------------------------------------------------------------------------- compiling
def _jit_function(kernel: str):
    """The kernel's JITFunction. Under TRITON_INTERPRET=1 at Triton's import the kernels and
    Triton's own library (tl.sum, ...) are interpreter wrappers, which do not compile."""
    from triton.runtime.jit import JITFunction

    fn = KERNELS[kernel]
    if not isinstance(fn, JITFunction):
        raise RuntimeError(
            "triton_aot: Triton was imported with TRITON_INTERPRET=1, so the kernels and Triton's own library "
            "are interpreter wrappers; compile ahead of time in a process started without TRITON_INTERPRET"
        )
    return fn


def source_arguments(spec: Specialisation) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of a specialisation as Triton >= 3.3 takes them (and its JIT
    makes them): every parameter in the signature, "constexpr" for the constexprs and the integers
    equal to 1; constexprs and attrs keyed by (parameter index,)."""
    index = {name: i for i, name in enumerate(_parameters(spec.kernel))}
    ones = set(spec.ones)
    signature = {name: "constexpr" if name in ones else kind for name, kind in spec.types}
    signature |= {name: "constexpr" for name, _ in spec.constexprs}
    constexprs = {(index[name],): value for name, value in spec.constexprs}
    constexprs |= {(index[name],): 1 for name in spec.ones}
    attrs = {(index[name],): [["tt.divisibility", 16]] for name in spec.divisible}
    return signature, constexprs, attrs


def _source(spec: Specialisation):
    """The ASTSource of a specialisation for the installed Triton: `source_arguments` for
    Triton >= 3.3; Triton 3.2 takes the runtime parameters only (an integer equal to 1 keeps its
    type), constants by name and an AttrsDescriptor that lists the integers equal to 1."""
    from triton.compiler import ASTSource

    fn = _jit_function(spec.kernel)
    if "constexprs" in inspect.signature(ASTSource).parameters:
        return ASTSource(fn, *source_arguments(spec))
    from triton.backends.compiler import AttrsDescriptor

    index = {name: i for i, name in enumerate(_parameters(spec.kernel))}
    constants = dict(spec.constexprs) | {name: 1 for name in spec.ones}
    properties = {
        "tt.divisibility": [index[name] for name in spec.divisible],
        "tt.equal_to": [index[name] for name in spec.ones],
    }
    attrs = AttrsDescriptor.from_dict({"arg_properties": properties, "cls": AttrsDescriptor.__name__})
    return ASTSource(fn, dict(spec.types), constants, attrs)


def compile_variant(variant: Variant | Specialisation, arch: int):
    """Compile a variant for CUDA compute capability `arch` (80 = sm_80) down to a cubin, with
    the launchers' options (Triton's defaults); returns Triton's CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget

    spec = variant.spec if isinstance(variant, Variant) else variant
    return triton.compile(_source(spec), target=GPUTarget("cuda", arch, 32))
