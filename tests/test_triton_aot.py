"""Every launch variant of the Triton kernels compiles ahead of time for sm_80 and sm_90, down to
a cubin, on a machine without a GPU (`fastdiff.ops.triton_aot`). The other kernel tests run in
Triton's interpreter, which specialises nothing and so cannot see a variant that does not compile."""

from __future__ import annotations

import glob
import multiprocessing
import os
import warnings
from pathlib import Path

import pytest
import torch

from fastdiff.ops import triton_aot, triton_step

pytestmark = pytest.mark.skipif(not triton_step.available(), reason=str(triton_step.why_unavailable()))

ROOT = Path(__file__).resolve().parents[1]
ELF = b"\x7fELF"
KERNEL_NAMES = {"fused_step": "_fused_step_kernel", "gate": "_gate_kernel"}


def compile_summary(job):
    """Compile one (variant, arch) in a worker: what the tests check, or the error's text."""
    variant, arch, cache = job
    os.environ["TRITON_CACHE_DIR"] = cache
    # Triton 3.9 warns once per process that its FP-fusion default will change; the launchers
    # keep Triton's defaults, so the variants do too.
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    try:
        kernel = triton_aot.compile_variant(variant, arch)
    except Exception as exc:  # reported with the variant's label by the test
        return f"{type(exc).__name__}: {exc}"
    ptx_target = next(line.split()[1] for line in kernel.asm["ptx"].splitlines() if line.startswith(".target"))
    return {"name": kernel.metadata.name, "arch": kernel.metadata.target.arch, "ptx": ptx_target,
            "cubin": bytes(kernel.asm["cubin"][:4]), "size": len(kernel.asm["cubin"])}  # fmt: skip


@pytest.fixture(scope="module")
def variants():
    return triton_aot.variants()


@pytest.fixture(scope="module")
def compile_in_workers(tmp_path_factory):
    """compile_in_workers(jobs) -> compile_summary of each (variant, arch), in worker processes
    started without TRITON_INTERPRET (conftest sets it before Triton is imported here, and then
    Triton's own library is interpreted too) into a fresh Triton cache."""
    cache = str(tmp_path_factory.mktemp("triton-cache"))
    workers = max(1, min(len(os.sched_getaffinity(0)), 8))
    with pytest.MonkeyPatch.context() as env:
        env.delenv("TRITON_INTERPRET", raising=False)
        pool = multiprocessing.get_context("spawn").Pool(workers)  # starts every worker now
    with pool:
        yield lambda jobs: pool.map(compile_summary, [(v, arch, cache) for v, arch in jobs], chunksize=4)


@pytest.fixture(scope="module")
def compiled(variants, compile_in_workers):
    """{(label, arch): summary or error} for every variant and arch."""
    jobs = [(v, arch) for arch in triton_aot.ARCHS for v in variants]
    return {(v.label, arch): result for (v, arch), result in zip(jobs, compile_in_workers(jobs))}


@pytest.mark.parametrize("arch", triton_aot.ARCHS, ids=lambda a: f"sm_{a}")
def test_every_variant_compiles_to_a_cubin(arch, variants, compiled):
    failed = {v.label: compiled[v.label, arch] for v in variants if isinstance(compiled[v.label, arch], str)}
    assert not failed, f"{len(failed)} of {len(variants)} variants fail on sm_{arch}:\n" + "\n".join(
        f"{label}: {error}" for label, error in failed.items()
    )
    for v in variants:
        summary = compiled[v.label, arch]
        assert summary["cubin"] == ELF and summary["size"] > 1000, v.label
        assert summary["name"] == KERNEL_NAMES[v.spec.kernel], v.label
        assert summary["arch"] == arch and summary["ptx"].startswith(f"sm_{arch}"), (v.label, summary)


def test_a_batch_of_one_compiles_for_sm90(compile_in_workers):
    # Regression: Triton makes batch == 1 a constexpr, and `batch.to(tl.int64)` failed to
    # compile ("'int' object has no attribute 'to'"): every single-prompt sample on a GPU.
    launch = triton_aot.fused_step_launch(
        torch.float32, 8, guided=False, rows=False, out=False, stat=False, batch=1, computed=1
    )
    spec = triton_aot.specialise(launch)
    assert spec.ones == ("batch", "computed")
    [summary] = compile_in_workers([(spec, 90)])
    assert not isinstance(summary, str), summary
    assert summary["cubin"] == ELF and summary["name"] == "_fused_step_kernel"


