"""The HTTP API of `fastdiff serve` and its model side, in-process (no Ray): every route, the
images against Engine.sample, batching of compatible requests, limits and bad input."""

import asyncio
import base64
import io
import json

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("diffusers")

import fastdiff  # noqa: E402
from fastdiff.serving.api import Limits, LocalBackend, make_app  # noqa: E402
from fastdiff.serving.runner import Job, ModelRunner, RequestError  # noqa: E402

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def engine():
    return fastdiff.build_engine("tiny-shapes", device="cpu")


@pytest.fixture(scope="module")
def runner(engine):
    return ModelRunner(engine)


@pytest.fixture(scope="module")
def client(runner):
    from fastapi.testclient import TestClient

    return TestClient(make_app(LocalBackend([runner]), Limits(max_steps=50, max_images=4, max_side=128)))


def _png(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data))


def test_models_health_docs_and_playground(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    doc = client.get("/v1/models").json()
    (model,) = doc["data"]
    assert model["id"] == "tiny-shapes" and {"auto", "olss", "usf", "dpmpp_2m"} <= set(model["samplers"])
    assert 5 in model["shipped_plans"]["olss"] and doc["limits"]["max_steps"] == 50
    schema = client.get("/openapi.json").json()
    assert "/v1/images" in schema["paths"] and "ImageRequest" in json.dumps(schema)
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "fastdiff playground" in page.text and "/v1/images" in page.text


def test_images_are_the_engines_as_json_or_png(client, engine):
    ours = engine.sample(PROMPT, steps=3, seed=7)
    r = client.post("/v1/images", json={"prompt": PROMPT, "steps": 3, "seed": 7})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert (
        doc["seed"] == 7 and doc["unet_calls_per_image"] == [3] and doc["steps"] == 3 and doc["model"] == "tiny-shapes"
    )
    assert {"queue", "encode", "denoise", "decode", "total"} <= set(doc["timings"])
    png = base64.b64decode(doc["images"][0]["b64_json"])
    assert _png(png).size == ours.images[0].size and np.array_equal(np.asarray(_png(png)), np.asarray(ours.images[0]))
    r = client.post("/v1/images", json={"prompt": PROMPT, "steps": 3, "seed": 7, "response_format": "png"})
    assert r.headers["content-type"] == "image/png" and r.content == png
    assert r.headers["x-seed"] == "7" and r.headers["x-unet-calls"] == "3" and "denoise=" in r.headers["x-timings"]
    r = client.post("/v1/images", json={"prompt": PROMPT, "steps": 3, "seed": 7}, headers={"Accept": "image/png"})
    assert r.content == png
    two = client.post("/v1/images", json={"prompt": [PROMPT, "a green square"], "num_images": 2, "steps": 2}).json()
    assert len(two["images"]) == 4 and 0 <= two["seed"] < 2**31 and two["unet_calls_per_image"] == [2] * 4


def test_skip_settings_and_samplers_reach_the_engine(client):
    doc = client.post(
        "/v1/images", json={"prompt": PROMPT, "steps": 12, "seed": 1, "sampler": "dpmpp_2m", "skip": {"delta": 1.0}}
    ).json()
    assert doc["sampler"] == "dpmpp_2m" and min(doc["unet_calls_per_image"]) < 12
    doc = client.post("/v1/images", json={"prompt": PROMPT, "steps": 5, "seed": 1, "skip": "adaptive"}).json()
    assert doc["steps"] == 5 and doc["unet_calls_per_image"][0] <= 5


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"prompt": ""}, 422, "prompt must be a non-empty string"),
        ({"prompt": []}, 422, "prompt must be a non-empty string"),
        ({"prompt": PROMPT, "steps": 0}, 422, "steps must be between 1 and 50"),
        ({"prompt": PROMPT, "steps": 10**6}, 422, "steps must be between 1 and 50"),
        ({"prompt": PROMPT, "sampler": "nope"}, 422, "unknown sampler 'nope'"),
        ({"prompt": PROMPT, "sampler": "../../etc/passwd"}, 422, "unknown sampler"),
        ({"prompt": PROMPT, "model": "sd21"}, 404, "unknown model 'sd21': this service serves tiny-shapes"),
        ({"prompt": PROMPT, "num_images": 5}, 422, "at most 4 per request"),
        ({"prompt": PROMPT, "height": 4096}, 422, "height must be between 1 and 128"),
        ({"prompt": PROMPT, "height": 33}, 422, "multiple of"),
        ({"prompt": PROMPT, "seed": -1}, 422, "seed"),
        ({"prompt": PROMPT, "skip": {"delta": -1}}, 422, "skip.SkipSettings.delta"),
        ({"prompt": PROMPT, "skip": "always"}, 422, "skip"),
        ({"prompt": PROMPT, "plan": "/etc/passwd"}, 422, "plan: Extra inputs are not permitted"),
        ({"prompt": PROMPT, "num_images": 2, "response_format": "png"}, 422, "returns one image"),
        ({"prompt": "x" * 600}, 422, "at most 500"),
        ({"steps": 3}, 422, "prompt: Field required"),
    ],
)
def test_bad_requests_get_a_4xx_naming_the_problem(client, body, status, message):
    r = client.post("/v1/images", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_non_json_and_oversized_bodies(client):
    r = client.post("/v1/images", content=b"prompt=hi", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["error"]
    r = client.post("/v1/images", content=b"{" + b" " * 70000 + b"}", headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "at most 65536" in r.json()["error"]


def test_requests_over_the_in_flight_cap_get_429_with_retry_after():
    import httpx

    class Slow:
        async def models(self):
            return [{"id": "m"}]

        async def ready(self):
            return True

        async def generate(self, model, job):
            await asyncio.sleep(0.3)
            return {
                "png": [b"x"],
                "seed": job["seed"],
                "prompts": job["prompts"],
                "unet_calls_per_image": [1],
                "timings": {},
            }

    app = make_app(Slow(), Limits(max_in_flight=2, retry_after_s=3))

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await asyncio.gather(*(c.post("/v1/images", json={"prompt": "p"}) for _ in range(5)))

    codes = sorted(r.status_code for r in asyncio.run(go()))
    assert codes == [200, 200, 429, 429, 429]
    refused = [r for r in asyncio.run(go()) if r.status_code == 429][0]
    assert refused.headers["retry-after"] == "3" and "cap is 2" in refused.json()["error"]


def test_a_batch_shares_sampling_calls_and_keeps_each_requests_images(runner, engine, monkeypatch):
    jobs = [
        Job(prompts=[PROMPT], steps=4, seed=1),
        Job(prompts=["a green square", "a yellow triangle"], steps=4, seed=2, guidance_scale=3.0),
        Job(prompts=[PROMPT], steps=3, seed=3),  # another plan: its own call
        Job(prompts=[PROMPT], steps=4, seed=4, sampler="nope"),  # refused alone
        Job(prompts=[PROMPT], steps=4, seed=5, negative_prompt="blue", num_images=2),
    ]
    calls = []
    sample = engine.sample

    def counting(*args, **kwargs):
        calls.append(len(args[0]))
        return sample(*args, **kwargs)

    monkeypatch.setattr(engine, "sample", counting)
    results = runner.run_batch(jobs)
    monkeypatch.undo()
    assert sorted(calls) == [1, 5]  # jobs 0, 1, 4 in one call of 5 images; job 2 alone
    assert isinstance(results[3], RequestError) and "unknown sampler 'nope'" in str(results[3])
    assert results[0]["batch_requests"] == 3 and results[2]["batch_requests"] == 1
    for job, result in zip(jobs, results):
        if isinstance(result, RequestError):
            continue
        alone = engine.sample(
            job.prompts,
            steps=job.steps,
            seed=job.seed,
            guidance_scale=job.guidance_scale,
            negative_prompt=job.negative_prompt,
            num_images=job.num_images,
        )
        assert len(result["png"]) == len(alone.images) and result["seed"] == job.seed
        for png, image in zip(result["png"], alone.images):
            a = torch.from_numpy(np.asarray(_png(png), dtype=np.int32))
            b = torch.from_numpy(np.asarray(image, dtype=np.int32))
            assert (a - b).abs().max() <= 1  # the same image, up to the rounding of a larger batch


def test_stochastic_plans_and_per_batch_gates_never_mix_requests(runner, engine):
    from fastdiff.gate import GateSpec

    request = runner.check(Job(prompts=[PROMPT], steps=8, seed=1, skip={"per_sample": False}))
    assert isinstance(request.gate, GateSpec) and not request.gate.per_sample
    a, b = Job(prompts=[PROMPT], steps=8, seed=1), Job(prompts=[PROMPT], steps=8, seed=2)
    assert runner.key(a, runner.check(a)) == runner.key(b, runner.check(b))
    a.skip = b.skip = {"per_sample": False}
    assert runner.key(a, runner.check(a)) != runner.key(b, runner.check(b))


def test_serve_settings_are_checked_without_ray(tmp_path):
    from fastdiff.serving.settings import ServeSettings, read_settings

    path = tmp_path / "serve.yaml"
    path.write_text("models: [tiny-shapes]\nreplicas: 2\nlimits: {max_steps: 20}\n")
    assert read_settings(path)["replicas"] == 2
    with pytest.raises(ValueError, match="unknown serve settings replica: expected some of"):
        ServeSettings.from_dict({"replica": 2})
    with pytest.raises(ValueError, match=r"unknown limits in \['max_stepz'\]"):
        ServeSettings.from_dict({"limits": {"max_stepz": 2}})
    with pytest.raises(ValueError, match="cannot read the serve settings"):
        read_settings(tmp_path / "missing.yaml")
