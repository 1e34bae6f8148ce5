"""The HTTP API of `fastdiff serve` (FastAPI), independent of Ray: `make_app(backend, limits)`.

    POST /v1/images     {"prompt": "...", "steps": 5, "sampler": "auto", "seed": 1, ...}
                        -> JSON with base64 PNGs, the seed, UNet calls per image and timings,
                           or one image/png ("response_format": "png" or Accept: image/png)
    GET  /v1/models     the models served, their samplers, shipped plans and sizes
    GET  /healthz       the process answers;  GET /readyz: every model can take a request
    GET  /              the playground page;  GET /docs, /openapi.json: the API's documentation

The backend runs the requests (Ray Serve deployments in `fastdiff.serving.app`, or an in-process
`LocalBackend`): ``await backend.models()``, ``await backend.generate(model, job)`` and
``await backend.ready()``. Limits (`Limits`) are checked here before anything runs: steps,
images per request, size, prompt length, body size (413), and requests in flight (429 with
Retry-After). Nothing in a request names a file: samplers and plans are names from the models'
registries, never paths.
"""

# no `from __future__ import annotations`: FastAPI reads the route annotations at run time
import asyncio
import base64
import random
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Literal

from .runner import Job, RequestError, encode_result

SEED_MAX = 2**31 - 1


@dataclass(frozen=True)
class Limits:
    """Caps of one service (`fastdiff serve --max-...`)."""

    max_steps: int = 100
    max_images: int = 8  # prompts x num_images per request
    max_side: int = 512  # pixels, height and width
    max_prompt_chars: int = 500
    max_in_flight: int = 64  # requests admitted and not answered yet, per ingress replica; more: 429
    max_body_bytes: int = 64 * 1024
    retry_after_s: int = 1


def _models():
    """The pydantic request model (built lazily: pydantic comes with the serve extra)."""
    from pydantic import BaseModel, ConfigDict, Field

    class SkipSettings(BaseModel):
        model_config = ConfigDict(extra="forbid")
        delta: float = Field(0.01, gt=0, description="the third-order test's threshold")
        max_skips: int = Field(4, ge=1, description="skips in a row at most")
        warmup: int = Field(3, ge=0, description="calls made before any skip")
        per_sample: bool = Field(True, description="decide per image (true) or per batch")
        reuse: Literal["extrapolate", "copy"] = "extrapolate"

    class ImageRequest(BaseModel):
        """What to sample. Unknown fields are refused."""

        model_config = ConfigDict(extra="forbid")
        prompt: str | list[str] = Field(..., description="a prompt, or a list of prompts (digits: '7')")
        model: str | None = Field(None, description="a served model's id (GET /v1/models); default: the first")
        negative_prompt: str | None = None
        steps: int = Field(5, description="model calls of the plan (sampler steps)")
        sampler: str = Field(
            "auto", description="a sampler or shipped plan kind: auto, usf, olss, distilled, dpmpp_2m, ..."
        )
        seed: int | None = Field(None, ge=0, le=SEED_MAX, description="seed of the initial noise; default: random")
        guidance_scale: float | None = Field(None, description="classifier-free guidance; default: the model's")
        skip: Literal["adaptive"] | SkipSettings | None = Field(None, description="step skipping (AdaptiveDiffusion)")
        num_images: int = Field(1, ge=1, description="images per prompt")
        height: int | None = Field(None, description="pixels; default: the model's native size")
        width: int | None = None
        response_format: Literal["b64_json", "png"] = Field("b64_json", description="png: one image/png image")

    return ImageRequest


def _job(req, limits: Limits) -> Job:
    """A validated request as a Job, or RequestError (422) naming the first problem."""
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if not prompts or any(not p.strip() for p in prompts):
        raise RequestError("prompt must be a non-empty string or a non-empty list of non-empty strings")
    longest = max(len(p) for p in prompts)
    if longest > limits.max_prompt_chars:
        raise RequestError(f"a prompt has {longest} characters; this service takes at most {limits.max_prompt_chars}")
    if not 1 <= req.steps <= limits.max_steps:
        raise RequestError(f"steps must be between 1 and {limits.max_steps} (this service's cap), got {req.steps}")
    images = len(prompts) * req.num_images
    if images > limits.max_images:
        raise RequestError(
            f"{len(prompts)} prompts x {req.num_images} images = {images} images; this service makes at most "
            f"{limits.max_images} per request"
        )
    for side in ("height", "width"):
        value = getattr(req, side)
        if value is not None and not 1 <= value <= limits.max_side:
            raise RequestError(f"{side} must be between 1 and {limits.max_side} pixels, got {value}")
    if req.response_format == "png" and images != 1:
        raise RequestError(f"response_format 'png' returns one image; this request makes {images} (use b64_json)")
    skip = req.skip.model_dump() if hasattr(req.skip, "model_dump") else req.skip
    return Job(
        prompts=prompts,
        steps=req.steps,
        sampler=req.sampler,
        seed=random.randrange(SEED_MAX) if req.seed is None else req.seed,
        guidance_scale=req.guidance_scale,
        negative_prompt=req.negative_prompt,
        skip=skip,
        num_images=req.num_images,
        height=req.height,
        width=req.width,
    )