def test_the_kernels_compile_with_a_specialised_step_index(compile_in_workers):
    # k is never specialised (do_not_specialize), but the kernel must not depend on that.
    launch = triton_aot.fused_step_launch(
        torch.float16, 8, guided=True, rows=True, out=True, stat=True, batch=1, computed=1, latent=(1,), k=1
    )
    spec = triton_aot.specialise(launch, jit_options={})
    assert set(spec.ones) == {"k", "n", "batch", "computed", "nblocks"}
    [summary] = compile_in_workers([(spec, 90)])
    assert not isinstance(summary, str), summary
    assert summary["cubin"] == ELF


def test_the_step_index_is_not_specialised():
    def spec(k):
        launch = triton_aot.fused_step_launch(
            torch.float32, 8, guided=False, rows=False, out=False, stat=False, batch=2, computed=2, k=k
        )
        return triton_aot.specialise(launch)

    assert spec(0) == spec(1) == spec(16) and dict(spec(1).types)["k"] == "i32"


@pytest.mark.parametrize("kernel", ["fused_step", "gate"])
def test_every_integer_argument_equal_to_one_is_compiled(kernel, variants):
    specs = [v.spec for v in variants if v.spec.kernel == kernel]
    integers = {name for s in specs for name, kind in s.types if kind == "i32"}
    frozen = set(triton_step.JIT_OPTIONS[kernel].get("do_not_specialize", ()))
    assert {name for s in specs for name in s.ones} == integers - frozen
    assert integers >= {"n", "nblocks"} and all(name not in s.ones for s in specs for name in frozen)


def test_every_dtype_flag_and_width_is_compiled(variants):
    steps = [dict(v.spec.constexprs) | dict(v.spec.types) for v in variants if v.spec.kernel == "fused_step"]
    flags = ("HAS_ROWS", "HAS_OUT", "HAS_STAT")
    seen = {(s["basis_ptr"], s["WIDTH"], s["HAS_W"], tuple(s[f] for f in flags)) for s in steps}
    for dtype in ("*fp16", "*bf16", "*fp32", "*fp64"):
        for width in triton_aot.SHIPPED_WIDTHS:
            for guided in (False, True):
                assert all((dtype, width, guided, f) in seen for f in triton_aot.LOOP_FLAGS), (dtype, width)
        assert all((dtype, w, True, (True,) * 3) in seen for w in triton_aot.WIDTHS)
    assert {tuple(s[f] for f in flags) for s in steps} == set(triton_aot.LOOP_FLAGS + triton_aot.OTHER_FLAGS)
    gates = {dict(v.spec.constexprs)["RBLOCK"] for v in variants if v.spec.kernel == "gate"}
    assert gates == {16 << i for i in range(triton_aot.MAX_GATE_BLOCKS.bit_length() - 4)}


def test_the_widths_cover_the_shipped_plans_and_the_solvers(sd_schedule):
    from fastdiff import solvers
    from fastdiff.plan import StepPlan
    from fastdiff.program import compile as compile_program

    plans = [StepPlan.load(path) for path in sorted(glob.glob(str(ROOT / "engines" / "*" / "plans" / "*-*.json")))]
    assert plans
    for name in solvers.VARIANTS:
        for steps in (4, 6, 10, 25, 39, 50):  # PNDM's widest rows come at 39 steps
            plans.append(solvers.build_variant(name, sd_schedule, steps))
    widths = {compile_program(plan).width for plan in plans}
    assert widths <= set(triton_aot.SHIPPED_WIDTHS) and max(widths) == max(triton_aot.SHIPPED_WIDTHS)


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_the_specialisations_are_those_of_the_installed_triton(variants):
    """Our copy of the JIT's rules (`specialise`, `source_arguments`) against Triton's own binder,
    where the installed Triton has the 3.9 internals to ask."""
    jit = pytest.importorskip("triton.runtime.jit")
    if not hasattr(jit, "create_function_from_signature") or not hasattr(jit.JITFunction, "_pack_args"):
        pytest.skip("the installed Triton's JIT has no create_function_from_signature/_pack_args to compare with")
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", 90, 32))
    # the kernels as JITFunctions, also where conftest made them interpreter wrappers
    kernels = {name: jit.JITFunction(k.fn, **triton_step.JIT_OPTIONS[name]) for name, k in triton_step.KERNELS.items()}
    scenarios = triton_aot.scenarios()
    assert len(scenarios) >= len(variants)
    for label, launch in scenarios:
        fn = kernels[launch.kernel]
        binder = jit.create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*launch.args, **launch.constexprs)
        packed = fn._pack_args(backend, dict(launch.constexprs), bound, specialization, options)
        _, signature, constexprs, attrs = packed
        want = triton_aot.source_arguments(triton_aot.specialise(launch))
        assert (signature, constexprs, {k: v for k, v in attrs.items() if v}) == want, label
