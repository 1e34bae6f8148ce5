"""`fastdiff serve` on Ray Serve, on this machine (loopback only, bounded waits): a local
instance with batching, a 2-node cluster simulated on one machine with replicas on both nodes, a
replica killed under load, and the CLI. Each test starts and stops its own Ray."""

import asyncio
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("diffusers")

pytestmark = pytest.mark.slow

PROMPT = "a red circle on a blue background"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/readyz", timeout=5)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise AssertionError(f"{url} not ready after {timeout} s: {last}")


async def _burst(url: str, bodies: list[dict], timeout: float = 120.0) -> list:
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        return await asyncio.gather(*(client.post("/v1/images", json=b) for b in bodies), return_exceptions=True)


@pytest.fixture
def local_ray():
    import ray

    ray.init(num_cpus=3, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def test_a_local_service_batches_concurrent_requests(local_ray):
    from fastdiff.serving.app import run_service

    port = _port()
    settings = {
        "models": ["tiny-shapes"],
        "max_batch_size": 8,
        "batch_wait_timeout_s": 0.2,
        "limits": {"max_steps": 20},
    }
    with run_service(settings, port=port) as url:
        _wait_ready(url)
        bodies = [{"prompt": PROMPT, "steps": 3, "seed": i} for i in range(8)]
        responses = asyncio.run(_burst(url, bodies))
        docs = [r.json() for r in responses]
        assert all(r.status_code == 200 for r in responses), [d.get("error") for d in docs]
        assert [d["seed"] for d in docs] == list(range(8)) and all(d["unet_calls_per_image"] == [3] for d in docs)
        assert max(d["batch_requests"] for d in docs) > 1  # concurrent requests shared sampling calls
        alone = httpx.post(f"{url}/v1/images", json=bodies[5], timeout=60).json()
        assert alone["images"][0]["b64_json"] == docs[5]["images"][0]["b64_json"] or alone["batch_requests"] == 1
        bad = httpx.post(f"{url}/v1/images", json={"prompt": PROMPT, "steps": 50}, timeout=60)
        assert bad.status_code == 422 and "between 1 and 20" in bad.json()["error"]
        assert httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"] == "tiny-shapes"


def test_autoscaling_settings_and_metrics_reach_ray(local_ray):
    import ray

    from fastdiff.serving.app import run_service

    port = _port()
    settings = {"models": ["tiny-shapes"], "autoscaling": {"min_replicas": 2, "max_replicas": 3}, "num_cpus": 1}
    with run_service(settings, port=port) as url:
        _wait_ready(url)
        assert len(_replica_actors("ImageModel-tiny-shapes")) == 2  # min_replicas, not the default 1
        for i in range(3):
            assert httpx.post(f"{url}/v1/images", json={"prompt": PROMPT, "steps": 2, "seed": i}, timeout=60).is_success
        metrics_port = ray.nodes()[0]["MetricsExportPort"]
        deadline, text = time.monotonic() + 90, ""
        while time.monotonic() < deadline:  # Ray's metrics agent exports every few seconds
            text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
            if "fastdiff_images" in text and "serve_num_http_requests" in text:
                break
            time.sleep(2)
        assert "fastdiff_images" in text and "fastdiff_unet_calls" in text and "serve_num_http_requests" in text


def test_replicas_on_two_nodes_both_serve():
    import ray
    from ray.cluster_utils import Cluster

    from fastdiff.serving.app import run_service

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    try:
        port = _port()
        settings = {"models": ["tiny-shapes"], "replicas": 2, "num_cpus": 1, "batching": False}
        with run_service(settings, port=port, address=cluster.address) as url:
            _wait_ready(url)
            nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            assert len(nodes) == 2
            seen = set()
            deadline = time.monotonic() + 120
            while len(seen) < 2 and time.monotonic() < deadline:
                responses = asyncio.run(_burst(url, [{"prompt": PROMPT, "steps": 2, "seed": i} for i in range(6)]))
                assert all(r.status_code == 200 for r in responses)
                seen |= {r.json()["node"] for r in responses}
            assert seen == nodes  # a replica on each node answered
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def _replica_actors(prefix: str) -> list:
    from ray._private import state

    return [
        a
        for a in state.actors().values()
        if a.get("State") == "ALIVE" and prefix in (a.get("Name") or "") and "REPLICA" in (a.get("Name") or "")
    ]


def test_a_replica_killed_under_load_gives_answers_not_hangs(local_ray):
    import ray

    from fastdiff.serving.app import run_service

    port = _port()
    settings = {"models": ["tiny-shapes"], "replicas": 2, "num_cpus": 1, "batching": True}
    with run_service(settings, port=port) as url:
        _wait_ready(url)
        (victim, *_) = _replica_actors("ImageModel-tiny-shapes")

        async def load():
            task = asyncio.ensure_future(
                _burst(url, [{"prompt": PROMPT, "steps": 8, "seed": i} for i in range(24)], 90)
            )
            await asyncio.sleep(1.0)
            ray.kill(ray.get_actor(victim["Name"], namespace="serve"), no_restart=True)
            return await task

        started = time.monotonic()
        responses = asyncio.run(load())
        assert time.monotonic() - started < 90  # nothing hung
        codes = [getattr(r, "status_code", None) for r in responses]
        assert all(c == 200 or (c is not None and 500 <= c < 600) for c in codes), responses
        errors = [r.json()["error"] for r in responses if r.status_code != 200]
        assert all("replica failed" in e or "queue" in e for e in errors), errors
        # the controller replaces the replica: the service answers again
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            r = httpx.post(f"{url}/v1/images", json={"prompt": PROMPT, "steps": 2, "seed": 1}, timeout=60)
            if r.status_code == 200 and len(_replica_actors("ImageModel-tiny-shapes")) == 2:
                break
            time.sleep(1)
        assert r.status_code == 200 and len(_replica_actors("ImageModel-tiny-shapes")) == 2


def test_cli_serves_until_stopped(tmp_path):
    port = _port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fastdiff.cli",
                "serve",
                "--port",
                str(port),
                "--run-for",
                "600",
                "--max-steps",
                "9",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while "fastdiff serving" not in log.read_text():  # deployed (serve.run returned)
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        _wait_ready(url, 60)
        r = httpx.post(f"{url}/v1/images", json={"prompt": PROMPT, "steps": 3, "response_format": "png"}, timeout=60)
        assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
        assert httpx.get(f"{url}/v1/models", timeout=10).json()["limits"]["max_steps"] == 9
    finally:
        proc.send_signal(2)  # Ctrl-C
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert f"fastdiff serving tiny-shapes at http://127.0.0.1:{port}" in text and "stopped" in text, text[-3000:]
    assert proc.returncode == 0, text[-3000:]


def test_cli_without_ray_serve_names_the_extra(monkeypatch, capsys):
    import builtins

    from fastdiff.cli import main

    real = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    monkeypatch.delitem(sys.modules, "fastdiff.serving.app", raising=False)
    assert main(["serve", "--run-for", "0"]) == 2
    assert 'pip install "fastdiff[serve]"' in capsys.readouterr().err