def playground_html() -> str:
    return resources.files("fastdiff.serving").joinpath("playground.html").read_text()


def make_app(backend, limits: Limits | None = None):
    """The FastAPI application over `backend`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    from .._version import __version__

    limits = limits or Limits()
    ImageRequest = _models()
    app = FastAPI(
        title="fastdiff",
        version=__version__,
        description="Text-to-image sampling with fastdiff engines (few-step plans, step skipping), on Ray Serve.",
    )
    state = {"in_flight": 0}

    def error(status: int, message: str, **headers) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers or None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        problems = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            problems.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        return error(422, "; ".join(problems) or "invalid request")

    @app.middleware("http")
    async def _body_limit(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limits.max_body_bytes:
            return error(413, f"request body of {size} bytes; this service takes at most {limits.max_body_bytes}")
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground():
        return HTMLResponse(playground_html())

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        try:
            ok = await asyncio.wait_for(backend.ready(), timeout=10)
        except Exception as exc:  # noqa: BLE001 - any failure means not ready, said in the body
            return error(503, f"not ready: {type(exc).__name__}: {exc}")
        return {"status": "ready"} if ok else error(503, "not ready: a model is still loading")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": await backend.models(), "limits": asdict(limits)}

    @app.post("/v1/images", responses={200: {"content": {"image/png": {}}}})
    async def images(body: ImageRequest, request: Request):  # type: ignore[valid-type]
        try:
            job = _job(body, limits)
        except RequestError as exc:
            return error(exc.status, str(exc))
        names = [m["id"] for m in await backend.models()]
        model = body.model or names[0]
        if model not in names:
            return error(404, f"unknown model {model!r}: this service serves {', '.join(names)}")
        if state["in_flight"] >= limits.max_in_flight:
            return error(
                429,
                f"{state['in_flight']} requests in flight (this service's cap is {limits.max_in_flight}); retry later",
                **{"Retry-After": str(limits.retry_after_s)},
            )
        state["in_flight"] += 1
        try:
            result = await backend.generate(model, job.to_dict())
        except RequestError as exc:
            return error(exc.status, str(exc))
        finally:
            state["in_flight"] -= 1
        if body.response_format == "png" or "image/png" in request.headers.get("accept", ""):
            if len(result["png"]) != 1:
                return error(406, f"image/png holds one image; this request made {len(result['png'])} (ask for JSON)")
            headers = {
                "X-Seed": str(result["seed"]),
                "X-Unet-Calls": str(result["unet_calls_per_image"][0]),
                "X-Timings": ",".join(f"{k}={v:.4f}" for k, v in result["timings"].items()),
            }
            return Response(result["png"][0], media_type="image/png", headers=headers)
        return encode_result(result)

    return app


def decode_image(doc: dict, i: int = 0) -> bytes:
    """The PNG bytes of image i of a JSON response (clients, tests)."""
    return base64.b64decode(doc["images"][i]["b64_json"])


class LocalBackend:
    """Runs requests in this process on ModelRunners, one at a time per model (tests, and the
    reference the Ray service is measured against)."""

    def __init__(self, runners):
        self.runners = {r.name: r for r in runners}
        self._locks = {name: asyncio.Lock() for name in self.runners}

    async def models(self) -> list[dict]:
        return [r.info() for r in self.runners.values()]

    async def ready(self) -> bool:
        return True

    async def generate(self, model: str, job: dict) -> dict:
        runner = self.runners[model]
        async with self._locks[model]:
            result = (await runner.call(runner.run_batch, [Job.from_dict(job)]))[0]
        if isinstance(result, RequestError):
            raise result
        return result
