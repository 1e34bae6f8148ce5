"""Fused-step kernel benchmark for a lent GPU: achieved bandwidth against a device copy of the same
bytes, time against the torch reference of the same step (guidance, the program's rows and the
gate statistic as separate torch ops) and kernel launches per step (profiler count).

    python bench/gpu_kernels.py --out $OUT/gpu_kernels.json            # on a GPU
    TRITON_INTERPRET=1 python bench/gpu_kernels.py --device cpu --tiny --out k.json   # smoke test

The step measured is call k of a real plan (DPM-Solver++(2M), 20 steps, a call with two live
columns) under classifier-free guidance with the gate's output buffer and statistic: it reads
the 2×batch UNet output, the live columns and writes the output slot, the next input and g.
Bytes counted are the ones the kernel must move (each tensor read or written once).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time

import torch

SIZES = [  # (batch, channels, height, width) of the latent
    (1, 4, 64, 64),  # SD 1.5 at 512²
    (2, 4, 96, 96),  # SD 2.1 at 768², two images
    (4, 4, 128, 128),  # SDXL at 1024², four images
    (16, 4, 128, 128),  # large: 1M elements per basis column
]
TINY_SIZES = [(1, 4, 8, 8), (3, 3, 5, 7)]
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _timer(device: torch.device):
    if device.type == "cuda":

        def measure(fn, reps: int) -> list[float]:
            times = []
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e-3)
            return times

    else:

        def measure(fn, reps: int) -> list[float]:
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return times

    return measure


def count_launches(fn, device: torch.device) -> int | None:
    """Device kernels launched by fn(), from the profiler (None where it cannot tell: CPU)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@functools.lru_cache(maxsize=1)
def _program():
    from fastdiff import program, solvers
    from fastdiff.schedules import DiscreteSchedule

    schedule = DiscreteSchedule.from_config(
        {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    )
    return program.compile(solvers.build("dpmpp_2m", schedule, 20))


def step_setup(shape, dtype, device):
    host = _program()
    k = next(i for i in range(host.num_steps) if (host.src[i, 1] >= 0).sum() >= 2)
    gen = torch.Generator(device="cpu").manual_seed(0)
    basis = torch.randn(host.num_rows, *shape, generator=gen).to(device=device, dtype=dtype)
    raw = torch.randn(2 * shape[0], *shape[1:], generator=gen).to(device=device, dtype=dtype)
    w = torch.full((shape[0],), 7.5, device=device)
    out = torch.empty((2, *shape), device=device, dtype=dtype)  # the gate's last two guided outputs
    return k, host, basis, raw, w, out


def step_bytes(k, host, shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    cols = {int(s) for i in range(2) for s in host.src[k, i] if s >= 0} | {int(host.x_row[k])}
    writes = int((host.dst[k] >= 0).sum()) + 1  # the rows + g into out
    reads = 2 + len(cols)  # uncond + cond + the live columns
    return (reads + writes) * n * torch.finfo(dtype).bits // 8


def bench_one(shape, dtype_name, device, reps, impl_fast):
    from fastdiff.ops import fused_step
    from fastdiff.ops.triton_step import gate_decide, num_blocks

    dtype = DTYPES[dtype_name]
    k, host, basis, raw, w, out = step_setup(shape, dtype, device)
    partials = torch.empty(shape[0], num_blocks(basis), dtype=torch.float32, device=device)
    stat = torch.empty(shape[0], dtype=torch.float32, device=device)
    reuse = host.reuse_table(device, dtype)
    nbytes = step_bytes(k, host, shape, dtype)
    copy_src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    copy_dst = torch.empty_like(copy_src)
    measure = _timer(device)

    def fast():
        fused_step(k, raw, w, basis, host, out=out, partials=partials, reuse=reuse, impl=impl_fast)

    def reference():
        fused_step(k, raw, w, basis, host, out=out, stat=stat, reuse=reuse, impl="torch")

    def copy():
        copy_dst.copy_(copy_src)

    row = {"shape": list(shape), "dtype": dtype_name, "call": k, "bytes": nbytes}
    for name, fn in (("fused", fast), ("reference", reference), ("copy", copy)):
        fn()  # warm-up (Triton compiles here)
        times = measure(fn, reps)
        row[f"{name}_s"] = statistics.median(times)
        row[f"{name}_GBps"] = nbytes / row[f"{name}_s"] / 1e9
    row["fused_vs_copy"] = row["fused_GBps"] / row["copy_GBps"]
    row["fused_speedup_vs_reference"] = row["reference_s"] / row["fused_s"]
    n = basis[0, 0].numel()
    d1, d2 = torch.zeros(shape[0], device=device), torch.zeros(shape[0], device=device)
    run = torch.zeros(shape[0], dtype=torch.int32, device=device)
    flags = torch.empty(shape[0], dtype=torch.int8, device=device)

    def fast_with_gate():
        fast()
        gate_decide(partials, n, d1, d2, run, flags, active=True, delta=0.01, max_skips=4, refresh=2)

    row["launches_fused"] = count_launches(fast, device)
    row["launches_fused_with_gate"] = count_launches(fast_with_gate, device)
    row["launches_reference"] = count_launches(reference, device)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (needs TRITON_INTERPRET=1)")
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16", "float32"], choices=sorted(DTYPES))
    parser.add_argument("--reps", type=int, default=50, help="timed repetitions per case (median reported)")
    parser.add_argument("--tiny", action="store_true", help="tiny latents and 2 repetitions (a smoke test)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_kernels: no CUDA device; use --device cpu with TRITON_INTERPRET=1 for a smoke test", file=sys.stderr)
        return 2
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print("gpu_kernels: --device cpu runs the Triton kernel only with TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    from fastdiff.ops import triton_step

    if not triton_step.available():
        print(f"gpu_kernels: {triton_step.why_unavailable()}", file=sys.stderr)
        return 2
    sizes, reps = (TINY_SIZES, 2) if args.tiny else (SIZES, args.reps)
    rows = []
    with torch.no_grad():
        for shape in sizes:
            for dtype_name in args.dtypes:
                row = bench_one(shape, dtype_name, device, reps, "triton")
                rows.append(row)
                print(
                    f"{'x'.join(map(str, shape)):>14} {dtype_name:>8}: fused {row['fused_s'] * 1e6:8.1f} us "
                    f"{row['fused_GBps']:7.1f} GB/s ({row['fused_vs_copy']:.2f} of copy), torch reference "
                    f"{row['reference_s'] * 1e6:8.1f} us, launches {row['launches_fused']} "
                    f"(+gate {row['launches_fused_with_gate']}) vs {row['launches_reference']}"
                )
    import triton

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor()})",
        "interpreted": triton_step.interpreted(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "results": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
