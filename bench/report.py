"""Turn pytest-benchmark JSON into markdown tables and PNG plots.

    python bench/report.py bench/out/cpu.json [more.json ...] --out bench/results

Writes <out>/solver_quality.md and <out>/solver_quality.png (error vs NFE, log scale) from the
gmm-solver-quality group, <out>/tiny_shapes.md (adherence vs steps, latency) from the
tiny-shapes groups, <out>/digits.md, <out>/olss_quality.{md,png} (OLSS vs solvers on held-out
samples), <out>/gate_quality.{md,png} (AdaptiveDiffusion gate: calls saved vs PSNR) and
<out>/runtime.md (loop overhead per step, the Python reference loop vs the C++ loop),
<out>/parity.md (difference from diffusers' own loops, per solver variant), <out>/backends.md
(eager vs compiled on the CPU), <out>/service.md (the C++ service example's throughput) and
<out>/distill_quality.{md,png} (guided distillation: FD vs UNet evaluations) and <out>/timings.md
with every benchmark's timing statistics.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(paths: list[Path]) -> tuple[list[dict], dict, str]:
    """(benchmarks, machine_info, "commit <id> (clean tree)" or what else is known of the code)."""
    benchmarks, machine, commits = [], {}, []
    for path in paths:
        doc = json.loads(path.read_text())
        benchmarks.extend(doc.get("benchmarks", []))
        machine = doc.get("machine_info", machine)
        info = doc.get("commit_info", {})
        if info.get("id"):
            commits.append(f"commit {info['id'][:7]} ({'dirty' if info.get('dirty') else 'clean'} tree)")
    return benchmarks, machine, ", ".join(dict.fromkeys(commits)) or "commit unknown"


def quality_rows(benchmarks: list[dict]) -> list[dict]:
    return [b["extra_info"] for b in benchmarks if b.get("group") == "gmm-solver-quality"]


def quality_table(rows: list[dict]) -> str:
    from fastdiff.testing.quality import markdown_table

    steps = tuple(sorted({r["steps"] for r in rows}))
    return markdown_table(rows, steps)


def program_table(rows: list[dict]) -> str:
    steps = sorted({r["steps"] for r in rows})
    lines = ["| solver | " + " | ".join(f"N={n}" for n in steps) + " | max error |", "| --- " * (len(steps) + 2) + "|"]
    for label in dict.fromkeys(r["label"] for r in rows):
        mine = {r["steps"]: r for r in rows if r["label"] == label and "program_rows" in r}
        if not mine:
            continue
        cells = [str(mine[n]["program_rows"]) if n in mine else "—" for n in steps]
        worst = max(r["program_error"] for r in mine.values())
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {worst:.1e} |")
    return "\n".join(lines)


def quality_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = plt.cm.tab20.colors
    for i, label in enumerate(dict.fromkeys(r["label"] for r in rows)):
        points = sorted((r["nfe"], r["rel_error"]) for r in rows if r["label"] == label)
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker="os^D"[i % 4],
            markersize=3,
            color=colors[(2 * i) % 20 + (i // 10)],
            linestyle="-" if i < 10 else "--",
            label=label,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel("model calls (NFE)")
    ax.set_ylabel("relative RMS error vs exact ODE solution")
    ax.set_title("Solver error on a 64-d Gaussian mixture (SD schedule)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _sampler_by_steps(benchmarks: list[dict], group: str, cell) -> str:
    """A markdown table of one benchmark group: a row per sampler, a column per step count."""
    rows = [b["extra_info"] for b in benchmarks if b.get("group") == group]
    steps = sorted({r["steps"] for r in rows})
    cells = {(r["sampler"], r["steps"]): r for r in rows}
    lines = ["| sampler | " + " | ".join(f"N={n}" for n in steps) + " |", "|" + " --- |" * (len(steps) + 1)]
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        values = ["—" if (sampler, n) not in cells else cell(cells[(sampler, n)]) for n in steps]
        lines.append(f"| {sampler} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def adherence_table(benchmarks: list[dict]) -> str:
    return _sampler_by_steps(
        benchmarks,
        "tiny-shapes-adherence",
        lambda r: f"{100 * r['adherence']:.1f}% ({100 * r['color']:.0f}/{100 * r['shape']:.0f})",
    )


def digits_table(benchmarks: list[dict]) -> str:
    return _sampler_by_steps(benchmarks, "digits-quality", lambda r: f"{100 * r['accuracy']:.1f}% / {r['fd']:.2f}")


OLSS_STUDIES = ("gmm", "tiny-shapes", "digits")
OLSS_REFERENCE = {
    "gmm": "the exact ODE solution (64-d mixture, 64 held-out x_T; teacher DDIM-1000 on 128 calibration x_T)",
    "tiny-shapes": "a 1000-step run (32 held-out prompts and noise; teacher DDIM-100 on 64 calibration prompts)",
    "digits": "a 1000-step run (32 samples with held-out noise; teacher DDIM-100 on 64 calibration samples)",
}


def olss_rows(benchmarks: list[dict], study: str, group: str = "olss-quality") -> list[dict]:
    return [b["extra_info"] for b in benchmarks if b.get("group") == f"{group}-{study}"]


def olss_table(rows: list[dict], key: str = "rel_error", fmt: str = ".2e") -> str:
    """A row per method (the teacher as one line with its NFE), a column per step count: `key`."""
    teacher = [r for r in rows if r["label"] == "teacher"]
    rows = [r for r in rows if r["label"] != "teacher" and r.get(key) is not None]
    steps = sorted({r["steps"] for r in rows})
    cells = {(r["label"], r["steps"]): r for r in rows}
    lines = ["| method | " + " | ".join(f"N={n}" for n in steps) + " |", "|" + " --- |" * (len(steps) + 1)]
    for label in dict.fromkeys(r["label"] for r in rows):
        values = ["—" if (label, n) not in cells else f"{cells[(label, n)][key]:{fmt}}" for n in steps]
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    for r in teacher:
        lines.append(f"| teacher ({r['nfe']} calls) | {r['rel_error']:.2e} |" + " |" * (len(steps) - 1))
    return "\n".join(lines)


def olss_plot(benchmarks: list[dict], path: Path, group: str = "olss-quality", highlight=("olss",)) -> None:
    """Error vs NFE per study of `group` (the `highlight` methods solid, the others dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    studies = [s for s in OLSS_STUDIES if olss_rows(benchmarks, s, group)]
    fig, axes = plt.subplots(1, len(studies), figsize=(5.5 * len(studies), 4.5), squeeze=False)
    for ax, study in zip(axes[0], studies):
        rows = [r for r in olss_rows(benchmarks, study, group) if r["label"] != "teacher"]
        for i, label in enumerate(dict.fromkeys(r["label"] for r in rows)):
            points = sorted((r["nfe"], r["rel_error"]) for r in rows if r["label"] == label)
            olss = label.startswith(highlight)
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker="os^Dv<>p"[i % 8],
                markersize=3,
                linestyle="-" if olss else "--",
                linewidth=1.6 if olss else 1.0,
                label=label,
            )
        ax.set_yscale("log")
        ax.set_xlabel("model calls (NFE)")
        ax.set_ylabel("relative RMS error vs reference")
        ax.set_title(study)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)  # each study has its own methods
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SEARCH_REFERENCE = {
    "gmm": "the exact ODE solution (64-d mixture, 64 held-out x_T); searched here on 128 calibration x_T against "
    "DPM-Solver++(2M)-100, budget 200 candidates",
    "tiny-shapes": "a 1000-step run (32 held-out prompts and noise); the shipped plans (engines/tiny-shapes/plans)",
    "digits": "a 1000-step run (32 samples with held-out noise); the shipped plans (engines/digits/plans)",
}


