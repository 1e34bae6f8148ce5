"""`fastdiff serve` under load on the CPU (issue 22): 16 concurrent HTTP clients (httpx, async,
closed loop: each sends its next request when the last is answered) against tiny-shapes at 8
steps, with dynamic batching on and off and 1 and 2 replicas, side by side in one run on one
local Ray instance. Each configuration is deployed, warmed up, then timed over 96 requests:
images/s over the whole run, p50/p99 latency per request, errors (any non-200) and the images
per sampling call. The C++ service (bench/test_service_cpu.py, the same model and steps with no
Python) is the reference in the same `make bench` run. bench/report.py renders
bench/results/serving.md.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import time

import pytest

pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

CLIENTS = 16
REQUESTS = 96
STEPS = 8
PROMPTS = ["a red circle on a blue background", "a green square at the left of a white background"]
CONFIGS = [(True, 1), (False, 1), (True, 2), (False, 2)]  # (batching, replicas)
CPUS = 2  # the Ray instance's CPUs


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_instance():
    import ray

    ray.init(num_cpus=CPUS, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()


async def _load(url: str) -> dict:
    latencies, codes, batch = [], [], []
    counter = iter(range(REQUESTS))

    async def client(c: httpx.AsyncClient):
        for i in counter:
            body = {"prompt": PROMPTS[i % 2], "steps": STEPS, "seed": i}
            start = time.perf_counter()
            r = await c.post("/v1/images", json=body)
            latencies.append(time.perf_counter() - start)
            codes.append(r.status_code)
            if r.status_code == 200:
                batch.append(r.json()["batch_images"])

    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        start = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(CLIENTS)))
        wall = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100)
    return {
        "images_per_s": codes.count(200) / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * q[98],
        "errors": sum(c != 200 for c in codes),
        "mean_batch_images": statistics.mean(batch) if batch else 0.0,
        "wall_s": wall,
    }


@pytest.mark.parametrize("batching, replicas", CONFIGS, ids=lambda v: str(v))
def test_serving_load(benchmark, ray_instance, batching, replicas):
    from fastdiff.serving.app import run_service

    settings = {
        "models": ["tiny-shapes"],
        "replicas": replicas,
        "num_cpus": 1,  # one intra-op thread per replica: 2 threads on 2 shared cores measured 3x slower
        "batching": batching,
        "max_batch_size": 16,
        "batch_wait_timeout_s": 0.02,
    }
    holder = {}
    with run_service(settings, port=_port()) as url:
        deadline = time.monotonic() + 180
        while httpx.get(f"{url}/readyz", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the service did not get ready"
            time.sleep(0.5)
        httpx.post(f"{url}/v1/images", json={"prompt": PROMPTS[0], "steps": STEPS}, timeout=120)

        def run():
            holder["result"] = asyncio.run(_load(url))

        benchmark.group = "serving-load"
        benchmark.pedantic(run, rounds=1, iterations=1)
    result = holder["result"]
    benchmark.extra_info.update(
        {"batching": batching, "replicas": replicas, "clients": CLIENTS, "requests": REQUESTS, "steps": STEPS, **result}
    )
    assert result["errors"] == 0
