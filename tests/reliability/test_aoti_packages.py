"""Corrupt AOTInductor packages through the C++ service (issue 23, part 1): truncated and
byte-flipped files, swapped files, manifests with wrong fields, other torch versions and devices,
file names that leave the package directory, and intact files of the wrong kind (re-hashed, so
that the checks past the manifest's SHA-256 are reached). Every case must end with the service's
exit status 1 and a message naming the problem: never a signal, a hang, or a request served.

`make test` builds the package and the service first (test-cpp); without them this skips.
Counted by tests/reliability/counts.py. FASTDIFF_RELIABILITY_FULL=1 (make test-reliability)
runs every case; otherwise every third (the same seeded list), to keep `make test` short.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from tests.reliability.counts import record

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parents[2]
SERVICE = Path(os.environ.get("FASTDIFF_SERVICE", ROOT / "build/cmake/fastdiff_service"))
PACKAGE = Path(os.environ.get("FASTDIFF_AOTI_PACKAGE", ROOT / "build/aoti/tiny-shapes"))
FULL = os.environ.get("FASTDIFF_RELIABILITY_FULL") == "1"
FILES = ("unet.pt2", "vae.pt2", "plan.json", "prompts.safetensors")


def _manifest() -> dict:
    return json.loads((PACKAGE / "package.json").read_text())


def _rehash(pkg: Path, doc: dict) -> None:
    doc["files"] = {n: "sha256:" + hashlib.sha256((pkg / n).read_bytes()).hexdigest() for n in doc["files"]}


# ------------------------------------------------------------------ the cases: (category, name, apply(pkg))
def _cases() -> list[tuple[str, str, object]]:
    rng = random.Random(23)
    cases = []

    def add(category, name, fn):
        cases.append((category, name, fn))

    sizes = {n: (PACKAGE / n).stat().st_size for n in FILES}
    for n in FILES:
        for cut in (0, 1, 100, sizes[n] // 2, sizes[n] - 1):

            def truncate(pkg, n=n, cut=cut):
                data = (pkg / n).read_bytes()
                (pkg / n).write_bytes(data[:cut])

            add("truncated file", f"{n} cut at {cut}", truncate)
        for _ in range(5):
            at = rng.randrange(sizes[n])

            def flip(pkg, n=n, at=at):
                data = bytearray((pkg / n).read_bytes())
                data[at] ^= 0x5A
                (pkg / n).write_bytes(bytes(data))

            add("byte flipped", f"{n} byte {at}", flip)
        add("file missing", n, lambda pkg, n=n: (pkg / n).unlink())

    def swap(pkg):
        a, b = (pkg / "unet.pt2").read_bytes(), (pkg / "vae.pt2").read_bytes()
        (pkg / "unet.pt2").write_bytes(b)
        (pkg / "vae.pt2").write_bytes(a)

    add("swapped or replaced file", "unet.pt2 <-> vae.pt2", swap)
    add("swapped or replaced file", "plan.json: another solver's plan", lambda pkg: _other_plan(pkg, rehash=False))

    # intact files of the wrong kind, re-hashed: the checks after the SHA-256
    def rehashed(change):
        def apply(pkg):
            change(pkg)
            doc = json.loads((pkg / "package.json").read_text())
            _rehash(pkg, doc)
            (pkg / "package.json").write_text(json.dumps(doc))

        return apply

    add(
        "wrong file, re-hashed",
        "unet.pt2 is the VAE",
        rehashed(lambda pkg: shutil.copy(pkg / "vae.pt2", pkg / "unet.pt2")),
    )
    add("wrong file, re-hashed", "plan for another schedule", lambda pkg: _other_plan(pkg, rehash=True, schedule=True))

    def narrower(pkg):  # prompts and manifest agree with each other, not with the compiled UNet
        from safetensors.torch import load_file, save_file

        t = load_file(str(pkg / "prompts.safetensors"))
        save_file({k: v[..., :-8].contiguous() for k, v in t.items()}, str(pkg / "prompts.safetensors"))
        doc = json.loads((pkg / "package.json").read_text())
        doc["cond_shape"][-1] -= 8
        _rehash(pkg, doc)
        (pkg / "package.json").write_text(json.dumps(doc))

    add("wrong file, re-hashed", "narrower prompts and cond_shape", narrower)
    for key, value in (("latent_shape", [4, 8, 7]), ("image_shape", [3, 32, 28])):  # shapes of another export

        def other_export(pkg, key=key, value=value):
            doc = json.loads((pkg / "package.json").read_text())
            doc[key] = value
            (pkg / "package.json").write_text(json.dumps(doc))

        add("wrong file, re-hashed", f"manifest {key} of another export", other_export)
    for name, tensors in (
        ("prompts without uncond", lambda c, u: {"cond": c}),
        ("cond of another width", lambda c, u: {"cond": c[..., :-1].contiguous(), "uncond": u}),
        ("uncond of another length", lambda c, u: {"cond": c, "uncond": u[:, :-1].contiguous()}),
        ("float16 prompts", lambda c, u: {"cond": c.half(), "uncond": u.half()}),
        ("cond without the prompt axis", lambda c, u: {"cond": c[0].contiguous(), "uncond": u}),
    ):

        def prompts(pkg, tensors=tensors):
            from safetensors.torch import load_file, save_file

            t = load_file(str(pkg / "prompts.safetensors"))
            save_file(tensors(t["cond"], t["uncond"]), str(pkg / "prompts.safetensors"))

        add("wrong file, re-hashed", name, rehashed(prompts))

    # the manifest
    def manifest_case(category, name, change):
        def apply(pkg):
            doc = json.loads((pkg / "package.json").read_text())
            change(doc)
            (pkg / "package.json").write_text(json.dumps(doc) if not isinstance(doc, str) else doc)

        add(category, name, apply)

    for torch_version in ("2.0.0", "9.9.9", "", "2.13"):
        manifest_case("other torch or device", f"torch {torch_version!r}", lambda d, v=torch_version: d.update(torch=v))
    for device in ("cuda", "mps", "xpu", "CPU"):
        manifest_case("other torch or device", f"device {device!r}", lambda d, v=device: d.update(device=v))
    for key in ("format", "version", "torch", "device", "prediction_type", "plan", "latent_shape", "cond_shape",
                "prompts", "unet", "files", "image_shape"):  # fmt: skip
        manifest_case("manifest field missing", key, lambda d, k=key: d.pop(k))
    for key in ("format", "version", "model", "torch", "device", "plan", "latent_shape", "cond_shape", "prompts",
                "unet", "vae", "files"):  # fmt: skip
        for value in rng.sample([5, "x", [], {}, None, True, -1.5], 2):
            if value is None and key == "vae":
                continue  # null is a package without a decoder: valid

            manifest_case("manifest wrong type", f"{key} = {value!r}", lambda d, k=key, v=value: d.update({k: v}))
    for value in (
        [4, 8],
        [4, 8, 8, 1],
        [0, 8, 8],
        [-4, 8, 8],
        [4.5, 8, 8],
        [1e30, 8, 8],
        ["4", 8, 8],
        [4, 8, 9],
        [4, 7, 8],
    ):
        manifest_case("manifest wrong value", f"latent_shape {value}", lambda d, v=value: d.update(latent_shape=v))
    for value in ([16, 65], [16], [0, 64], [17, 64]):
        manifest_case("manifest wrong value", f"cond_shape {value}", lambda d, v=value: d.update(cond_shape=v))
    for module, lo, hi in (("unet", 0, 63), ("unet", 5, 2), ("unet", 1, 1e30), ("vae", -1, 63), ("vae", 2.5, 63)):
        manifest_case(
            "manifest wrong value",
            f"{module} batch {lo}..{hi}",
            lambda d, m=module, lo=lo, hi=hi: d[m].update(min_batch=lo, max_batch=hi),
        )
    for value in (-1.0, 1e300, "7.5"):
        manifest_case(
            "manifest wrong value", f"guidance {value!r}", lambda d, v=value: d["prompts"].update(guidance_scale=v)
        )
    manifest_case("manifest wrong value", "prediction epsilon", lambda d: d.update(prediction_type="epsilon"))
    manifest_case("manifest wrong value", "format", lambda d: d.update(format="fastdiff.stepplan"))
    for version in (1, 3, "2"):
        manifest_case("manifest wrong value", f"version {version!r}", lambda d, v=version: d.update(version=v))
    for where in ("plan", "prompts", "unet"):
        for name in ("../plan.json", "/etc/passwd", ".hidden", "sub/plan.json", ""):

            def leave(d, where=where, name=name):
                if where == "plan":
                    d["plan"] = name
                else:
                    d[where]["file"] = name

            manifest_case("file name outside the package", f"{where} = {name!r}", leave)
    for name, change in (
        ("a file's hash missing", lambda d: d["files"].pop("unet.pt2")),
        ("a hash too short", lambda d: d["files"].update({"vae.pt2": d["files"]["vae.pt2"][:-1]})),
        ("a hash of another file", lambda d: d["files"].update({"plan.json": d["files"]["prompts.safetensors"]})),
        ("a hash not a string", lambda d: d["files"].update({"plan.json": 12})),
        ("md5 instead of sha256", lambda d: d["files"].update({"plan.json": "md5:" + "0" * 32})),
    ):
        manifest_case("manifest hashes", name, change)
    for name, text in (
        ("empty", ""),
        ("not an object", "[1, 2]"),
        ("nested 100000 deep", "[" * 100000 + "]" * 100000),
        ("NaN guidance", None),
        ("truncated", None),
    ):

        def raw(pkg, name=name, text=text):
            body = (pkg / "package.json").read_text()
            if name == "NaN guidance":
                text = body.replace('"guidance_scale": 1.5', '"guidance_scale": NaN')
            elif name == "truncated":
                text = body[: len(body) // 2]
            (pkg / "package.json").write_text(text)

        add("manifest not JSON", name, raw)
    return cases


def _other_plan(pkg: Path, *, rehash: bool, schedule: bool = False) -> None:
    from fastdiff import program, solvers
    from fastdiff.plan import StepPlan
    from fastdiff.schedules import PRESETS, DiscreteSchedule

    doc = json.loads((pkg / "package.json").read_text())
    plan = StepPlan.load(pkg / "plan.json")
    config = {**PRESETS["sd21"], "prediction_type": doc["prediction_type"]}
    if schedule:
        config["beta_end"] = 0.02
    other = solvers.build("ddim", DiscreteSchedule.from_config(config), plan.num_calls)
    if not schedule:  # the same schedule's times: only the integrity check can tell
        other = StepPlan.from_dict({**json.loads(other.dumps()), "schedule_fingerprint": plan.schedule_fingerprint})
    program.save(program.compile(other), pkg / "plan.json")
    if rehash:
        _rehash(pkg, doc)
        (pkg / "package.json").write_text(json.dumps(doc))


def _serve(pkg: Path, out: Path) -> tuple[str, str]:
    """(outcome, detail): "clear", "silent", "crash" or "hang"."""
    try:
        proc = subprocess.run(
            [str(SERVICE), str(pkg), "--out", str(out), "--requests", "1", "--threads", "1"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        return "hang", ""
    err = proc.stderr.strip()
    if proc.returncode == 0:
        return "silent", proc.stdout.strip()[-300:]
    lines = err.splitlines()
    if proc.returncode == 1 and lines and lines[-1].startswith("fastdiff_service: ") and len(lines[-1]) > 40:
        if "terminate called" not in err and "Segmentation" not in err:
            return "clear", lines[-1]
    return "crash", f"exit {proc.returncode}: {err[-500:]}"


@pytest.mark.skipif(
    not (SERVICE.is_file() and (PACKAGE / "package.json").is_file()),
    reason=f"the service binary ({SERVICE}) or the AOTI package ({PACKAGE}) is not built: run `make test-cpp`",
)
def test_corrupt_packages_are_refused_with_a_clear_message(tmp_path):
    if "files" not in _manifest():
        pytest.skip(f"{PACKAGE} predates package version 2 (no file hashes): rebuild it with `make aoti-package`")
    # the intact package serves (the control that makes "refused" mean something)
    intact = _serve(PACKAGE, tmp_path / "intact")
    assert intact[0] == "silent", f"the intact package does not serve: {intact}"
    cases = _cases()
    chosen = cases if FULL else cases[::3]
    per: dict[str, Counter] = {}
    bad, results = [], []
    for i, (category, name, apply) in enumerate(chosen):
        pkg = tmp_path / f"case-{i}"
        shutil.copytree(PACKAGE, pkg)
        apply(pkg)
        outcome, detail = _serve(pkg, tmp_path / f"out-{i}")
        per.setdefault(category, Counter())[outcome] += 1
        results.append({"case": f"{category} / {name}", "outcome": outcome, "message": detail[-300:]})
        if outcome != "clear":
            bad.append(f"{category} / {name}: {outcome}: {detail}")
        shutil.rmtree(pkg)
    total = Counter()
    for c in per.values():
        total.update(c)
    record(
        "aoti_packages",
        "AOTI packages through the C++ service",
        cases=len(chosen),
        bad_inputs=len(chosen),
        clear_errors=total["clear"],
        crashes=total["crash"],
        silent_loads=total["silent"],
        hangs=total["hang"],
        per_category={k: dict(v) for k, v in sorted(per.items())},
        results=results,
    )
    assert len(cases) >= 140
    assert not bad, "\n".join(bad)
