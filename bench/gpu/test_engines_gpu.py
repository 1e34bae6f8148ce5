"""Engines on a GPU (issue 7): 5-step end-to-end at batch 1 and 4 (text encode + 5 UNet calls + VAE
decode, SD 2.1 architecture at 768², random weights, float16, classifier-free guidance), its parts
per backend (one UNet step, the text encodes, the VAE decode), and the same workload through an
unmodified diffusers StableDiffusionPipeline (eager) at 5 steps and at 25 and 50 (its default).

    make bench-gpu    # pytest bench/gpu --benchmark-json=bench/out/gpu.json, then bench/gpu_summary.py

Every timed round ends in a device synchronisation, so pytest-benchmark's times are wall times
of finished GPU work; CUDA-event times go into extra_info as well. Graphs are captured and
modules compiled in a warm-up call before the timed rounds. bench/gpu_summary.py computes the
loop overhead, (end-to-end − steps × UNet step − VAE − text) / steps, from the medians.
"""

import statistics
import warnings

import pytest
import torch

PROMPT = "a photograph of an astronaut riding a horse"
GUIDANCE = 7.5  # > 1: classifier-free guidance, one UNet call on twice the batch per step
STEPS = 5
BATCHES = (1, 4)
BACKENDS = ("eager", "cuda_graph", "compiled")
DIFFUSERS_RUNS = ((STEPS, 1), (STEPS, 4), (25, 1), (50, 1))  # (steps, batch); 50 is the pipeline's default

batches = pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
backends = pytest.mark.parametrize("backend", BACKENDS)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(benchmark, target, kind: str, fn, engine=None):
    """Call fn once to warm up (graph capture, compilation), then time target.rounds[kind]
    rounds with benchmark.pedantic, each ending in a device synchronisation. Returns fn's last
    result and what to record: the rounds, the CUDA-event median (GPU) and, for an engine with
    graphs, the captures made while timing (0 unless a graph was evicted and captured again), and
    fastdiff's warnings from the warm-up (a module left without graphs, an fp16 fallback)."""
    device = target.device
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
        synchronize(device)
    graphs = engine.runner.graphs if engine is not None else None
    captures = graphs.captures if graphs is not None else 0
    event_ms = []

    def timed_round():
        if device.type != "cuda":
            return fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        synchronize(device)
        event_ms.append(start.elapsed_time(end))
        return out

    rounds = target.rounds[kind]
    result = benchmark.pedantic(timed_round, rounds=rounds, warmup_rounds=target.warmup_rounds, iterations=1)
    info = {
        "rounds": rounds,
        "cuda_event_ms": statistics.median(event_ms[-rounds:]) if event_ms else None,
        "warnings": sorted({str(w.message) for w in caught if str(w.message).startswith("fastdiff:")}),
    }
    if graphs is not None:
        info["graph_captures_while_timing"] = graphs.captures - captures
        info["graphs"] = graphs.stats()
    return result, info


def module_dtypes(engine) -> dict:
    """The dtypes the modules ran in (an fp16 overflow moves a module to bf16/fp32 for good)."""
    modules = {"unet": engine.unet, "text_encoder": engine.conditioner.text_encoder, "vae": engine.decoder.vae}
    return {f"{name}_dtype": str(next(m.parameters()).dtype).removeprefix("torch.") for name, m in modules.items()}


def latents(engine, batch: int, target) -> torch.Tensor:
    size = engine.sample_size
    x = torch.randn(batch, engine.decoder.channels, size, size, generator=torch.Generator().manual_seed(0))
    return x.to(target.device, engine.dtype)


