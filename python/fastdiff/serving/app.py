"""The Ray Serve application of `fastdiff serve`: one `ImageModel` deployment per model (an
Engine per replica, requests batched with ``@serve.batch``) behind a `Gateway` ingress (the
FastAPI app of `fastdiff.serving.api`).

    from fastdiff.serving.app import build
    serve.run(build({"models": ["tiny-shapes"], "replicas": 2}), route_prefix="/")

`build(args)` is also an application builder for Ray Serve's own config files
(``import_path: fastdiff.serving.app:build`` with ``args:``), where ``deployments:`` entries
(``ImageModel-tiny-shapes``, ``Gateway``) override replicas, autoscaling and resources as Ray
Serve documents. Ray Serve's metrics (request counts, latencies, queue lengths, replica counts)
are exported by Ray's metrics agent in Prometheus format; this application adds its own:
``fastdiff_images``, ``fastdiff_unet_calls``, ``fastdiff_batch_images``.
"""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
from dataclasses import asdict

from .api import Limits, make_app
from .runner import Job, ModelRunner, RequestError
from .settings import ServeSettings

try:
    from ray import serve
except ImportError as exc:  # the serve extra is optional
    raise ImportError(
        f'fastdiff serve needs Ray Serve and FastAPI: pip install "fastdiff[serve]" (or "ray[serve]") ({exc})'
    ) from exc


def _metrics():
    from ray.serve import metrics

    return {
        "images": metrics.Counter("fastdiff_images", description="images sampled", tag_keys=("model",)),
        "unet_calls": metrics.Counter("fastdiff_unet_calls", description="UNet calls made", tag_keys=("model",)),
        "batch": metrics.Histogram(
            "fastdiff_batch_images",
            description="images per sampling call",
            boundaries=[1, 2, 4, 8, 16, 32, 64],
            tag_keys=("model",),
        ),
    }


@serve.deployment
class ImageModel:
    """An Engine in a Ray Serve replica. `generate(job)` joins the replica's batch queue
    (`@serve.batch`) or, with batching off, runs alone; `ModelRunner.run_batch` checks every
    request alone, so a bad one gets its own error and never fails the batch."""

    def __init__(self, model: str, settings: dict):
        import ray

        s = ServeSettings.from_dict(settings)
        context = serve.get_replica_context()
        self.replica = str(getattr(context, "replica_id", None) or getattr(context, "replica_tag", ""))
        self.node = ray.get_runtime_context().get_node_id()
        # intra-op threads = the CPUs the replica holds: replicas sharing a machine do not oversubscribe it
        self.runner = ModelRunner.build(
            model,
            threads=max(1, int(s.num_cpus)),
            device=s.device,
            dtype=s.dtype,
            backend=s.backend,
            weights=s.weights.get(model),
        )
        self.batching = s.batching
        self._lock = asyncio.Lock()
        self._metrics = _metrics()
        self.generate_batch.set_max_batch_size(s.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(s.batch_wait_timeout_s)

    def info(self) -> dict:
        return self.runner.info()

    async def generate(self, job: dict) -> dict:
        job = Job.from_dict(job)
        if self.batching:
            result = await self.generate_batch(job)
        else:
            async with self._lock:
                result = (await self.runner.call(self.runner.run_batch, [job]))[0]
        if isinstance(result, RequestError):
            return {"error": str(result), "status": result.status}
        self._record(result)
        return {**result, "node": self.node, "replica": self.replica}

    def _record(self, result: dict) -> None:
        tags = {"model": self.runner.name}
        self._metrics["images"].inc(len(result["png"]), tags=tags)
        self._metrics["unet_calls"].inc(sum(result["unet_calls_per_image"]), tags=tags)
        self._metrics["batch"].observe(result["batch_images"], tags=tags)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def generate_batch(self, jobs: list[Job]) -> list:
        return await self.runner.call(self.runner.run_batch, jobs)


@serve.deployment
@serve.ingress()
class Gateway:
    """The ingress: the FastAPI app over handles to the model deployments."""

    def __init__(self, handles: dict, limits: dict):
        self.handles = handles
        self.limits = Limits(**limits)
        self._models: list[dict] | None = None

    def __serve_build_asgi_app__(self):
        return make_app(self, self.limits)

    async def models(self) -> list[dict]:
        if self._models is None:
            self._models = [await handle.info.remote() for handle in self.handles.values()]
        return self._models

    async def ready(self) -> bool:
        await asyncio.gather(*(handle.info.remote() for handle in self.handles.values()))
        return True

    async def generate(self, model: str, job: dict) -> dict:
        from ray.serve.exceptions import BackPressureError

        try:
            result = await self.handles[model].generate.remote(job)
        except BackPressureError as exc:
            raise RequestError(f"the {model} queue is full, retry later ({exc})", 429) from None
        except Exception as exc:  # noqa: BLE001 - a replica that died mid-request: a clear 5xx, never a hang
            raise RequestError(f"the {model} replica failed: {type(exc).__name__}: {exc}", 503) from None
        if "error" in result:
            raise RequestError(result["error"], result.get("status", 422))
        return result


def build(args: dict | None = None):
    """The Ray Serve application for `args` (ServeSettings fields): bind it with serve.run."""
    s = ServeSettings.from_dict(args)
    handles = {}
    for name in s.models:
        options = {
            "name": f"ImageModel-{name}",
            "ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
            "max_ongoing_requests": max(2 * s.max_batch_size, 4) if s.batching else 2,
            "max_queued_requests": s.max_queued_requests,
            "health_check_period_s": 10,
        }
        if s.autoscaling:
            options["autoscaling_config"] = dict(s.autoscaling)
        else:
            options["num_replicas"] = s.replicas
        handles[name] = ImageModel.options(**options).bind(name, asdict(s))
    in_flight = Limits(**s.limits).max_in_flight  # the gateway is async: it holds every admitted request
    return Gateway.options(
        name="Gateway", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=max(in_flight, 1)
    ).bind(handles, s.limits)


@contextmanager
def run_service(settings: dict | None = None, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None):
    """Deploy the application and yield its URL; shut it down afterwards. Starts a local Ray
    instance unless `address` names a cluster (then only this application is removed at the end)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build(settings), name="fastdiff", route_prefix="/")
        yield f"http://{host}:{port}"
    finally:
        try:
            serve.delete("fastdiff")
            if address is None:
                serve.shutdown()
        finally:
            if started:
                ray.shutdown()


__all__ = ["Gateway", "ImageModel", "build", "run_service"]
