"""The C++ service example (csrc/examples/service.cpp) on the CPU: 32 requests of tiny-shapes
(8 steps, guidance, decode and PNG included) served by 1, 2 and 8 worker threads that share one
AOTI package and one Sampler, no Python at run time.

The timed part is one whole service process (start, package load, the 32 requests); the
service's own JSON line (throughput over the serving time, latency per request, load time) of
each round goes into extra_info, with the median round's figures as images_per_s etc.
`make bench` builds the binary and the package first (cpp-build); FASTDIFF_SERVICE and
FASTDIFF_AOTI_PACKAGE point elsewhere. bench/report.py writes bench/results/service.md.
"""

import json
import os
import statistics
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICE = Path(os.environ.get("FASTDIFF_SERVICE", ROOT / "build/cmake/fastdiff_service"))
PACKAGE = Path(os.environ.get("FASTDIFF_AOTI_PACKAGE", ROOT / "build/aoti/tiny-shapes"))
REQUESTS = 32

pytestmark = pytest.mark.skipif(
    not (SERVICE.is_file() and (PACKAGE / "package.json").is_file()),
    reason=f"the service binary ({SERVICE}) or the AOTI package ({PACKAGE}) is not built: run `make cpp-build`",
)


@pytest.mark.parametrize("threads", (1, 2, 8), ids=lambda t: f"T{t}")
def test_service_throughput(benchmark, tmp_path, threads):
    summaries = []

    def serve():
        cmd = [SERVICE, PACKAGE, "--out", tmp_path / "out", "--requests", REQUESTS, "--threads", threads]
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"service failed ({proc.returncode}): {proc.stderr}"
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        assert summary["failed"] == 0 and summary["requests"] == REQUESTS, summary
        summaries.append(summary)

    benchmark.group = "service-cpu"
    benchmark.pedantic(serve, rounds=3, iterations=1)
    assert len(list((tmp_path / "out").glob("request-*.png"))) == REQUESTS
    rates = [s["images_per_s"] for s in summaries]
    median = sorted(summaries, key=lambda s: s["images_per_s"])[len(summaries) // 2]
    manifest = json.loads((PACKAGE / "package.json").read_text())
    benchmark.extra_info.update(
        {
            "threads": threads,
            "intra_op_threads": median["intra_op_threads"],
            "requests": REQUESTS,
            "guidance_scale": manifest["prompts"]["guidance_scale"],
            "images_per_s": statistics.median(rates),
            "images_per_s_rounds": rates,
            "mean_latency_ms": median["mean_latency_ms"],
            "max_latency_ms": median["max_latency_ms"],
            "load_s": median["load_s"],
            "unet_calls_per_request": median["unet_calls"] / REQUESTS,
            "cores": os.cpu_count(),
        }
    )