# End-to-end first: an fp16 overflow fallback (random weights) then happens before the parts are
# timed, so the parts run in the same dtypes as the end-to-end runs.
@batches
@backends
def test_e2e_5_steps(benchmark, target, engine, record, backend, batch):
    eng = engine(backend)
    stages = []

    def sample():
        out = eng.sample([PROMPT] * batch, steps=STEPS, seed=0, guidance_scale=GUIDANCE)
        stages.append(out.timings)
        return out

    benchmark.group = "gpu-e2e"
    out, info = measure(benchmark, target, "e2e", sample, eng)
    timed = stages[-info["rounds"] :]
    record(
        kind="e2e",
        backend=eng.backend,
        batch=batch,
        steps=STEPS,
        resolution=eng.image_size,
        unet_calls=out.unet_calls,
        random_weights=out.random_weights,
        notes=[*eng.notes, *(n for n in out.notes if n not in eng.notes)],
        # the engine's own stage times (device-synchronised); total excludes the PIL conversion
        **{f"{stage}_ms": statistics.median(t[stage] for t in timed) * 1e3 for stage in timed[0]},
        **module_dtypes(eng),
        **info,
    )
    assert out.unet_calls == STEPS and len(out.images) == batch


@batches
@backends
def test_unet_step(benchmark, target, engine, record, backend, batch):
    eng = engine(backend)
    denoiser = eng.denoiser([PROMPT] * batch, guidance_scale=GUIDANCE)
    x = latents(eng, 2 * batch, target)  # [uncond; cond], as a guided step calls the UNet
    t = torch.full((2 * batch,), 500.0, device=target.device)
    benchmark.group = "gpu-unet-step"
    out, info = measure(benchmark, target, "unet", lambda: eng.call_unet(x, t, **denoiser.kwargs), eng)
    record(
        kind="unet",
        backend=eng.backend,
        batch=batch,
        unet_batch=2 * batch,
        steps=1,
        resolution=eng.image_size,
        **module_dtypes(eng),
        **info,
    )
    assert out.shape == x.shape


@batches
@backends
def test_text_encode(benchmark, target, engine, record, backend, batch):
    """What sampling spends on text: tokenise and encode the prompts and the empty negatives."""
    eng = engine(backend)
    benchmark.group = "gpu-text-encode"
    denoiser, info = measure(
        benchmark, target, "text", lambda: eng.denoiser([PROMPT] * batch, guidance_scale=GUIDANCE), eng
    )
    record(
        kind="text",
        backend=eng.backend,
        batch=batch,
        encodes=2,
        steps=0,
        resolution=eng.image_size,
        **module_dtypes(eng),
        **info,
    )
    assert denoiser.guided


@batches
@backends
def test_vae_decode(benchmark, target, engine, record, backend, batch):
    eng = engine(backend)
    z = latents(eng, batch, target)
    benchmark.group = "gpu-vae-decode"
    images, info = measure(benchmark, target, "vae", lambda: eng.decode(z), eng)
    record(
        kind="vae",
        backend=eng.backend,
        batch=batch,
        steps=0,
        resolution=eng.image_size,
        finite=bool(torch.isfinite(images).all()),
        **module_dtypes(eng),
        **info,
    )
    assert images.shape == (batch, 3, eng.image_size, eng.image_size)


@pytest.mark.parametrize(("steps", "batch"), DIFFUSERS_RUNS, ids=[f"{s}steps-b{b}" for s, b in DIFFUSERS_RUNS])
def test_diffusers_e2e(benchmark, target, diffusers_pipe, record, steps, batch):
    pipe = diffusers_pipe
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor

    def sample():
        return pipe(
            [PROMPT] * batch,
            num_inference_steps=steps,
            height=size,
            width=size,
            guidance_scale=GUIDANCE,
            output_type="pil",
            generator=torch.Generator().manual_seed(0),
        )

    benchmark.group = "gpu-diffusers-e2e"
    out, info = measure(benchmark, target, "diffusers" if steps == STEPS else "diffusers_long", sample)
    record(
        kind="diffusers",
        backend="diffusers-eager",
        batch=batch,
        steps=steps,
        resolution=size,
        scheduler=type(pipe.scheduler).__name__,
        unet_calls=len(pipe.scheduler.timesteps),
        unet_dtype=str(pipe.unet.dtype).removeprefix("torch."),
        vae_dtype=str(pipe.vae.dtype).removeprefix("torch."),
        **info,
    )
    assert len(out.images) == batch and len(pipe.scheduler.timesteps) == steps
