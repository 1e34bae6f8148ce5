"""Summarise the GPU benchmarks (bench/gpu) against the issue-7 targets.

    python bench/gpu_summary.py bench/out/gpu.json --out bench/results

Writes <out>/gpu_summary.json, <out>/gpu.md (the tables, with each target's pass or fail) and
<out>/gpu-<device>.json (the raw pytest-benchmark JSON, named by its device). Times are the
medians of the timed rounds, in ms. gpu_summary.json holds:

  device                          what the JSON was measured on (a CPU for a tiny run)
  tiny                            true for a FASTDIFF_BENCH_GPU_TINY=1 CPU smoke run: numbers mean nothing
  e2e_5step_768_ms                5-step end-to-end (text encode + 5 UNet calls + VAE decode + PIL
                                  images), batch 1, the fastest backend measured
  e2e_backend                     that backend
  e2e_5step_768_without_pil_ms    its engine-timed end-to-end (SampleOutput.timings["total"]): without
                                  the conversion of the images to PIL on the host
  e2e_5step_768_batch4_ms         the same backend at batch 4
  e2e_5step_768_ms_by_backend     {backend: {"1": ms, "4": ms}}
  diffusers_5step_768_ms          diffusers' StableDiffusionPipeline (eager), same 5 steps, batch 1
  diffusers_5step_768_batch4_ms   the same at batch 4
  diffusers_default_steps_768_ms  {"25": ms, "50": ms}: the pipeline at 25 and at its default 50 steps, batch 1
  speedup_vs_diffusers_5step      diffusers_5step_768_ms / e2e_5step_768_ms
  unet_step_ms                    {backend: ms}: one guided UNet call (batch 2: uncond + cond), batch 1
  unet_step_batch4_ms             {backend: ms}: the same at batch 4 (UNet batch 8)
  loop_overhead_fraction          e2e_backend at batch 1: (total − 5·UNet − VAE − text) / 5, as a
                                  fraction of a UNet step; total is the engine's own end-to-end
                                  time, which excludes the PIL conversion
  loop_overhead                   {backend: {batch: {"per_step_ms", "fraction"}}}
  targets                         {name: {"value", "goal", "pass"}}
  notes, resolution, model, dtype, torch, driver, run, raw_json

A tiny run is refused unless --allow-tiny, and never written into bench/results.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
STEPS = 5
E2E_LIMIT_MS = 100.0  # on an H100
MIN_SPEEDUP = 1.6  # over diffusers at the same steps
MAX_OVERHEAD_FRACTION = 0.01  # of a UNet step
BACKENDS = ("eager", "cuda_graph", "compiled")
LONG_STEPS = (25, 50)


def load(path: Path) -> dict:
    """The pytest-benchmark document; pytest-benchmark leaves the file empty when nothing ran."""
    text = path.read_text()
    return json.loads(text) if text.strip() else {"benchmarks": []}


def gpu_rows(doc: dict) -> list[dict]:
    """One row per bench/gpu benchmark: its extra_info plus the median wall time in ms."""
    rows = []
    for b in doc.get("benchmarks", []):
        if str(b.get("group", "")).startswith("gpu-") and "kind" in b.get("extra_info", {}):
            rows.append({**b["extra_info"], "name": b["name"], "ms": b["stats"]["median"] * 1e3})
    return rows


def loop_overhead(total_ms: float, unet_ms: float, vae_ms: float, text_ms: float, steps: int) -> dict:
    """What a step costs beyond its UNet call: (total − steps·UNet − VAE − text) / steps, in ms
    and as a fraction of the UNet step (negative when the loop runs faster than the parts
    timed one by one, e.g. one captured graph for the whole loop)."""
    per_step = (total_ms - steps * unet_ms - vae_ms - text_ms) / steps
    return {"per_step_ms": per_step, "fraction": per_step / unet_ms}


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None else num / den


def _target(value: float | None, goal: str, ok) -> dict:
    return {"value": value, "goal": goal, "pass": None if value is None else bool(ok(value))}


def summarize(doc: dict) -> dict:
    """The summary of a pytest-benchmark document from bench/gpu (ValueError when it has none)."""
    rows = gpu_rows(doc)
    if not rows:
        raise ValueError("no GPU benchmark results: every bench/gpu test was skipped (no CUDA device?) or deselected")
    cell = {(r["kind"], r["backend"], r["batch"], r["steps"]): r for r in rows}

    def ms(kind, backend, batch, steps):
        row = cell.get((kind, backend, batch, steps))
        return None if row is None else row["ms"]

    backends = [b for b in BACKENDS if any(r["backend"] == b for r in rows)]
    batches = sorted({r["batch"] for r in rows if r["kind"] != "diffusers"})
    e2e = {b: {str(n): ms("e2e", b, n, STEPS) for n in batches} for b in backends}
    overhead = {}
    for backend in backends:
        overhead[backend] = {}
        for n in batches:
            parts = [cell.get((kind, backend, n, steps)) for kind, steps in (("unet", 1), ("vae", 0), ("text", 0))]
            total = cell.get(("e2e", backend, n, STEPS))
            if total is not None and all(parts):
                unet, vae, text = (p["ms"] for p in parts)
                overhead[backend][str(n)] = loop_overhead(total["total_ms"], unet, vae, text, STEPS)
            else:
                overhead[backend][str(n)] = None
    measured = {b: e2e[b]["1"] for b in backends if e2e[b].get("1") is not None}
    best = min(measured, key=measured.get) if measured else None
    e2e_ms = measured.get(best)
    diffusers_ms = ms("diffusers", "diffusers-eager", 1, STEPS)
    speedup = _ratio(diffusers_ms, e2e_ms)
    best_overhead = overhead[best]["1"] if best is not None else None
    fraction = None if best_overhead is None else best_overhead["fraction"]
    devices = sorted({r["device"] for r in rows})
    tiny = any(r.get("tiny") for r in rows)
    first = rows[0]
    drivers = sorted({r["driver"] for r in rows if r.get("driver")})
    return {
        "device": " / ".join(devices),
        "tiny": tiny,
        "model": first["model"],
        "resolution": first["resolution"],
        "dtype": first["dtype"],
        "torch": first["torch"],
        "driver": " / ".join(drivers) or None,
        "run": doc.get("datetime"),
        "e2e_5step_768_ms": e2e_ms,
        "e2e_backend": best,
        "e2e_5step_768_without_pil_ms": cell[("e2e", best, 1, STEPS)]["total_ms"] if best is not None else None,
        "e2e_5step_768_batch4_ms": e2e[best].get("4") if best is not None else None,
        "e2e_5step_768_ms_by_backend": e2e,
        "diffusers_5step_768_ms": diffusers_ms,
        "diffusers_5step_768_batch4_ms": ms("diffusers", "diffusers-eager", 4, STEPS),
        "diffusers_default_steps_768_ms": {str(n): ms("diffusers", "diffusers-eager", 1, n) for n in LONG_STEPS},
        "speedup_vs_diffusers_5step": speedup,
        "unet_step_ms": {b: ms("unet", b, 1, 1) for b in backends},
        "unet_step_batch4_ms": {b: ms("unet", b, 4, 1) for b in backends},
        "loop_overhead_fraction": fraction,
        "loop_overhead": overhead,
        "targets": {
            "e2e_5step_768_ms": _target(e2e_ms, f"<= {E2E_LIMIT_MS:g} ms on an H100", lambda v: v <= E2E_LIMIT_MS),
            "speedup_vs_diffusers_5step": _target(speedup, f">= {MIN_SPEEDUP:g}x", lambda v: v >= MIN_SPEEDUP),
            "loop_overhead_fraction": _target(
                fraction, f"<= {MAX_OVERHEAD_FRACTION:.0%} of a UNet step", lambda v: v <= MAX_OVERHEAD_FRACTION
            ),
        },
        "notes": notes(rows, devices, tiny),
    }


def notes(rows: list[dict], devices: list[str], tiny: bool) -> list[str]:
    """What a reader of the numbers must know: tiny runs, mixed devices, the engines' notes and
    warnings (fp16 fallbacks, modules left without graphs), graphs captured while timing,
    missing telemetry."""
    out = []
    if tiny:
        out.append(
            "tiny CPU smoke run (FASTDIFF_BENCH_GPU_TINY=1, tiny-shapes): it exercises the code paths, "
            "its numbers mean nothing and the targets do not apply"
        )
    if len(devices) > 1:
        out.append(f"the JSON mixes devices: {', '.join(devices)}")
    for r in rows:
        said = [n for n in r.get("notes", []) if not n.startswith("random weights")] + r.get("warnings", [])
        out.extend(f"{r['name']}: {n}" for n in dict.fromkeys(said))
        if r.get("graph_captures_while_timing"):
            out.append(f"{r['name']}: {r['graph_captures_while_timing']} graph capture(s) inside the timed rounds")
    reasons = sorted({r["telemetry_unavailable"] for r in rows if r.get("telemetry_unavailable")})
    out.extend(f"no telemetry: {reason}" for reason in reasons)
    return out


def _ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f} ms" if abs(value) < 10 else f"{value:.1f} ms"


def _pair(values: list[float | None]) -> str:
    return " / ".join(_ms(v) for v in values)


def _share(fraction: float | None, overhead: dict | None) -> str:
    if fraction is None:
        return "—"
    return f"{fraction:.2%} of a UNet step ({_ms(overhead['per_step_ms'])})"


def _verdict(target: dict) -> str:
    return "not measured" if target["pass"] is None else ("pass" if target["pass"] else "**FAIL**")


def markdown(summary: dict, rows: list[dict], raw_name: str) -> str:
    s = summary
    targets = s["targets"]
    best = s["e2e_backend"]
    speedup = s["speedup_vs_diffusers_5step"]
    fraction = s["loop_overhead_fraction"]
    best_overhead = s["loop_overhead"][best]["1"] if best is not None else None
    without_pil = "" if best is None else f" ({_ms(s['e2e_5step_768_without_pil_ms'])} without the PIL images)"
    lines = ["# GPU benchmarks", ""]
    if s["tiny"]:
        lines += [
            "> **Tiny CPU smoke run** (FASTDIFF_BENCH_GPU_TINY=1, tiny-shapes at "
            f"{s['resolution']}²): these numbers mean nothing; the targets are for sd21 at 768² on an H100.",
            "",
        ]
    lines += [
        f"Device: {s['device']} (driver {s['driver'] or 'unknown'}, torch {s['torch']}). Model: {s['model']}"
        f"{' architecture with random weights' if s['model'] == 'sd21' else ''}, {s['dtype']}, "
        f"{s['resolution']}², classifier-free guidance 7.5 (the UNet runs on twice the batch), "
        f"DPM-Solver++(2M). Medians of the timed rounds of `make bench-gpu`, run {s['run'] or '?'}; "
        f"raw JSON: `{raw_name}`.",
        "",
        "## Targets",
        "",
        "| target | measured | goal | result |",
        "| --- | --- | --- | --- |",
        f"| 5-step end-to-end, batch 1 ({best or '—'}) | {_ms(s['e2e_5step_768_ms'])}{without_pil} | "
        f"{targets['e2e_5step_768_ms']['goal']} | {_verdict(targets['e2e_5step_768_ms'])} |",
        f"| speedup over diffusers at 5 steps, batch 1 | {'—' if speedup is None else f'{speedup:.2f}x'} | "
        f"{targets['speedup_vs_diffusers_5step']['goal']} | {_verdict(targets['speedup_vs_diffusers_5step'])} |",
        f"| loop overhead per step, batch 1 ({best or '—'}) | {_share(fraction, best_overhead)} | "
        f"{targets['loop_overhead_fraction']['goal']} | {_verdict(targets['loop_overhead_fraction'])} |",
        "",
    ]
    if not s["tiny"] and "H100" not in s["device"]:
        lines += [f"The end-to-end goal is stated for an H100; this run is on {s['device']}.", ""]
    batches = sorted({r["batch"] for r in rows if r["kind"] != "diffusers"})
    by = {(r["kind"], r["backend"], r["batch"]): r for r in rows if r["kind"] != "diffusers"}

    def parts(kind, backend):
        return _pair([by[(kind, backend, n)]["ms"] if (kind, backend, n) in by else None for n in batches])

    def overhead(backend):
        cells = []
        for n in batches:
            o = s["loop_overhead"][backend].get(str(n))
            cells.append("—" if o is None else f"{_ms(o['per_step_ms'])} ({o['fraction']:.2%})")
        return " / ".join(cells)

    head = "batch " + " / ".join(map(str, batches))
    lines += [
        f"## Per backend ({head})",
        "",
        "Text encode = the prompts and the empty negative prompts; end-to-end includes the PIL images. "
        "Loop overhead per step = (end-to-end − 5·UNet step − VAE − text) / 5, from the engine's own "
        "end-to-end time (without the PIL conversion), in ms and as a share of a UNet step.",
        "",
        "| backend | UNet step | text encode | VAE decode | 5-step end-to-end | loop overhead per step |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for backend in s["unet_step_ms"]:
        lines.append(
            f"| {backend} | {parts('unet', backend)} | {parts('text', backend)} | {parts('vae', backend)} | "
            f"{parts('e2e', backend)} | {overhead(backend)} |"
        )
    diffusers = {(r["steps"], r["batch"]): r for r in rows if r["kind"] == "diffusers"}
    if diffusers:
        scheduler = next(iter(diffusers.values())).get("scheduler", "?")
        diffusers_batches = sorted({n for _, n in diffusers})
        lines += [
            "",
            f"## diffusers StableDiffusionPipeline (eager, {scheduler}, PIL output)",
            "",
            "| steps | " + " | ".join(f"batch {n}" for n in diffusers_batches) + " |",
            "| --- |" + " --- |" * len(diffusers_batches),
        ]
        for steps in sorted({k for k, _ in diffusers}):
            cells = [_ms(diffusers[(steps, n)]["ms"]) if (steps, n) in diffusers else "—" for n in diffusers_batches]
            label = f"{steps} (the pipeline's default)" if steps == 50 else str(steps)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    telemetry = [r for r in rows if r.get("power_w") is not None]
    if telemetry:
        lines += [
            "",
            "## Telemetry (nvidia-ml-py, read right after each benchmark's timed rounds)",
            "",
            "| benchmark | power | SM clock | GPU memory used | peak allocated by torch |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in telemetry:
            peak = r.get("max_allocated_mib")
            lines.append(
                f"| {r['name']} | {r['power_w']:.0f} W | {r['sm_clock_mhz']} MHz | {r['memory_used_mib']:.0f} MiB | "
                f"{'—' if peak is None else f'{peak:.0f} MiB'} |"
            )
    if s["notes"]:
        lines += ["", "## Notes", "", *(f"- {n}" for n in s["notes"])]
    return "\n".join(lines) + "\n"


def slug(device: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", type=Path, help="pytest-benchmark --benchmark-json file of bench/gpu")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output directory (default: bench/results)")
    parser.add_argument(
        "--allow-tiny",
        action="store_true",
        help="summarise a tiny CPU run (FASTDIFF_BENCH_GPU_TINY=1) into a directory other than bench/results",
    )
    args = parser.parse_args(argv)
    if not args.json.is_file():
        print(f"gpu_summary: no such benchmark JSON: {args.json}", file=sys.stderr)
        return 2
    doc = load(args.json)
    try:
        summary = summarize(doc)
    except ValueError as exc:
        print(f"gpu_summary: {args.json}: {exc}", file=sys.stderr)
        return 2
    if summary["tiny"]:
        if not args.allow_tiny:
            print(
                f"gpu_summary: {args.json} is a tiny CPU smoke run (FASTDIFF_BENCH_GPU_TINY=1) whose numbers mean "
                "nothing; pass --allow-tiny (and an --out other than bench/results) to summarise it anyway",
                file=sys.stderr,
            )
            return 2
        if args.out.resolve() == RESULTS.resolve():
            print(f"gpu_summary: a tiny CPU run is never written into {RESULTS}: choose another --out", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / f"gpu-{slug(summary['device'])}.json"
    if args.json.resolve() != raw.resolve():
        shutil.copyfile(args.json, raw)
    summary["raw_json"] = raw.name
    (args.out / "gpu_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / "gpu.md").write_text(markdown(summary, gpu_rows(doc), raw.name))
    print(f"wrote {args.out / 'gpu_summary.json'}, {args.out / 'gpu.md'} and {raw}")
    for name, target in summary["targets"].items():
        print(f"  {name}: {target['value']} (goal {target['goal']}): {_verdict(target).strip('*')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
