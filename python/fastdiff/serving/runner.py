"""The model side of the service, without Ray: an Engine, the check of one request against it,
and the execution of a batch of requests in as few sampling calls as their settings allow.

A request (`Job`, plain JSON values) is checked alone first (`ModelRunner.check`), so a bad
request fails by itself and never inside a batch. `run_batch(jobs)` groups the jobs whose
settings can share one `Engine.sample` call (same plan, size, skip settings; stochastic plans
and per-batch gate decisions never mix requests) and runs each group once: every request keeps
its own prompts, seed (its own initial noise, `Engine.initial_noise`), guidance and negative
prompt, so its images are the ones it would get alone (up to float rounding of a larger batch).
"""

from __future__ import annotations

import base64
import io
import time
from dataclasses import asdict, dataclass, field

import torch

from ..gate import GateSpec


class RequestError(ValueError):
    """A request the model cannot run; `status` is the HTTP status it maps to."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    """One request to one model, resolved to plain values (crosses process boundaries)."""

    prompts: list[str]
    steps: int = 5
    sampler: str = "auto"
    seed: int = 0
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    skip: dict | str | None = None  # None, "adaptive" or GateSpec fields
    num_images: int = 1
    height: int | None = None
    width: int | None = None
    queued_at: float = field(default_factory=time.time)  # wall clock, seconds (for the queue time)

    @classmethod
    def from_dict(cls, doc: dict) -> Job:
        return cls(**doc)

    def to_dict(self) -> dict:
        return asdict(self)


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class ModelRunner:
    """One Engine serving requests (one per Ray replica, or in-process). All its torch work runs
    on one thread of its own (`call`): a CPU engine called from changing threads, or from a
    thread other than the one that warmed it up, runs OpenMP teams side by side and was measured
    3x slower per sample (2 intra-op threads, tiny-shapes)."""

    def __init__(self, engine, *, name: str | None = None, executor=None):
        from concurrent.futures import ThreadPoolExecutor

        self.engine = engine
        self.name = name or engine.name
        self.executor = executor or ThreadPoolExecutor(1, thread_name_prefix=f"fastdiff-{self.name}")

    @classmethod
    def build(cls, model: str, *, threads: int | None = None, **options) -> ModelRunner:
        """The engine of `model` (build_engine options) built and warmed up on the runner's thread."""
        from concurrent.futures import ThreadPoolExecutor

        from ..models.registry import build_engine

        executor = ThreadPoolExecutor(1, thread_name_prefix=f"fastdiff-{model}")

        def make():
            if threads is not None:
                torch.set_num_threads(threads)
            engine = build_engine(model, **options)
            engine.sample("warm up", steps=2, sampler="ddim", seed=0)
            return engine

        return cls(executor.submit(make).result(), name=model, executor=executor)

    async def call(self, fn, *args):
        """fn(*args) on the runner's thread, awaited."""
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ---------------------------------------------------------------- what the model offers
    def info(self) -> dict:
        from .. import solvers
        from ..engines.engine import AUTO, CALIBRATED

        engine = self.engine
        shipped = {kind: steps for kind in CALIBRATED if (steps := engine.shipped_plans(kind))}
        return {
            "id": self.name,
            "image_size": engine.image_size,
            "size_multiple": engine.decoder.factor,
            "default_guidance_scale": engine.guidance_scale,
            "samplers": [AUTO, *CALIBRATED, *solvers.VARIANTS],
            "shipped_plans": shipped,
            "device": str(engine.device),
            "dtype": str(engine.dtype).replace("torch.", ""),
            "random_weights": bool(engine.random_weights),
        }

    # ---------------------------------------------------------------- one request alone
    def gate(self, job: Job) -> GateSpec | str | None:
        if job.skip is None or job.skip == "adaptive":
            return job.skip
        if isinstance(job.skip, dict):
            try:
                return GateSpec(**job.skip)
            except (TypeError, ValueError) as exc:
                raise RequestError(f"skip: {exc}") from None
        raise RequestError(f"skip must be null, 'adaptive' or an object of gate settings, got {job.skip!r}")

    def check(self, job: Job):
        """The plan the request runs (ValueError from the engine → RequestError naming it)."""
        engine = self.engine
        try:
            request = engine.prepare(
                job.prompts,
                job.steps,
                guidance_scale=job.guidance_scale,
                negative_prompt=job.negative_prompt,
                seed=job.seed,
                num_images=job.num_images,
                height=job.height,
                width=job.width,
                sampler=job.sampler,
                skip=self.gate(job),
            )
        except (ValueError, TypeError) as exc:
            raise RequestError(str(exc)) from None
        return request

    def key(self, job: Job, request) -> tuple:
        """Jobs with equal keys share one sampling call."""
        gate = request.gate
        alone = request.plan.stochastic or (gate is not None and not gate.per_sample)
        return (
            request.plan.hash(),
            request.height,
            request.width,
            None if gate is None else tuple(sorted(gate.to_dict().items())),
            id(job) if alone else None,  # their noise or gate decisions would couple requests
        )

    # ---------------------------------------------------------------- a batch of requests
    def run_batch(self, jobs: list[Job]) -> list[dict | RequestError]:
        """Each job's result (`result` dicts) or its RequestError, in order."""
        results: list = [None] * len(jobs)
        groups: dict[tuple, list[tuple[int, Job, object]]] = {}
        for i, job in enumerate(jobs):
            try:
                request = self.check(job)
            except RequestError as exc:
                results[i] = exc
                continue
            groups.setdefault(self.key(job, request), []).append((i, job, request))
        for members in groups.values():
            try:
                outputs = self._run_group(members)
            except (ValueError, TypeError) as exc:
                outputs = [RequestError(str(exc))] * len(members)
            for (i, _, _), out in zip(members, outputs):
                results[i] = out
        return results

    def _run_group(self, members) -> list[dict]:
        engine = self.engine
        started = time.time()
        prompts, negatives, guidance, noise = [], [], [], []
        for _, job, request in members:
            n = len(request.prompts)
            prompts += request.prompts
            negatives += request.negatives or [""] * n
            guidance += [float(request.guidance)] * n
            noise.append(engine.initial_noise(n, seed=request.seed, height=request.height, width=request.width))
        first = members[0][2]
        out = engine.sample(
            prompts,
            plan=first.plan,
            guidance_scale=guidance,
            negative_prompt=None if not any(negatives) else negatives,
            seed=first.seed,
            height=first.height,
            width=first.width,
            skip=first.gate,
            latents=torch.cat(noise),
        )
        results, start = [], 0
        for _, job, request in members:
            n = len(request.prompts)
            images = out.images[start : start + n]
            nfe = out.nfe[start : start + n]
            results.append(
                {
                    "model": self.name,
                    "sampler": engine.resolve_sampler(job.sampler, job.steps),
                    "steps": first.plan.num_calls,
                    "seed": request.seed,
                    "prompts": request.prompts,
                    "png": [png_bytes(im) for im in images],
                    "unet_calls_per_image": [int(c) for c in nfe],
                    "batch_images": len(prompts),
                    "batch_requests": len(members),
                    "timings": {
                        "queue": max(0.0, started - job.queued_at),
                        **{k: float(v) for k, v in out.timings.items()},
                    },
                    "notes": list(out.notes),
                }
            )
            start += n
        return results


def encode_result(result: dict) -> dict:
    """A result as JSON: the PNGs base64-encoded."""
    doc = {k: v for k, v in result.items() if k != "png"}
    doc["images"] = [
        {"b64_json": base64.b64encode(png).decode("ascii"), "prompt": p, "unet_calls": c}
        for png, p, c in zip(result["png"], result["prompts"], result["unet_calls_per_image"])
    ]
    return doc