def search_cost_table(benchmarks: list[dict]) -> str:
    """What each searched plan cost: candidates' model calls, wall time, the proxy, which plan the
    held-out calibration samples chose (the searched one or the OLSS refit on its times), the predictor."""
    lines = [
        "| study | NFE | model calls | wall time | proxy error (calibration) | plan | held-out error | predictor ρ |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for b in benchmarks:
        r = b["extra_info"]
        if not b.get("group", "").startswith("search-quality-") or "search_calls" not in r:
            continue
        if not r["label"].startswith("usf"):  # "auto" repeats the searched plans it picked
            continue
        secs = "—" if r.get("search_seconds") is None else f"{r['search_seconds']:.0f} s"
        rho = "—" if r.get("rank_correlation") is None else f"{r['rank_correlation']:.2f}"
        kind = {"olss": "OLSS refit", "search": "searched"}.get(r.get("chosen"), "searched")
        lines.append(
            f"| {r['study']} | {r['nfe']} | {r['search_calls']:,} | {secs} | {r['proxy_error']:.3g} | {kind} | "
            f"{r['rel_error']:.3g} | {rho} |"
        )
    return "\n".join(lines)


def predictor_table(benchmarks: list[dict]) -> str:
    lines = [
        "| study | seed | plain: proxy error (held out) | with predictor | model calls: plain "
        "| with predictor to match | saved | predictor ρ (held out) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for b in benchmarks:
        if b.get("group") != "search-predictor":
            continue
        info = b["extra_info"]
        for r in info["runs"]:
            reach = "not reached" if r["predictor_calls_to_match"] is None else f"{r['predictor_calls_to_match']:,}"
            saved = "—" if r["saved"] is None else f"{100 * r['saved']:.0f}%"
            lines.append(
                f"| {info['study']} | {r['seed']} | {r['plain_error']:.3g} ({r['held_out_plain']:.3g}) | "
                f"{r['predictor_error']:.3g} ({r['held_out_predictor']:.3g}) | {r['plain_calls']:,} | {reach} | "
                f"{saved} | {r['rank_correlation']:.2f} |"
            )
    return "\n".join(lines)


def latency_table(benchmarks: list[dict]) -> str:
    lines = ["| benchmark | mean | min | max | rounds |", "| --- | --- | --- | --- | --- |"]
    for b in benchmarks:
        if b.get("group") == "tiny-shapes-latency":
            s = b["stats"]
            lines.append(
                f"| {b['name']} ({b['extra_info']['nfe']} UNet calls) | {s['mean'] * 1e3:.1f} ms | "
                f"{s['min'] * 1e3:.1f} ms | {s['max'] * 1e3:.1f} ms | {s['rounds']} |"
            )
    return "\n".join(lines)


def gate_rows(benchmarks: list[dict]) -> list[dict]:
    rows = []
    for b in benchmarks:
        if b.get("group") == "gate-quality":
            rows.append({**b["extra_info"], "seconds": b["stats"]["mean"]})
    return rows


def gate_table(rows: list[dict]) -> str:
    lines = [
        "| solver | N | delta | decisions | calls/sample | fewer calls | PSNR (all) | PSNR median / worst | "
        "adherence (no skip) | wall time vs no skip |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(rows, key=lambda r: (r["sampler"], r["steps"], r["delta"], r["mode"])):
        lines.append(
            f"| {r['sampler']} | {r['steps']} | {r['delta']:g} | per {r['mode']} | {r['mean_calls']:.2f} | "
            f"{r['call_reduction']:.2f}x | {r['psnr']:.1f} dB | {r['psnr_median']:.1f} / {r['psnr_worst']:.1f} dB | "
            f"{r['adherence'] * 100:.1f}% ({r['adherence_no_skip'] * 100:.1f}%) | "
            f"{r['seconds']:.1f} s vs {r['seconds_no_skip']:.1f} s |"
        )
    return "\n".join(lines)


def gate_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    configs = sorted({(r["sampler"], r["steps"], r["mode"]) for r in rows})
    for i, (sampler, steps, mode) in enumerate(configs):
        points = sorted(
            (r["call_reduction"], r["psnr"])
            for r in rows
            if (r["sampler"], r["steps"], r["mode"]) == (sampler, steps, mode)
        )
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker="o" if mode == "sample" else "s",
            linestyle="-" if mode == "sample" else "--",
            color=plt.cm.tab10.colors[(i // 2) % 10],
            label=f"{sampler} N={steps}, per {mode}",
        )
    ax.axhline(24, color="grey", linewidth=0.8, linestyle=":")
    ax.axvline(2, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("fewer UNet calls (N / mean calls per sample)")
    ax.set_ylabel("PSNR vs the same run without skipping (dB)")
    ax.set_title("AdaptiveDiffusion gate on tiny-shapes (delta sweep)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PEER_STYLE = {  # method -> (label, marker, colour index)
    "gate": ("fastdiff gate (extrapolated reuse)", "o", 0),
    "gate-copy": ("fastdiff gate before issue 19 (copy)", "x", 7),
    "deepcache": ("DeepCache 0.1.1 (PyPI)", "s", 3),
    "feature-cache": ("fastdiff feature cache", "^", 2),
    "gate+feature-cache": ("fastdiff gate + feature cache", "D", 4),
    "fewer-steps": ("no acceleration, fewer steps", "v", 1),
}


def peer_rows(benchmarks: list[dict]) -> list[dict]:
    return [b["extra_info"] for b in benchmarks if b.get("group") == "skip-peers"]


def peer_table(rows: list[dict]) -> str:
    """One table per (model, steps): every method and setting, fastest first."""
    parts = []
    for model, steps in sorted({(r["model"], r["steps"]) for r in rows}):
        lines = [
            f"### {model}, DPM-Solver++(2M) {steps} steps",
            "",
            "| method | setting | speed-up (wall) | calls/image | PSNR pooled | median | worst | SSIM (worst) | "
            "adherence (unaccelerated) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        group = [r for r in rows if (r["model"], r["steps"]) == (model, steps)]
        for r in sorted(group, key=lambda r: (r["method"] != "none", -r["speedup"])):
            lines.append(
                f"| {r['method']} | {r['setting']} | {r['speedup']:.2f}x | {r['mean_calls']:.1f} | {r['psnr']:.1f} | "
                f"{r['psnr_median']:.1f} | {r['psnr_worst']:.1f} | {r['ssim']:.4f} ({r['ssim_worst']:.4f}) | "
                f"{r['adherence'] * 100:.1f}% ({r['adherence_reference'] * 100:.1f}%) |"
            )
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats in both speed-up and PSNR, by increasing speed-up."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(front)


def peer_plot(rows: list[dict], path: Path) -> None:
    """Speed-up vs pooled PSNR (top) and worst-image PSNR (bottom), one column per (model, steps);
    every setting a point, each method's Pareto front a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({(r["model"], r["steps"]) for r in rows})
    fig, axes = plt.subplots(2, len(configs), figsize=(4.2 * len(configs), 7.5), squeeze=False)
    for col, (model, steps) in enumerate(configs):
        group = [r for r in rows if (r["model"], r["steps"]) == (model, steps) and r["method"] in PEER_STYLE]
        for row, key in enumerate(("psnr", "psnr_worst")):
            ax = axes[row][col]
            for method, (label, marker, colour) in PEER_STYLE.items():
                points = [(r["speedup"], r[key]) for r in group if r["method"] == method]
                if not points:
                    continue
                c = plt.cm.tab10.colors[colour]
                ax.scatter(*zip(*points), marker=marker, color=c, s=22, alpha=0.6, label=label)
                front = pareto(points)
                ax.plot([p[0] for p in front], [p[1] for p in front], color=c, linewidth=1.2)
            if key == "psnr_worst":
                ax.axhline(24, color="grey", linewidth=0.8, linestyle=":")
            ax.axvspan(1.5, 3.0, color="grey", alpha=0.06)
            ax.set_xlabel("wall-time speed-up of the whole call")
            ax.set_ylabel("PSNR pooled (dB)" if key == "psnr" else "PSNR of the worst image (dB)")
            ax.set_title(f"{model}, {steps} steps", fontsize=9)
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=6.5, loc="lower left")
    fig.suptitle("Step skipping vs deep-feature caching, side by side (32 held-out prompts, CPU)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def distill_rows(benchmarks: list[dict]) -> list[dict]:
    return [b["extra_info"] for b in benchmarks if b.get("group") == "distill-quality"]


def distill_table(rows: list[dict]) -> str:
    """A row per (method, UNet evaluations), FD / accuracy per guidance weight, and the wall time."""
    weights = sorted({r["w"] for r in rows})
    head = "| method | UNet evals | " + " | ".join(f"w={w:g}: FD (acc.)" for w in weights) + " | s/image |"
    lines = [head, "| --- " * (len(weights) + 3) + "|"]
    keys = dict.fromkeys((r["method"], r["unet_evaluations"]) for r in rows)
    for method, evals in sorted(keys, key=lambda k: (not k[0].startswith("teacher"), k[0], -k[1])):
        mine = {r["w"]: r for r in rows if (r["method"], r["unet_evaluations"]) == (method, evals)}
        cells = [f"{mine[w]['fd']:.1f} ({mine[w]['accuracy']:.3f})" if w in mine else "—" for w in weights]
        seconds = sum(r["seconds_per_image"] for r in mine.values()) / len(mine)
        lines.append(f"| {method} | {evals} | " + " | ".join(cells) + f" | {seconds * 1000:.1f} ms |")
    return "\n".join(lines)


def distill_targets(rows: list[dict]) -> str:
    """The issue's two targets per w, as measured: the 4-step student's FD / the teacher's at 64
    guided steps (≤ 1.1), and the 2-evaluation students vs OLSS with CFG at 4 evaluations."""
    lines = []
    for w in sorted({r["w"] for r in rows}):
        at = {(r["method"], r["unet_evaluations"]): r["fd"] for r in rows if r["w"] == w}
        teacher, four = at.get(("teacher+ddim", 128)), at.get(("steps-4", 4))
        if teacher is not None and four is not None:
            ratio = four / teacher
            verdict = "met" if ratio <= 1.1 else "missed"
            lines.append(
                f"- w={w:g}: 4-step student FD {four:.1f} = {ratio:.2f}x the teacher's {teacher:.1f} ({verdict})"
            )
        sto = at.get(("steps-2 stochastic", 4))
        if teacher is not None and sto is not None:
            ratio = sto / teacher
            verdict = "within 1.1x" if ratio <= 1.1 else "over 1.1x"
            lines.append(
                f"- w={w:g}: 4 steps with the stochastic sampler (the 2-step student on the 4-step grid) FD {sto:.1f} "
                f"= {ratio:.2f}x the teacher's ({verdict})"
            )
        olss = at.get(("teacher+olss", 4))
        two = {m: fd for (m, e), fd in at.items() if e == 2 and not m.startswith("teacher")}
        if olss is not None and two:
            best = min(two, key=two.get)
            verdict = "met" if two[best] < olss else "missed"
            lines.append(
                f"- w={w:g}: best student at 2 evaluations ({best}) FD {two[best]:.1f} vs OLSS-2 with CFG (4 "
                f"evaluations) {olss:.1f} ({verdict})"
            )
    return "\n".join(lines)


def distill_plot(rows: list[dict], path: Path) -> None:
    """The frontier: FD vs UNet evaluations per image (log x), one panel per guidance weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights = sorted({r["w"] for r in rows})
    fig, axes = plt.subplots(1, len(weights), figsize=(4.6 * len(weights), 4.2), squeeze=False, sharey=True)
    for ax, w in zip(axes[0], weights):
        mine = [r for r in rows if r["w"] == w]
        lines = {
            "teacher + DPM-Solver++(2M), CFG": [r for r in mine if r["method"] == "teacher+dpmpp_2m"],
            "teacher + OLSS, CFG": [r for r in mine if r["method"] == "teacher+olss"],
            "teacher + USF, CFG": [r for r in mine if r["method"] == "teacher+usf"],
            "progressive students (DDIM)": [
                r for r in mine if r["method"].startswith("steps-") and "stoch" not in r["method"]
            ],
            "progressive students, stochastic": [r for r in mine if r["method"].endswith("stochastic")],
        }
        for i, (label, group) in enumerate(lines.items()):
            points = sorted((r["unet_evaluations"], r["fd"]) for r in group)
            if points:
                ax.plot(*zip(*points), marker="osv^D"[i], markersize=4, linewidth=1.4, label=label)
        for r in mine:
            if r["method"] in ("teacher+ddim", "guided"):
                teacher = r["method"] == "teacher+ddim"
                ax.scatter(
                    [r["unet_evaluations"]], [r["fd"]], marker="*", s=90, zorder=3, color="k" if teacher else "C5"
                )
                ax.annotate(
                    "teacher, CFG DDIM-64" if teacher else "guided student, DDIM-64",
                    (r["unet_evaluations"], r["fd"]),
                    fontsize=7,
                    xytext=(-70, -16) if teacher else (-70, 10),
                    textcoords="offset points",
                )
                if teacher:
                    ax.axhline(1.1 * r["fd"], color="grey", linewidth=0.8, linestyle=":", label="1.1x the teacher's FD")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("UNet evaluations per image")
        ax.set_ylabel("feature FD to real digits (lower is better)")
        ax.set_title(f"digits, guidance w={w:g}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def runtime_table(benchmarks: list[dict]) -> str:
    """Loop overhead per step: a row per latent size, a column per runtime, C++/Python ratios."""
    rows = [b["extra_info"] for b in benchmarks if b.get("group") == "runtime-loop-overhead"]
    runtimes = list(dict.fromkeys(r["runtime"] for r in rows))
    cell = {(r["latent"], r["runtime"]): r["overhead_per_step_us"] for r in rows}
    ratios = [r for r in runtimes if r != "python"]
    head = "| latent (batch 2, CFG) | " + " | ".join(f"{r} µs/step" for r in runtimes)
    head += "".join(f" | {r} / python" for r in ratios) + " |"
    lines = [head, "| --- " * (1 + len(runtimes) + len(ratios)) + "|"]
    for latent in dict.fromkeys(r["latent"] for r in rows):
        values = [cell.get((latent, r)) for r in runtimes]
        line = f"| {latent} | " + " | ".join("—" if v is None else f"{v:.1f}" for v in values)
        base = cell.get((latent, "python"))
        for r in ratios:
            v = cell.get((latent, r))
            line += " | —" if v is None or not base else f" | {v / base:.2f}×"
        lines.append(line + " |")
    return "\n".join(lines)


def parity_table(benchmarks: list[dict]) -> str:
    """Per solver variant: cases, and the median / largest final-latent and model-input difference."""
    import statistics

    rows = [b["extra_info"] for b in benchmarks if b.get("group") == "solver-parity"]
    variants: dict[str, list[dict]] = {}
    for r in rows:
        key = f"{r['solver']} {json.dumps(r['options'])}" + (
            " (vs diffusers in float64)" if r["float64_reference"] else ""
        )
        variants.setdefault(key, []).append(r)
    lines = [
        "| solver, options | cases | result: median | result: max | inputs: max | times equal |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key, rs in variants.items():
        res = [r["result_error"] for r in rs]
        lines.append(
            f"| {key} | {len(rs)} | {statistics.median(res):.1e} | {max(res):.1e} | "
            f"{max(r['input_error'] for r in rs):.1e} | {all(r['times_equal'] for r in rs)} |"
        )
    every = sorted(r["result_error"] for r in rows)
    q = lambda f: every[min(len(every) - 1, int(f * len(every)))]  # noqa: E731
    lines.append(
        f"\nAll {len(every)} cases: final latent median {statistics.median(every):.1e}, 10th-90th percentile "
        f"{q(0.1):.1e}-{q(0.9):.1e}, max {every[-1]:.1e} (relative RMS)."
    )
    return "\n".join(lines)


def backends_table(benchmarks: list[dict]) -> str:
    """eager vs compiled on the CPU, side by side (bench/test_backends_cpu.py): medians."""
    rows = {
        "cpu-backends-unet-step": "one guided UNet call (batch 2 x CFG)",
        "cpu-backends-sample-20": "20-step sample, 2 prompts",
    }
    lines = ["| workload | eager | compiled | speed-up | compiled: first call |", "| --- | --- | --- | --- | --- |"]
    for group, what in rows.items():
        got = {b["extra_info"]["backend"]: b for b in benchmarks if b.get("group") == group}
        if {"eager", "compiled"} <= set(got):
            eager, comp = got["eager"]["stats"]["median"], got["compiled"]["stats"]["median"]
            first = got["compiled"]["extra_info"]["first_call_s"]
            lines.append(
                f"| {what} | {eager * 1e3:.1f} ms | {comp * 1e3:.1f} ms | {eager / comp:.2f}x | {first:.0f} s |"
            )
    return "\n".join(lines)


def service_table(benchmarks: list[dict]) -> str:
    """The C++ service (bench/test_service_cpu.py): a row per worker-thread count."""
    rows = sorted((b["extra_info"] for b in benchmarks if b.get("group") == "service-cpu"), key=lambda r: r["threads"])
    lines = [
        "| worker threads | intra-op threads each | images/s (median; all rounds) | mean latency | max latency | "
        "package load |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        rounds = ", ".join(f"{v:.1f}" for v in r["images_per_s_rounds"])
        lines.append(
            f"| {r['threads']} | {r['intra_op_threads']} | {r['images_per_s']:.1f} ({rounds}) | "
            f"{r['mean_latency_ms']:.0f} ms | {r['max_latency_ms']:.0f} ms | {r['load_s']:.2f} s |"
        )
    return "\n".join(lines)


def serving_table(benchmarks: list[dict]) -> str:
    """`fastdiff serve` under load (bench/test_serving.py): a row per (batching, replicas), with the
    speed-up of batching over the same replicas without it."""
    rows = [b["extra_info"] for b in benchmarks if b.get("group") == "serving-load"]
    plain = {r["replicas"]: r["images_per_s"] for r in rows if not r["batching"]}
    lines = [
        "| batching | replicas | images/s | vs unbatched | p50 latency | p99 latency | images per sampling call | "
        "errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(rows, key=lambda r: (r["replicas"], not r["batching"])):
        ratio = r["images_per_s"] / plain[r["replicas"]] if r["replicas"] in plain else float("nan")
        lines.append(
            f"| {'on' if r['batching'] else 'off'} | {r['replicas']} | {r['images_per_s']:.1f} | {ratio:.2f}x | "
            f"{r['p50_ms']:.0f} ms | {r['p99_ms']:.0f} ms | {r['mean_batch_images']:.1f} | {r['errors']} |"
        )
    return "\n".join(lines)


def timing_table(benchmarks: list[dict]) -> str:
    lines = ["| benchmark | mean | stddev | rounds |", "| --- | --- | --- | --- |"]
    for b in benchmarks:
        s = b["stats"]
        lines.append(f"| {b['name']} | {s['mean'] * 1e3:.3f} ms | {s['stddev'] * 1e3:.3f} ms | {s['rounds']} |")
    return "\n".join(lines)


def _write(path: Path, text: str, *written: Path) -> None:
    """Write a rendered report and say so, with the files the caller wrote beside it."""
    path.write_text(text)
    print(f"wrote {path}" + "".join(f" and {w}" for w in written))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark --benchmark-json files")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="output directory")
    args = parser.parse_args(argv)
    missing = [p for p in args.json if not p.is_file()]
    if missing:
        print(f"report: no such benchmark JSON: {missing[0]}", file=sys.stderr)
        return 2
    benchmarks, machine, code = load(args.json)
    args.out.mkdir(parents=True, exist_ok=True)
    where = (
        f"{machine.get('cpu', {}).get('brand_raw', 'unknown CPU')}, python {machine.get('python_version', '?')}, {code}"
    )
    rows = quality_rows(benchmarks)
    if rows:
        text = (
            "# GMM solver quality\n\nRelative RMS error of each solver's result vs the exact probability-flow "
            "ODE solution (64-d mixture of 8 Gaussians, SD scaled_linear schedule, ε model, trailing "
            f"spacing, 64 samples). NFE in brackets where it differs from N. Machine: {where}.\n\n"
            + quality_table(rows)
            + "\n\nThe compiled Programs (`fastdiff.program.compile`): latents a loop keeps (the rows; the model's "
            "output comes on top) at each N, and the largest difference of the re-expanded program from the "
            "plan's coefficients (relative to max |coef|) over all N.\n\n" + program_table(rows) + "\n"
        )
        quality_plot(rows, args.out / "solver_quality.png")
        _write(args.out / "solver_quality.md", text, args.out / "solver_quality.png")
    if any(b.get("group") == "tiny-shapes-adherence" for b in benchmarks):
        text = (
            "# tiny-shapes adherence\n\nShare of 200 prompts whose image shows the named colour and shape "
            "(colour/shape accuracy in brackets), CPU, default guidance. Machine: "
            f"{where}.\n\n{adherence_table(benchmarks)}\n\n## Latency\n\n{latency_table(benchmarks)}\n"
        )
        _write(args.out / "tiny_shapes.md", text)
    if any(b.get("group") == "digits-quality" for b in benchmarks):
        text = (
            "# digits quality\n\nClassifier accuracy / feature Fréchet distance of 500 samples (50 per digit) "
            f"vs steps, default guidance. Machine: {where}.\n\n{digits_table(benchmarks)}\n"
        )
        _write(args.out / "digits.md", text)
    studies = [s for s in OLSS_STUDIES if olss_rows(benchmarks, s)]
    if studies:
        parts = ["# OLSS quality\n\nRelative RMS error of the final latents on samples held out from calibration."]
        for study in studies:
            table = olss_table(olss_rows(benchmarks, study))
            parts.append(f"## {study}\n\nReference: {OLSS_REFERENCE[study]}.\n\n{table}")
        parts.append(f"Machine: {where}.")
        olss_plot(benchmarks, args.out / "olss_quality.png")
        _write(args.out / "olss_quality.md", "\n\n".join(parts) + "\n", args.out / "olss_quality.png")
    studies = [s for s in OLSS_STUDIES if olss_rows(benchmarks, s, "search-quality")]
    if studies:
        parts = [
            "# USF search quality\n\nRelative RMS error of the final latents (pixels for digits) on samples held out "
            "from the search and calibration, NFE 3-10 (and DPM-Solver++(2M) at 20). usf_*: searched strategies "
            "(`fastdiff.calibration.search`); olss_*: OLSS plans; gits_*: GITS's tuned times (DP on the search "
            "teacher's grid) with that solver's steps; ipndm: iPNDM."
        ]
        for study in studies:
            rows = olss_rows(benchmarks, study, "search-quality")
            parts.append(f"## {study}\n\nReference: {SEARCH_REFERENCE[study]}.\n\n{olss_table(rows)}")
            for key, what, fmt in (
                ("adherence", "prompt adherence of 64 held-out prompts (higher is better)", ".3f"),
                ("fd", "feature Fréchet distance of 200 samples, 20 per class (lower is better)", ".2f"),
                ("accuracy", "classifier accuracy of the same 200 samples", ".3f"),
            ):
                if any(r.get(key) is not None for r in rows):
                    parts.append(f"{study}, {what}:\n\n{olss_table(rows, key, fmt)}")
        parts.append(f"## Search cost\n\n{search_cost_table(benchmarks)}")
        if any(b.get("group") == "search-predictor" for b in benchmarks):
            parts.append(
                "## The ranking predictor\n\nNFE 5, budget 200 candidates, the same seed with and without the "
                "predictor; model calls the predictor run spent until its best proxy error reached the plain run's "
                f"final one; ρ: Spearman correlation on held-out strategies (5-fold).\n\n{predictor_table(benchmarks)}"
            )
        parts.append(f"Machine: {where}.")
        olss_plot(benchmarks, args.out / "search_quality.png", "search-quality", ("usf", "olss", "auto"))
        _write(args.out / "search_quality.md", "\n\n".join(parts) + "\n", args.out / "search_quality.png")
    if any(b.get("group") == "serving-load" for b in benchmarks):
        r0 = next(b["extra_info"] for b in benchmarks if b.get("group") == "serving-load")
        text = (
            "# fastdiff serve under load\n\nbench/test_serving.py: tiny-shapes, "
            f"{r0['steps']} steps, {r0['clients']} concurrent HTTP clients (closed loop) sending {r0['requests']} "
            "requests to a local Ray Serve instance, with dynamic batching (@serve.batch) on and off and 1 and 2 "
            "replicas (1 CPU and 1 intra-op thread each), side by side in one run; images/s over the whole run, "
            "latency per request. "
            f"Machine: {where}.\n\n{serving_table(benchmarks)}\n"
        )
        if any(b.get("group") == "service-cpu" for b in benchmarks):
            text += f"\nThe C++ service on the same model in the same run (no Python):\n\n{service_table(benchmarks)}\n"
        _write(args.out / "serving.md", text)
    rows = distill_rows(benchmarks)
    if rows:
        samples = rows[0]["samples"]
        text = (
            "# Guided distillation on digits\n\nbench/test_distill_quality.py: feature Fréchet distance (FD) to the "
            f"real digits and classifier accuracy of {samples} samples (an equal number per class, held-out noise), "
            "per guidance weight w, against UNet evaluations per image. teacher+ddim: the classifier-free-guided "
            "teacher, DDIM 64 steps (2 evaluations per step); teacher+dpmpp_2m / teacher+olss: training-free plans "
            "with CFG; guided: the stage-1 student (one evaluation per step) with DDIM 64; steps-M: the "
            "progressive students on their own M steps, and 'stochastic' with the paper's sampler on 2M calls. "
            "s/image: wall time of one batch of all samples on the CPU, per image. Plot: distill_quality.png. "
            f"Machine: {where}.\n\n{distill_table(rows)}\n\n## Targets\n\n{distill_targets(rows)}\n"
        )
        distill_plot(rows, args.out / "distill_quality.png")
        _write(args.out / "distill_quality.md", text, args.out / "distill_quality.png")
    rows = gate_rows(benchmarks)
    if rows:
        text = (
            "# AdaptiveDiffusion gate on tiny-shapes\n\nUNet calls saved and fidelity to the same run without "
            "skipping: PSNR of the 8-bit 32x32 images (over all images, and per image median / worst), prompt "
            "adherence of 200 prompts (one batch, seed 0), max_skips 4, warmup 3. Wall time is one run on the "
            f"CPU. Machine: {where}.\n\n{gate_table(rows)}\n"
        )
        gate_plot(rows, args.out / "gate_quality.png")
        _write(args.out / "gate_quality.md", text, args.out / "gate_quality.png")
    rows = peer_rows(benchmarks)
    if rows:
        text = (
            "# Step skipping vs the caching peers, side by side\n\nbench/test_skip_peers.py: every method on the same "
            "engine, DPM-Solver++(2M), steps, noise and 32 held-out prompts (tiny-shapes guidance 1.5, digits the "
            "model's). Speed-up: wall time of the whole sample call, the median of three runs, against the median "
            "of three unaccelerated runs interleaved with them. PSNR/SSIM: the 8-bit images against the "
            "unaccelerated ones (pooled over all images, the median and the worst image). Plot: skip_peers.png "
            f"(points: settings; lines: each method's Pareto front). Machine: {where}.\n\n{peer_table(rows)}\n"
        )
        peer_plot(rows, args.out / "skip_peers.png")
        _write(args.out / "skip_peers.md", text, args.out / "skip_peers.png")
    if any(b.get("group") == "runtime-loop-overhead" for b in benchmarks):
        text = (
            "# Sampling-loop overhead: the reference loop (Python) vs the C++ loop\n\nPer step of a 20-step "
            "dpmpp_2m plan with an identity model (bench/test_runtime_cpu.py): the fused step, bookkeeping and the "
            "model-call crossing, the model's own time subtracted. python is the reference loop (the default loop "
            "on the CPU); cpp-callback calls a Python model from the C++ loop (loop='cpp'); cpp-native has no "
            "Python at all (a C++ service). Medians, one run, side by side. "
            f"Target: C++ ≤ 0.5× Python. Machine: {where}.\n\n{runtime_table(benchmarks)}\n"
        )
        raw = [b for b in benchmarks if b.get("group") == "runtime-loop-overhead"]
        (args.out / "runtime_cpu.json").write_text(
            json.dumps({"machine_info": machine, "code": code, "benchmarks": raw}, indent=1)
        )
        _write(args.out / "runtime.md", text, args.out / "runtime_cpu.json")
    if any(b.get("group") == "cpu-backends-unet-step" for b in benchmarks):
        text = (
            "# Backends on the CPU\n\ntiny-shapes, eager vs compiled (torch.compile / Inductor), side by side in one "
            "run (bench/test_backends_cpu.py), 2 threads; medians; the first compiled call per shape compiles "
            f"and is kept out of the timing. Machine: {where}.\n\n{backends_table(benchmarks)}\n"
        )
        _write(args.out / "backends.md", text)
    if any(b.get("group") == "solver-parity" for b in benchmarks):
        text = (
            "# Parity with diffusers\n\nEach solver variant's plan on the reference loop against the diffusers "
            "scheduler's own loop (bench/test_parity_cpu.py = tests/test_solver_parity.py's cases): same config, "
            "steps 4/7/20, leading/trailing/linspace spacing, ε and v (x_0 for five variants), float32 latents "
            "3x3x5x7, an exact Gaussian-mixture model. Differences are relative RMS of the final latent and the "
            f"largest over the model inputs. Machine: {where}.\n\n{parity_table(benchmarks)}\n"
        )
        _write(args.out / "parity.md", text)
    service = [b["extra_info"] for b in benchmarks if b.get("group") == "service-cpu"]
    if service:
        first = service[0]
        text = (
            "# The C++ service on the CPU\n\nfastdiff_service (csrc/examples/service.cpp) on the AOTI package of "
            f"tiny-shapes: {first['requests']} requests of one image each, {first['unet_calls_per_request']:g} UNet "
            f"calls per request (guidance scale {first['guidance_scale']:g}), VAE decode and PNG included, served by "
            "worker threads that share one package and one Sampler (bench/test_service_cpu.py). Images/s is over "
            "the serving time (package load apart), one process per round, 3 rounds. Machine: "
            f"{where}, {first['cores']} cores.\n\n{service_table(benchmarks)}\n"
        )
        _write(args.out / "service.md", text)
    _write(args.out / "timings.md", f"# Benchmark timings\n\nMachine: {where}.\n\n{timing_table(benchmarks)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
