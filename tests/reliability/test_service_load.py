"""The C++ service under load (issue 23, part 4): 8 threads x 100 requests on the AOTI package
of tiny-shapes, 0 failed requests, and memory flat: the service's resident set (VmRSS, sampled
every 50 ms) must not grow with the requests served once it is warm.

"Flat" is measured, not eyeballed: a least-squares line through the RSS samples taken while the
second half of the requests ran (by the PNGs written so far), extrapolated over all 800 requests,
must stay under 16 MiB (a leak of one 32x32 RGB image per request is 2.3 MiB, of one request's
float32 latents 0.2 MiB: the bound is the allocator's noise, measured at about 2 MiB here).

`make test` builds the package and the service first (test-cpp); without them this skips.
Counted by tests/reliability/counts.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.reliability.counts import record

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SERVICE = Path(os.environ.get("FASTDIFF_SERVICE", ROOT / "build/cmake/fastdiff_service"))
PACKAGE = Path(os.environ.get("FASTDIFF_AOTI_PACKAGE", ROOT / "build/aoti/tiny-shapes"))
THREADS, PER_THREAD = 8, 100
GROWTH_LIMIT_MIB = 16


def _rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


@pytest.mark.skipif(
    not (SERVICE.is_file() and (PACKAGE / "package.json").is_file()),
    reason=f"the service binary ({SERVICE}) or the AOTI package ({PACKAGE}) is not built: run `make test-cpp`",
)
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="RSS sampling reads /proc (Linux)")
def test_eight_threads_times_one_hundred_requests_no_errors_memory_flat(tmp_path):
    requests = THREADS * PER_THREAD
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [str(SERVICE), str(PACKAGE), "--out", str(out), "--requests", str(requests), "--threads", str(THREADS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    samples = []  # (requests done, RSS KiB)
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        rss = _rss_kib(proc.pid)
        done = len(list(out.glob("*.png"))) if out.is_dir() else 0
        if rss is not None:
            samples.append((done, rss))
        time.sleep(0.05)
    hung = proc.poll() is None
    if hung:
        proc.kill()
    stdout, stderr = proc.communicate()
    report = json.loads(stdout.strip().splitlines()[-1]) if stdout.strip() else {}
    failed = report.get("failed", requests)
    late = np.array([(d, r) for d, r in samples if d >= requests // 2 and d < requests], dtype=float)
    slope = float(np.polyfit(late[:, 0], late[:, 1], 1)[0]) if len(late) > 10 else float("nan")
    growth_mib = slope * requests / 1024
    flat = bool(np.isfinite(growth_mib) and growth_mib < GROWTH_LIMIT_MIB)
    rss_at = {f: next((r for d, r in samples if d >= f * requests), None) for f in (0.25, 0.5, 0.75)}
    record(
        "service_load",
        "C++ service, 8 threads x 100 requests",
        cases=requests,
        crashes=failed if not hung else 0,
        hangs=int(hung),
        notes=(
            "RSS at 25/50/75% of the requests: "
            + ", ".join(f"{(v or 0) / 1024:.0f} MiB" for v in rss_at.values())
            + f"; growth over the second half, extrapolated to {requests} requests: {growth_mib:.1f} MiB "
            f"(limit {GROWTH_LIMIT_MIB}); {report.get('images_per_s')} images/s; {len(samples)} samples"
        ),
    )
    assert not hung, "the service did not finish in 600 s"
    assert proc.returncode == 0 and failed == 0, stderr[-2000:]
    assert len(list(out.glob("*.png"))) == requests
    assert len(late) > 10, f"too few RSS samples in the second half ({len(late)}): {samples[-5:]}"
    assert flat, (
        f"the service's memory grows: {growth_mib:.1f} MiB over {requests} requests (slope {slope:.2f} KiB/request)"
    )
