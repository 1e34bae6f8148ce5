"""The ``fastdiff`` command line: sample, info, solvers, plan, calibrate, search, choose, calibrate-gate, export,
bench."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _schedule(args):
    from .schedules import PRESETS, DiscreteSchedule

    if args.config:
        return DiscreteSchedule.from_file(args.config)
    return DiscreteSchedule.from_config(PRESETS[args.preset])


def cmd_info(args) -> int:
    from .info import report

    print(report())
    return 0


def cmd_solvers(args) -> int:
    from . import solvers

    for name in solvers.names():
        print(f"{name:10s} {solvers.describe(name)}")
        if args.options:
            for key, default in solvers.options(name).items():
                print(f"{'':12s}{key} = {default!r}")
    return 0


def cmd_plan(args) -> int:
    from . import program, solvers

    options = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        options[key] = _parse_value(value)
    plan = solvers.build(args.solver, _schedule(args), args.steps, **options)
    compiled = program.compile(plan)
    if args.out:
        plan.save(args.out)
        print(f"wrote {args.out}")
    print(
        f"{plan!r}\n  times: {', '.join(f'{t:g}' for t in plan.times)}\n"
        f"  program: {compiled.num_rows} latents at peak (+ the model output), table width {compiled.width}, "
        f"re-expansion error {compiled.max_error:.1e}"
    )
    return 0


def cmd_sample(args) -> int:
    from .gate import GateSpec
    from .models.registry import build_engine

    if args.skip_delta is not None and args.skip is not None:
        raise ValueError("give --skip adaptive or --skip-delta, not both")
    skip = args.skip
    if args.skip_delta is not None:
        skip = GateSpec(
            delta=args.skip_delta, max_skips=args.max_skips, per_sample=not args.batch_decisions, reuse=args.reuse
        )

    engine = build_engine(
        args.model,
        device=args.device,
        dtype=args.dtype,
        sampler=args.sampler,
        weights=args.weights,
        allow_pickle=args.allow_pickle,
        backend=args.backend,
        loop=args.loop,
    )
    out = engine.sample(
        args.prompt,
        steps=args.steps,
        guidance_scale=args.guidance,
        negative_prompt=args.negative,
        seed=args.seed,
        num_images=args.num_images,
        height=args.height,
        width=args.width,
        skip=skip,
        feature_cache=args.feature_cache,
    )
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for i, image in enumerate(out.images):
        target = path if len(out.images) == 1 else path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}")
        if args.scale > 1:
            image = image.resize((image.width * args.scale, image.height * args.scale), resample=0)
        image.save(target)
        written.append(str(target))
    timings = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in out.timings.items())
    calls = f"{out.unet_calls} UNet calls"
    if skip is not None:
        calls += f" of {out.plan.nfe} (per image: {', '.join(map(str, out.nfe))})"
    if out.shallow_calls:
        calls += f", {out.shallow_calls} of them shallow (feature cache)"
    print(f"{engine!r}: {calls} ({out.plan.metadata.get('solver', 'plan')}), seed {out.seed}; {timings}")
    if args.backend == "auto":
        print(f"backend {engine.backend}: {engine.backend_reason}")
    if args.loop == "auto":
        print(f"loop {engine.loop.name}")
    for note in out.notes:
        print(f"note: {note}")
    print("wrote " + ", ".join(written))
    return 0


def cmd_export(args) -> int:
    from .export import ExportError, export_onnx
    from .models.registry import build_engine

    engine = build_engine(
        args.model, device="cpu", dtype="float32", weights=args.weights, allow_pickle=args.allow_pickle
    )
    if args.format == "aoti":
        from .aoti import AOTIExportError, export_aoti
        from .plan import StepPlan

        try:
            manifest = export_aoti(
                engine,
                args.out,
                prompts=args.prompt or ["a red circle on a blue background"],
                negative_prompt=args.negative_prompt,
                guidance_scale=args.guidance,
                sampler=args.sampler,
                steps=args.steps,
                plan=StepPlan.load(args.plan) if args.plan else None,
                decoder=not args.no_decoder,
            )
        except AOTIExportError as exc:
            raise ValueError(str(exc)) from exc
        print(f"wrote {manifest}")
        return 0
    try:
        modules = export_onnx(engine, args.out, batch=args.batch, validate=not args.no_validate)
    except ExportError as exc:
        raise ValueError(str(exc)) from exc
    for m in modules:
        check = "not validated" if m.max_rel_error is None else f"onnxruntime vs torch {m.max_rel_error:.1e} (relative)"
        print(f"{m.name}: {m.path} ({m.path.stat().st_size / 1e6:.1f} MB), {check}")
    print(f"wrote {Path(args.out) / 'fastdiff_export.json'}")
    return 0


def _print_calibration(engine_name: str, steps: int, record: dict) -> None:
    print(
        f"OLSS {steps} steps on {engine_name}: teacher {record['teacher']}, path {record['path_kind']} "
        f"{record['path']} (teacher call indices), {'closed' if record['closed_loop'] else 'open'} loop, "
        f"{record['samples']} samples"
    )
    print("| row | target | rel. residual | held-out MSE | ridge λ | condition |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in record["rows"]:
        cv = "-" if row["cv_mse"] is None else f"{row['cv_mse']:.3g}"
        print(
            f"| {row['row']} | {row['target']} | {row['rel_residual']:.3g} | {cv} | {row['ridge']:.0e} | "
            f"{row['condition']:.2g} |"
        )


def cmd_calibrate_gate(args) -> int:
    from .calibration.gate import DELTAS, MAX_SKIPS, calibrate_gate
    from .models.registry import build_engine

    engine = build_engine(
        args.model, device=args.device, dtype=args.dtype, weights=args.weights, allow_pickle=args.allow_pickle
    )
    decisions = {"both": (False, True), "batch": (False,), "sample": (True,)}[args.decisions]
    result = calibrate_gate(
        engine,
        steps=args.steps,
        sampler=args.sampler,
        target_psnr=args.target_psnr,
        worst_psnr=args.worst_psnr,
        samples=args.samples,
        held_out=args.held_out,
        seed=args.seed,
        guidance_scale=args.guidance,
        deltas=tuple(args.deltas or DELTAS),
        max_skips=tuple(args.max_skips or MAX_SKIPS),
        per_sample=decisions,
        reuse=args.reuse,
    )
    print(result.table())
    g, f = result.gate, result.chosen.fidelity
    print(
        f"\n{'chosen' if result.met else 'NOT MET, closest'}: delta={g.delta:g}, max_skips={g.max_skips}, "
        f"{'per-image' if g.per_sample else 'per-batch'} decisions, reuse={g.reuse} ({result.message})"
    )
    print(
        f"calibration ({result.prompts} prompts): {result.chosen.calls:.1f} calls/image ({result.chosen.speedup:.2f}x "
        f"fewer, {result.chosen.unet_speedup:.2f}x less UNet time), PSNR {f['psnr']:.1f} dB pooled, "
        f"{f['psnr_worst']:.1f} dB worst, SSIM {f['ssim']:.4f}"
    )
    if result.held_out is not None:
        h, hf = result.held_out, result.held_out.fidelity
        print(
            f"held out ({result.held_out_prompts} prompts): {h.calls:.1f} calls/image ({h.speedup:.2f}x fewer), PSNR "
            f"{hf['psnr']:.1f} dB pooled, {hf['psnr_worst']:.1f} dB worst, SSIM {hf['ssim']:.4f}"
        )
    if result.fewer_steps:
        base, parts = result.fewer_steps, []
        for key, gate in (("calibration", result.chosen), ("held_out", result.held_out)):
            if gate is not None and key in base:
                b, g = base[key], gate.fidelity
                parts.append(
                    f"{key.replace('_', ' ')} {b['psnr']:.1f} dB pooled, {b['psnr_worst']:.1f} dB worst "
                    f"(the gate: {g['psnr']:.1f} / {g['psnr_worst']:.1f})"
                )
        print(
            f"without skipping, {base.get('sampler', result.sampler)} at {base['steps']} steps (as many calls): "
            + "; ".join(parts)
        )
    for c in result.cliff:
        print(
            f"cliff ({'per-image' if c['per_sample'] else 'per-batch'}, max_skips {c['max_skips']}): "
            f"{c['drop_db']:.1f} dB lost from delta {c['delta_before']:g} to {c['delta_after']:g}"
        )
    if args.out:
        print(f"wrote {result.save(args.out)}")
    return 0 if result.met else 1


def _calibration_inputs(args, counts: list[int], option: str):
    """What calibrate and search share: the distinct step counts, --out (a directory when there are
    several), the engine and the calibration prompts (--prompts, else --samples from the grammar)."""
    from .models.registry import build_engine, calibration_prompts

    counts = list(dict.fromkeys(counts))
    out = Path(args.out)
    if len(counts) > 1 and out.suffix == ".json":
        raise ValueError(f"--out {out}: several {option} write one plan each, so --out must be a directory")
    engine = build_engine(
        args.model, device=args.device, dtype=args.dtype, weights=args.weights, allow_pickle=args.allow_pickle
    )
    if args.prompts:
        prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    else:
        prompts = calibration_prompts(engine.name, args.samples, seed=args.seed)
    return counts, out, engine, prompts


def cmd_calibrate(args) -> int:
    import tempfile

    from .calibration import olss

    steps_list, out, engine, prompts = _calibration_inputs(args, args.steps, "--steps")
    ridge = args.ridge if args.ridge == "auto" else float(args.ridge)
    with tempfile.TemporaryDirectory(prefix="fastdiff-trajectories-") as scratch:
        # several step counts share one teacher run: the trajectories directory is reused
        directory = args.trajectories or (scratch if len(steps_list) > 1 else None)
        for steps in steps_list:
            plan = olss.calibrate(
                engine,
                prompts,
                steps,
                teacher=args.teacher,
                path=args.path,
                ridge=ridge,
                closed_loop=not args.open_loop,
                seed=args.seed,
                guidance_scale=args.guidance,
                directory=directory,
                batch_size=args.batch_size,
            )
            record = plan.metadata["calibration"]
            record["command"] = "fastdiff " + " ".join(args.argv)
            plan = plan.with_metadata(calibration=record)
            target = out / f"olss-{steps}.json" if len(steps_list) > 1 else out
            target.parent.mkdir(parents=True, exist_ok=True)
            plan.save(target)
            _print_calibration(engine.name, steps, record)
            print(f"wrote {target}")
    return 0


def cmd_search(args) -> int:
    import tempfile

    from .calibration.search import search

    nfes, out, engine, prompts = _calibration_inputs(args, args.nfe, "--nfe")
    with tempfile.TemporaryDirectory(prefix="fastdiff-trajectories-") as scratch:
        directory = args.trajectories or (scratch if len(nfes) > 1 else None)
        for nfe in nfes:
            checkpoint = args.checkpoint
            if checkpoint is not None and len(nfes) > 1:
                checkpoint = Path(checkpoint) / f"search-{nfe}.jsonl"
            result = search(
                engine,
                prompts,
                nfe,
                budget=args.budget,
                teacher=args.teacher,
                samples=args.search_samples,
                seed=args.seed,
                predictor=not args.no_predictor,
                refit=args.refit,
                refit_candidates=args.refit_candidates,
                checkpoint=checkpoint,
                trajectories=directory,
                workers=args.workers,
                ray_address=args.ray_address,
                guidance_scale=args.guidance,
            )
            info = dict(result.plan.metadata["search"], command="fastdiff " + " ".join(args.argv))
            info["wall_seconds"] = round(result.seconds, 1)
            plan = result.best_plan.with_metadata(search=info)
            target = out / f"usf-{nfe}.json" if len(nfes) > 1 else out
            target.parent.mkdir(parents=True, exist_ok=True)
            plan.save(target)
            corr = "n/a" if result.rank_correlation is None else f"{result.rank_correlation:.3f}"
            print(
                f"USF {nfe} calls on {engine.name}: proxy error {result.error:.4g} vs the teacher {info['teacher']} on "
                f"{info['samples']} samples; {info['evaluated']} candidates, {result.calls} model calls, "
                f"{result.seconds:.0f} s; predictor rank correlation (5-fold, held out) {corr}"
            )
            print(f"  times {[round(t) for t in plan.times]}; strategy {json.dumps(result.strategy.to_dict())}")
            if result.validation is not None:
                v = result.validation
                where = f"{v['samples']} held-out" if v["held_out"] else f"the {v['samples']} search (in-sample)"
                other, suffix = (result.plan, "searched") if v["chosen"] == "olss" else (result.refit_plan, "olss")
                print(
                    f"  on {where} samples: searched {v['search']:.4g}, OLSS refit on its times {v['olss']:.4g}; "
                    f"{target.name} is the {'OLSS refit' if v['chosen'] == 'olss' else 'searched plan'}"
                )
                alt = target.with_name(f"{target.stem}.{suffix}.json")
                other.with_metadata(search=info).save(alt)
                print(f"  wrote the other one to {alt}")
            print(f"wrote {target}")
    return 0


def cmd_choose(args) -> int:
    from .calibration.choice import choose_default, save_choice
    from .models.registry import build_engine

    engine = build_engine(
        args.model, device=args.device, dtype=args.dtype, weights=args.weights, allow_pickle=args.allow_pickle
    )
    if args.out is None and engine.plans_dir is None:
        raise ValueError(f"{engine.name} has no plans directory: give --out")
    doc = choose_default(engine, args.steps, samples=args.samples, seed=args.seed, reference=args.reference)
    doc["command"] = "fastdiff " + " ".join(args.argv)
    kinds = list(dict.fromkeys(k for c in doc["choices"].values() for k in c["errors"]))
    lines = ["| steps | " + " | ".join(kinds) + " | auto |", "|" + " --- |" * (len(kinds) + 2)]
    for n, c in doc["choices"].items():
        cells = [f"{c['errors'][k]:.4f}" if k in c["errors"] else "—" for k in kinds]
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {c['sampler']} |")
    v = doc["validation"]
    print(
        f"{engine.name}: relative RMS error vs {v['reference']} on {v['samples']} validation samples (seed {v['seed']})"
    )
    print("\n".join(lines))
    path = save_choice(doc, args.out or engine.plans_dir / "auto.json")
    print(f"wrote {path}")
    return 0


def cmd_distill(args) -> int:
    from .distill import distill_guided
    from .models.registry import build_engine

    engine = build_engine(
        args.model,
        device=args.device,
        dtype=args.dtype or "float32",
        weights=args.weights,
        allow_pickle=args.allow_pickle,
    )
    if args.stage == "guided":
        result = distill_guided(
            engine,
            args.out,
            steps=args.train_steps,
            batch=args.batch,
            lr=args.lr,
            w_range=(args.w_min, args.w_max),
            seed=args.seed,
            checkpoint_every=args.checkpoint_every,
        )
        print(
            f"guided student of {engine.name} (w in [{args.w_min:g}, {args.w_max:g}]): final loss "
            f"{result.info['loss_final']:.4g}; wrote {result.directory} "
            f"(the loss log: {result.directory}/run/log.jsonl)"
        )
        print(f"sample it: fastdiff sample --model {engine.name} --weights {result.directory} --guidance W")
        return 0
    from .distill.progressive import distill_progressive

    if args.weights is None:
        raise ValueError("--stage progressive distils a stage-1 student: give its directory as --weights DIR")
    done = distill_progressive(
        engine,
        args.out,
        start_steps=args.start_steps,
        end_steps=args.end_steps,
        steps_per_round=args.train_steps,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
    )
    for directory in done:
        info = json.loads((directory / "fastdiff.json").read_text())["student"]
        print(
            f"{info['steps']}-step student (from {info['teacher_steps']}): final loss {info['loss_final']:.4g}; "
            f"{directory}"
        )
    if done:
        last = done[-1]
        steps = json.loads((last / "fastdiff.json").read_text())["student"]["steps"]
        print(
            f"sample it: fastdiff sample --model {engine.name} --weights {last} --steps {steps} --guidance W "
            f"(the stochastic sampler: --sampler distilled_stochastic --steps {2 * steps})"
        )
    return 0


def serve_settings(args) -> dict:
    """The serve settings of `fastdiff serve`: --config, then the options given on the command line."""
    from .serving.settings import ServeSettings, read_settings

    doc = read_settings(args.config) if args.config else {}
    if args.model:
        doc["models"] = list(args.model)
    if args.weights:
        models = doc.get("models") or ["tiny-shapes"]
        if len(models) != 1:
            raise ValueError("--weights needs exactly one --model (use 'weights' in --config for several)")
        doc["weights"] = {models[0]: args.weights}
    for key, value in (("device", args.device), ("dtype", args.dtype), ("replicas", args.replicas)):
        if value is not None:
            doc[key] = value
    if args.no_batching:
        doc["batching"] = False
    if args.max_batch_size is not None:
        doc["max_batch_size"] = args.max_batch_size
    if args.batch_wait_ms is not None:
        doc["batch_wait_timeout_s"] = args.batch_wait_ms / 1000
    limits = dict(doc.get("limits") or {})
    for key in ("max_steps", "max_images", "max_side", "max_in_flight"):
        if getattr(args, key) is not None:
            limits[key] = getattr(args, key)
    doc["limits"] = limits
    ServeSettings.from_dict(doc)
    return doc


def cmd_serve(args) -> int:
    import time

    settings = serve_settings(args)
    from .serving.app import run_service

    models = ", ".join(settings.get("models") or ["tiny-shapes"])
    try:
        with run_service(settings, host=args.host, port=args.port, address=args.address) as url:
            print(f"fastdiff serving {models} at {url} (playground: {url}/, API docs: {url}/docs); Ctrl-C stops it")
            sys.stdout.flush()
            if args.run_for is not None:
                time.sleep(args.run_for)
            else:
                while True:
                    time.sleep(3600)
    except KeyboardInterrupt:
        pass
    print("stopped")
    return 0


def cmd_bench_gmm(args) -> int:
    from tqdm import tqdm

    from .testing import quality

    labels = args.solvers or list(quality.SOLVER_VARIANTS)
    unknown = [label for label in labels if label not in quality.SOLVER_VARIANTS]
    if unknown:
        raise ValueError(f"unknown solver variant {unknown[0]!r}: choose from {', '.join(quality.SOLVER_VARIANTS)}")
    problem = quality.default_problem()
    jobs = [(label, n) for label in labels for n in args.steps]
    rows = [quality.measure(problem, label, n) for label, n in tqdm(jobs, desc="solvers", file=sys.stderr)]
    print("Relative RMS error of the result vs the exact probability-flow ODE solution")
    print("(64-d Gaussian mixture, SD schedule, 64 samples; NFE in brackets where it differs from N)\n")
    print(quality.markdown_table(rows, tuple(args.steps)))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
        print(f"\nwrote {args.json}")
    return 0


def _model_options(p, *, runtime: bool = True) -> None:
    """--model and --weights for every command that builds an engine; runtime=True adds --device
    and --dtype (export always runs float32 on the CPU)."""
    from .dtypes import NAMES
    from .models.registry import KNOWN_MODELS

    p.add_argument(
        "--model",
        default="tiny-shapes",
        help=f"{', '.join(KNOWN_MODELS)}, or a diffusers model directory (default: tiny-shapes)",
    )
    p.add_argument(
        "--weights",
        default=None,
        help="the model's weights directory: sd21's diffusers weights or 'random'; a retrained model; or a student "
        "that fastdiff distill wrote",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also load pickle weights (*.bin, *.pt, *.ckpt) where a model directory has no safetensors file. "
        "Risky: loading a pickle file can run arbitrary code, so use it only for files you trust (default: only "
        "safetensors weights load, and a pickle file is refused with an error naming it)",
    )
    if runtime:
        p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
        p.add_argument(
            "--dtype", default=None, choices=NAMES, help="the engine's dtype (default: float16 on CUDA, else float32)"
        )


def build_parser() -> argparse.ArgumentParser:
    from . import loops, solvers
    from .engines.backends import CHOICES as BACKENDS
    from .engines.engine import AUTO, CALIBRATED
    from .gate import REUSE_MODES

    parser = argparse.ArgumentParser(
        prog="fastdiff",
        description="Fast diffusion sampling: StepPlan solvers, an exact-ODE test harness, feature report.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="what this installation can use (CUDA, extension, Triton, ...) and why not")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("solvers", help="list the solvers fastdiff.solvers.build accepts")
    p.add_argument("--options", action="store_true", help="also list each solver's options with diffusers' defaults")
    p.set_defaults(func=cmd_solvers)

    p = sub.add_parser("plan", help="build a solver's StepPlan and save it as JSON")
    p.add_argument("solver", help="solver name (see `fastdiff solvers`)")
    p.add_argument("--steps", type=int, required=True, help="number of solver steps")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", help="a diffusers scheduler_config.json (or a model/scheduler directory)")
    src.add_argument(
        "--preset",
        default="sd15",
        choices=["sd15", "sd21"],
        help="a built-in scheduler config when --config is not given (default: sd15)",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="solver option, e.g. --set use_karras_sigmas=true (value parsed as JSON); repeatable",
    )
    p.add_argument("--out", help="write the plan to this file")
    p.set_defaults(func=cmd_plan)

    samplers = (AUTO, *solvers.VARIANTS, *CALIBRATED)
    p = sub.add_parser("sample", help="sample images from a model into PNG files")
    p.add_argument("prompt", help='the prompt, e.g. "a red circle on a blue background" (digits: "7")')
    _model_options(p)
    p.add_argument("--steps", type=int, default=20, help="sampler steps (default 20)")
    p.add_argument(
        "--sampler",
        default=AUTO,
        choices=samplers,
        metavar="SAMPLER",
        help=f"solver or variant: {', '.join(samplers)} (usf: the model's shipped searched plans, olss: its calibrated "
        "ones, distilled: the plan a progressively distilled student (--weights) was trained for, "
        "distilled_stochastic: the paper's stochastic sampler of that student on twice its steps (fresh noise from "
        "--seed); auto, the default: the plan the model's plans/auto.json measured best for --steps, else the first "
        "shipped of distilled, distilled_stochastic, usf and olss, else dpmpp_2m; the plan run is printed)",
    )
    p.add_argument("--seed", type=int, default=None, help="seed of the initial noise (default: random, printed)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--negative", default=None, help="negative prompt (default: empty)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument(
        "--height", type=int, default=None, help="image height, a multiple of the VAE factor (default: native)"
    )
    p.add_argument(
        "--width", type=int, default=None, help="image width, a multiple of the VAE factor (default: native)"
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="how the UNet, text encoder and VAE run: eager; cuda_graph (captured CUDA graphs, GPU only); "
        "compiled (torch.compile, plus CUDA graphs on a GPU; the first call per size compiles, cached on disk); "
        "auto = compiled on a GPU, eager on the CPU (default; `fastdiff info` says what is available and why)",
    )
    p.add_argument(
        "--loop",
        choices=loops.CHOICES,
        default="auto",
        help="how the plan runs: reference (eager, the fused step after every call); graph (the whole loop in "
        "one CUDA graph; needs the cuda_graph or compiled backend on a GPU); cpp (the loop in C++; CPU, float32); "
        "auto = graph when the backend captures graphs, else reference (default)",
    )
    p.add_argument(
        "--skip-delta",
        type=float,
        default=None,
        help="skip UNet calls with the AdaptiveDiffusion gate at this threshold delta (e.g. 0.01; larger skips "
        "more); the calls made per image are printed (default: no skipping)",
    )
    p.add_argument(
        "--max-skips", type=int, default=4, help="with --skip-delta: at most this many consecutive skips (default 4)"
    )
    p.add_argument(
        "--skip",
        choices=("adaptive",),
        default=None,
        help="adaptive: skip UNet calls with the model's calibrated gate settings for this sampler and step count "
        "(engines/<model>/gates/, made by calibrate-gate), or the default settings where it ships none",
    )
    p.add_argument(
        "--reuse",
        choices=REUSE_MODES,
        default="extrapolate",
        help="with --skip-delta: what a skipped call uses: extrapolate (the line through the previous two outputs "
        "at the call's time; default) or copy (the previous output, as AdaptiveDiffusion)",
    )
    p.add_argument(
        "--batch-decisions",
        action="store_true",
        help="with --skip-delta: one skip decision for the whole batch (from its mean statistic) instead of one per "
        "image; keeps the batch whole, which is faster where UNet calls are overhead-bound",
    )
    p.add_argument(
        "--feature-cache",
        type=int,
        default=None,
        metavar="N",
        help="of the UNet calls that run, make every N-th a full one and let the others reuse the deep features of "
        "the last full call (DeepCache-style); eager backend; with skipping, per-batch decisions only",
    )
    p.add_argument("--out", default="sample.png", help="PNG path; with several images -0, -1, ... are appended")
    p.add_argument(
        "--scale", type=int, default=1, help="enlarge the saved PNG by this integer factor (nearest neighbour)"
    )
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("calibrate", help="fit an OLSS plan to a model (least squares on teacher trajectories)")
    _model_options(p)
    p.add_argument(
        "--steps",
        type=int,
        nargs="+",
        required=True,
        help="model calls of the calibrated plan; several values (e.g. 3 4 5 6 8 10) share one teacher run",
    )
    p.add_argument(
        "--out",
        required=True,
        help="write the plan (JSON) here; with several --steps a directory that receives olss-N.json per N "
        "(a model's plans/ directory makes them its shipped plans for sampler 'olss')",
    )
    p.add_argument(
        "--teacher",
        default="ddim:100",
        help="the many-step teacher as solver:steps, e.g. ddim:100, ddim:1000, dpmpp_2m:500 (default ddim:100)",
    )
    p.add_argument(
        "--path",
        choices=("planned", "uniform", "searched"),
        default="planned",
        help="planned: the paper's path planning (Alg. 1-3); uniform: OLSS-P, an even subsample of the teacher "
        "grid; searched: the planned path refined by coordinate descent on the closed-loop error of a held-out "
        "quarter of the calibration samples (slower: many closed-loop fits)",
    )
    p.add_argument("--open-loop", action="store_true", help="fit on the teacher's outputs only (default: closed loop)")
    p.add_argument("--ridge", default="auto", help="'auto' (chosen on held-out samples) or a relative λ >= 0")
    p.add_argument(
        "--samples", type=int, default=64, help="calibration samples drawn from the model's prompt grammar (default 64)"
    )
    p.add_argument(
        "--prompts", default=None, help="a text file of calibration prompts, one per line (overrides --samples)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration noise and prompts (default 0)")
    p.add_argument(
        "--guidance", type=float, default=None, help="guidance scale during calibration (default: the model's)"
    )
    p.add_argument("--trajectories", default=None, help="keep teacher trajectories in this directory (resumable)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per teacher batch (default 16)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser(
        "search",
        help="search a USF solver strategy for a model and an NFE (S^3: evolution with a ranking predictor)",
        description="Searches per-step solver strategies (times, prediction type, Taylor order, relaxation, "
        "corrector, analytical first step) for a model: candidates are scored by their error against a many-step "
        "teacher on calibration prompts; a ranking predictor chooses which mutants the model scores. The best "
        "strategy is saved as a StepPlan; a model's plans/ directory makes them its shipped 'usf' plans.",
    )
    _model_options(p)
    p.add_argument(
        "--nfe",
        type=int,
        nargs="+",
        required=True,
        help="model calls of the plan; several values share one teacher run",
    )
    p.add_argument(
        "--out",
        required=True,
        help="write the plan (JSON) here; with several --nfe a directory that receives usf-N.json per N",
    )
    p.add_argument(
        "--budget", type=int, default=200, help="candidates evaluated per NFE, the seeds included (default 200)"
    )
    p.add_argument(
        "--teacher",
        default="dpmpp_2m:100",
        help="the many-step run candidates are scored against, and whose grid their times come from "
        "(default dpmpp_2m:100)",
    )
    p.add_argument("--samples", type=int, default=64, help="calibration prompts from the model's grammar (default 64)")
    p.add_argument(
        "--search-samples",
        type=int,
        default=None,
        help="the first this many calibration samples score each candidate (default all; the cost of a candidate "
        "is NFE × this many model calls)",
    )
    p.add_argument(
        "--prompts", default=None, help="a text file of calibration prompts, one per line (overrides --samples)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the noise, the prompts and the search (default 0)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    p.add_argument(
        "--no-predictor",
        action="store_true",
        help="evaluate random mutants instead of the ones the ranking predictor prefers (the plain evolution)",
    )
    p.add_argument(
        "--refit",
        choices=("olss",),
        default=None,
        help="olss: also fit OLSS coefficients (closed loop, on the samples the search scored) on the times of the "
        "best candidates (see --refit-candidates) and keep the best refit; --out gets whichever of it and the searched "
        "plan has the lower error on the calibration samples the search did not score (see --search-samples; "
        "in-sample when it scored all), the other goes to <out>.searched.json or <out>.olss.json",
    )
    p.add_argument(
        "--refit-candidates",
        type=int,
        default=8,
        metavar="K",
        help="with --refit olss: refit the K best candidates with distinct times, each costing about one candidate's "
        "model calls (default 8)",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="a JSON-lines file (with several --nfe: a directory of search-N.jsonl) to resume from and append to; "
        "a checkpoint of other settings is refused",
    )
    p.add_argument("--trajectories", default=None, help="keep the teacher run in this directory (resumable)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes evaluating candidates (default: the CPU count on the CPU, 1 on a GPU)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="evaluate candidates on this Ray cluster (e.g. 10.0.0.1:6379; 'local' starts one on this machine)",
    )
    p.set_defaults(func=cmd_search)

    p = sub.add_parser(
        "choose",
        help="measure the model's shipped plans (usf, olss) and DPM-Solver++(2M) for each step count on validation "
        "prompts and noise no calibration used, against a many-step run, and write what sampler='auto' picks",
        description="Measures every shipped calibrated plan of the model and DPM-Solver++(2M) at each step count on "
        "validation prompts and noise, against a many-step reference run from the same noise, and writes the best "
        "per step count with the plans' hashes to plans/auto.json, which sampler='auto' (the default) follows. An "
        "entry whose plans have changed since is not used.",
    )
    _model_options(p)
    p.add_argument("--steps", type=int, nargs="+", default=None, help="step counts (default: all with a shipped plan)")
    p.add_argument("--samples", type=int, default=32, help="validation prompts from the model's grammar (default 32)")
    p.add_argument(
        "--seed",
        type=int,
        default=3,
        help="seed of the validation prompts and noise (default 3; calibration uses 0, the benches 1 and 2)",
    )
    p.add_argument("--reference", default="dpmpp_2m:500", help="the reference run (default dpmpp_2m:500)")
    p.add_argument("--out", default=None, help="where to write (default: the model's plans/auto.json)")
    p.set_defaults(func=cmd_choose)

    p = sub.add_parser(
        "distill",
        help="guided distillation (Meng et al. 2023): a student that takes the guidance weight as an input and "
        "gives the guided output in one UNet call per step (--stage guided)",
        description="Trains a student of the model's UNet and writes it as a model directory (sample it with "
        "--weights DIR). The run keeps its settings, checkpoints and loss log in DIR/run/: run the same command "
        "again to resume a killed run (the result is the same as an uninterrupted one); other settings in the same "
        "DIR are refused.",
    )
    _model_options(p)
    p.add_argument(
        "--stage",
        choices=("guided", "progressive"),
        required=True,
        help="guided: stage 1, a w-conditioned student of the model; progressive: stage 2, halve the DDIM steps of "
        "the stage-1 student given as --weights, round after round (--start-steps → --end-steps)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="guided: the student's model directory (its run state in DIR/run/); progressive: a directory of one "
        "student per round, DIR/steps-M/ (each a model directory with plans/distilled-M.json, and "
        "plans/distilled_stochastic-2M.json for the stochastic sampler)",
    )
    p.add_argument(
        "--train-steps", type=int, default=2000, help="optimizer steps (per round for progressive; default 2000)"
    )
    p.add_argument("--batch", type=int, default=64, help="training samples per step (default 64)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate, AdamW, cosine decay (default 1e-4)")
    p.add_argument(
        "--start-steps", type=int, default=64, help="progressive: the stage-1 student's DDIM steps (default 64)"
    )
    p.add_argument("--end-steps", type=int, default=1, help="progressive: the last round's steps (default 1)")
    p.add_argument(
        "--w-min", type=float, default=1.0, help="guided: smallest guidance weight trained on (default 1: none)"
    )
    p.add_argument("--w-max", type=float, default=5.0, help="guided: largest guidance weight trained on (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, noise, w and new layers (default 0)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default 100)")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser(
        "calibrate-gate",
        help="choose the skip gate's settings (delta, max_skips, per-image or per-batch decisions) for a model and "
        "plan from calibration prompts, so that held-out prompts keep a target PSNR; also reports the sampler "
        "without skipping at as many steps as the chosen setting makes calls (the baseline to beat)",
    )
    _model_options(p)
    p.add_argument("--steps", type=int, required=True, help="model calls of the plan the gate skips in (e.g. 50)")
    p.add_argument(
        "--sampler",
        default=None,
        help="the plan's sampler (default: the model's, 'auto': the best plan it ships for --steps, else dpmpp_2m)",
    )
    p.add_argument(
        "--target-psnr",
        type=float,
        default=35.0,
        help="pooled PSNR (dB, 8-bit images) the skipped runs must keep against the same runs without skipping "
        "(default 35)",
    )
    p.add_argument(
        "--worst-psnr",
        type=float,
        default=None,
        help="PSNR floor for the worst single image (default: target - 10 dB)",
    )
    p.add_argument("--samples", type=int, default=16, help="calibration prompts from the model's grammar (default 16)")
    p.add_argument("--held-out", type=int, default=16, help="held-out prompts that check the choice (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise and the prompts (default 0)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    p.add_argument("--deltas", type=float, nargs="+", default=None, help="the delta grid (default 0.002 0.005 ... 0.2)")
    p.add_argument("--max-skips", type=int, nargs="+", default=None, help="the max_skips grid (default 1 2 3 4 6)")
    p.add_argument(
        "--decisions",
        choices=("both", "batch", "sample"),
        default="both",
        help="per-batch or per-image skip decisions, or try both (default)",
    )
    p.add_argument(
        "--reuse",
        choices=REUSE_MODES,
        default="extrapolate",
        help="what a skipped call uses (default extrapolate)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="write the settings and measurements (JSON) here; engines/<model>/gates/<sampler>-<steps>.json makes "
        "them what `--skip adaptive` uses",
    )
    p.set_defaults(func=cmd_calibrate_gate)

    p = sub.add_parser(
        "export",
        help="export a model's text encoder, UNet and VAE decoder to ONNX (TensorRT's input), checked by onnxruntime",
    )
    _model_options(p, runtime=False)
    p.add_argument(
        "--format",
        choices=("onnx", "aoti"),
        default="onnx",
        help="onnx: text encoder, UNet and VAE decoder as ONNX (default); aoti: AOTInductor packages of the UNet and "
        "VAE decoder plus the plan and pre-encoded prompts, for the C++ runtime (csrc/examples/service.cpp)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="directory receiving text_encoder/, unet/, vae_decoder/ model.onnx files (onnx) or the AOTI package",
    )
    p.add_argument(
        "--prompt", action="append", help="aoti: a prompt to pre-encode (repeat for several; the service cycles them)"
    )
    p.add_argument("--negative-prompt", default="", help="aoti: the unconditional prompt (default empty)")
    p.add_argument("--guidance", type=float, default=None, help="aoti: guidance scale (default: the model's)")
    p.add_argument(
        "--sampler",
        default=None,
        choices=samplers,
        metavar="SAMPLER",
        help="aoti: the plan's sampler (default: the model's)",
    )
    p.add_argument("--steps", type=int, default=8, help="aoti: the plan's steps (default 8)")
    p.add_argument("--plan", default=None, help="aoti: a StepPlan file to ship instead of sampler/steps")
    p.add_argument("--no-decoder", action="store_true", help="aoti: skip the VAE decoder package")
    p.add_argument("--batch", type=int, default=2, help="batch of the example inputs (axes stay dynamic; default 2)")
    p.add_argument(
        "--no-validate",
        action="store_true",
        help="skip the onnxruntime check against torch at another batch and spatial size",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "serve",
        help="an HTTP service of the models on Ray Serve (POST /v1/images, a playground page at /)",
        description="Serves the models over HTTP on Ray Serve: POST /v1/images, GET /v1/models, /healthz, /readyz, "
        "the API's docs at /docs and a playground page at /. Starts a local Ray instance unless --address names a "
        'cluster; runs until interrupted (Ctrl-C). Needs the serve extra: pip install "fastdiff[serve]".',
    )
    p.add_argument(
        "--model",
        action="append",
        default=None,
        help="a model to serve (repeat for several; default: tiny-shapes); requests name it in 'model'",
    )
    p.add_argument("--weights", default=None, help="weights directory of the (single) model, as for sample")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="the engines' dtype (default: float16 on CUDA, else float32)")
    p.add_argument("--replicas", type=int, default=None, help="replicas per model (default 1)")
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy listens on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument(
        "--address",
        default=None,
        help="a Ray cluster to deploy onto (ray://HOST:10001 or auto); default: start a local Ray instance",
    )
    p.add_argument(
        "--config",
        default=None,
        help="a YAML or JSON file of serve settings (models, weights, replicas, autoscaling, batching, limits; "
        "see README); command-line options override it",
    )
    p.add_argument("--no-batching", action="store_true", help="run every request alone (no @serve.batch)")
    p.add_argument("--max-batch-size", type=int, default=None, help="requests per sampling call at most (default 8)")
    p.add_argument(
        "--batch-wait-ms", type=float, default=None, help="how long a batch waits to fill, milliseconds (default 50)"
    )
    p.add_argument("--max-steps", type=int, default=None, help="cap on steps per request (default 100)")
    p.add_argument("--max-images", type=int, default=None, help="cap on images per request (default 8)")
    p.add_argument("--max-side", type=int, default=None, help="cap on height and width in pixels (default 512)")
    p.add_argument(
        "--max-in-flight", type=int, default=None, help="requests in flight before 429 Retry-After (default 64)"
    )
    p.add_argument("--run-for", type=float, default=None, help=argparse.SUPPRESS)  # seconds, then shut down (tests)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="quick benchmarks that print tables")
    bench = p.add_subparsers(dest="bench", required=True)
    g = bench.add_parser("gmm", help="solver error vs the exact ODE solution on a Gaussian mixture")
    g.add_argument("--steps", type=int, nargs="+", default=[3, 5, 10, 20], help="step counts (default: 3 5 10 20)")
    g.add_argument("--solvers", nargs="+", help="solver variants to run (default: all)")
    g.add_argument("--json", help="also write the rows as JSON to this file")
    g.set_defaults(func=cmd_bench_gmm)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError, FloatingPointError) as exc:
        # PlanError, ScheduleError, SolverError, ModelNotFoundError, NonFiniteError and bad
        # arguments all land here with a message that names the problem.
        print(f"fastdiff: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
