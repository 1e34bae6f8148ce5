"""Fuzzed compile-cache files (issue 23, part 1): seeded mutations of a real compile-cache file
through `CompileCache.load`. Every mutated file must take the documented fallback — "corrupt" or
"stale": ignored, the module compiled afresh, the file rewritten (fastdiff.engines.compiled) —
and none may reach torch.compiler.load_cache_artifacts; the unmutated file loads (the positive
control). A second test runs `CompiledCall` over damaged files for real: the outputs stay right
and the file is rewritten.

Categories: truncation, an empty file, bytes flipped in the magic, checksum line, header and
artefacts, appended bytes, header JSON of the wrong types, a wrong byte count, another
environment, another cache format, a header that is not JSON, a huge or deeply nested header, a
directory or a dangling link in the file's place. Counted by tests/reliability/counts.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
from collections import Counter

import pytest
import torch

from fastdiff.engines import compiled
from fastdiff.engines.compiled import MAGIC, CompileCache
from tests.reliability.counts import record

pytestmark = pytest.mark.reliability

SEED = 23
CASES = 150
LIMIT_S = 20  # per case: a hang is a failure, not a stuck CI
FALLBACK = ("corrupt", "stale")  # the documented outcomes for a file that must not load


def _f(x):
    return torch.sin(x) * 2 + torch.cos(x) * x


def _compilable() -> bool:
    return (
        compiled.supported() and compiled.why_not_compilable("cpu") is None and compiled._fresh_artifacts() is not None
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[bytes, bytes, dict]:
    """(file bytes, artefacts, environment) of a real cache file: a small function compiled on the
    CPU when torch.compile can run here (a few seconds), else CompileCache.save of a stand-in for
    the artefacts torch returns."""
    root = tmp_path_factory.mktemp("compile-cache")
    env = compiled.environment("cpu")
    if _compilable():
        torch._dynamo.reset()
        call = compiled.CompiledCall("f", _f, "f-base", "cpu", cache=CompileCache(root))
        call(torch.randn(4, 5))
        (path,) = root.glob("f-*.bin")
    else:
        payload = random.Random(SEED).randbytes(20000)
        path = root / "f-0.bin"
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.compiler, "save_cache_artifacts", lambda: (payload, None), raising=False)
            assert CompileCache(root).save(path, env, "f 4x5:float32")
    data = path.read_bytes()
    header, payload = CompileCache.read(path)
    assert header["environment"] == env and payload
    return data, payload, env


# ---------------------------------------------------------------------------------- mutations
def _signed(header_line: bytes, payload: bytes, magic: bytes = MAGIC) -> bytes:
    """A file whose checksum matches: only the header's own checks can refuse it."""
    body = header_line + b"\n" + payload
    return magic + b"sha256:" + hashlib.sha256(body).hexdigest().encode() + b"\n" + body


def _regions(data: bytes) -> dict[str, tuple[int, int]]:
    digest_end = data.index(b"\n", len(MAGIC)) + 1
    header_end = data.index(b"\n", digest_end) + 1
    return {
        "magic": (0, len(MAGIC)),
        "checksum": (len(MAGIC), digest_end),
        "header": (digest_end, header_end),
        "payload": (header_end, len(data)),
    }


WRONG = ["x", "", 1, -1, 2.5, True, None, [], {}, [1, 2], {"a": 1}]


def mutate(rng: random.Random, data: bytes, payload: bytes, env: dict) -> tuple[str, object]:
    """(category, mutated file bytes, or "directory" / "dangling_link" for a thing in its place)."""
    regions = _regions(data)
    header = json.loads(data[regions["header"][0] : regions["header"][1]])
    kind = rng.choice(
        ["truncate"] * 3
        + ["flip_magic", "flip_checksum", "flip_header", "flip_header"]
        + ["flip_payload"] * 4
        + ["appended", "header_types", "header_types", "byte_count", "environment", "other_format"]
        + ["not_json", "huge_header", "empty", "in_its_place"]
    )
    if kind == "truncate":
        return kind, data[: rng.randrange(1, len(data))]
    if kind == "empty":
        return kind, b""
    if kind.startswith("flip_"):
        lo, hi = regions[kind.removeprefix("flip_")]
        out = bytearray(data)
        for _ in range(rng.choice([1, 1, 1, 2, 8])):
            out[rng.randrange(lo, hi)] ^= rng.randrange(1, 256)
        return kind, bytes(out)
    if kind == "appended":
        return kind, data + rng.choice([b"\n", b"\0", b"x" * 7, rng.randbytes(300)])
    if kind == "header_types":
        key = rng.choice(["environment", "what", "bytes"])
        wrong = [
            v for v in WRONG if not (key == "bytes" and v == len(payload)) and not (key == "what" and v in ("x", ""))
        ]
        value = rng.choice(wrong)
        if rng.random() < 0.2:
            doc = rng.choice([[header], "header", 7, None])  # not an object at all
        else:
            doc = dict(header, **{key: value}) if rng.random() < 0.8 else {k: v for k, v in header.items() if k != key}
        return kind, _signed(json.dumps(doc).encode(), payload)
    if kind == "byte_count":
        size = len(payload) + rng.choice([-len(payload), -1, 1, 4096, 10**12])
        return kind, _signed(json.dumps(dict(header, bytes=size)).encode(), payload)
    if kind == "environment":
        other = dict(env)
        what = rng.choice(["torch", "triton", "device", "extra", "missing"])
        if what == "missing":
            other.pop(rng.choice(sorted(other)))
        elif what == "extra":
            other["cuda"] = "12.4"
        else:
            other[what] = rng.choice(["2.0.0", "3.1.0", "NVIDIA H100 (sm_90)", None, ""])
        if other == env:  # the choice happened to be this environment's value
            other["torch"] = "0.0.0"
        return kind, _signed(json.dumps(dict(header, environment=other)).encode(), payload)
    if kind == "other_format":
        if rng.random() < 0.5:  # what format 1 wrote: no checksum line
            return kind, b"FASTDIFF-COMPILE-CACHE 1\n" + json.dumps(header).encode() + b"\n" + payload
        return kind, _signed(json.dumps(header).encode(), payload, magic=b"FASTDIFF-COMPILE-CACHE 3\n")
    if kind == "not_json":
        line = rng.choice([b"{", b"not json", b"\xff\xfe\x00", b"", b"{" + b'"a":1,' * 50, b"[1, 2"])
        return kind, _signed(line, payload)
    if kind == "huge_header":
        shape = rng.choice(["long", "deep", "no_newline"])
        if shape == "long":  # a valid object, past the header size cap
            return kind, _signed(json.dumps(dict(header, what="x" * (200 * 1024))).encode(), payload)
        if shape == "deep":
            depth = rng.choice([1000, 30000])
            return kind, _signed(b"[" * depth + b"]" * depth, payload)
        return kind, MAGIC + b"sha256:" + b"0" * 64 + b"\n" + b"{" * (300 * 1024)
    return kind, rng.choice(["directory", "dangling_link"])


def _place(path, mutated) -> None:
    if mutated == "directory":
        path.mkdir()
        (path / "inside.bin").write_bytes(b"x")
    elif mutated == "dangling_link":
        os.symlink(path.parent / "nowhere.bin", path)
    else:
        path.write_bytes(mutated)


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def test_fuzzed_cache_files_are_ignored_and_rebuilt_never_loaded(base, tmp_path, monkeypatch):
    data, payload, env = base
    handed: list[bytes] = []
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda p: handed.append(p), raising=False)
    cache = CompileCache(tmp_path)

    # The positive control: the unmutated file loads, its artefacts handed to torch once.
    control = tmp_path / "control.bin"
    control.write_bytes(data)
    assert cache.load(control, env) == ("loaded", str(control)) and handed == [payload]
    handed.clear()

    rng = random.Random(SEED)
    per_kind: dict[str, Counter] = {}
    problems = []
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for i in range(CASES):
            kind, mutated = mutate(rng, data, payload, env)
            path = tmp_path / f"case-{i}.bin"
            _place(path, mutated)
            signal.alarm(LIMIT_S)
            try:
                status, detail = cache.load(path, env)
            except _Timeout:
                status, detail = "hang", ""
            except Exception as exc:  # noqa: BLE001 - anything raised is a crash here
                status, detail = "crash", f"{type(exc).__name__}: {exc}"[:300]
            finally:
                signal.alarm(0)
            if handed:
                status, detail = "silent_load", f"handed to torch ({status}: {detail})"
                handed.clear()
            k = per_kind.setdefault(kind, Counter())
            k["cases"] += 1
            k[status] += 1
            expected = ("stale",) if kind in ("environment", "other_format") else FALLBACK
            if status not in expected or (status in FALLBACK and "ignored, rebuilding" not in detail):
                problems.append((i, kind, status, detail))
    finally:
        signal.signal(signal.SIGALRM, old)

    total = Counter()
    for k in per_kind.values():
        total.update(k)
    record(
        "compile_cache",
        "compile-cache files",
        cases=CASES + 1,
        bad_inputs=CASES,
        clear_errors=total["corrupt"] + total["stale"],
        loads=1,
        crashes=total["crash"],
        silent_loads=total["silent_load"] + total["loaded"],
        hangs=total["hang"],
        per_category={k: dict(v) for k, v in sorted(per_kind.items())},
    )
    assert CASES >= 100 and len(per_kind) >= 12, sorted(per_kind)
    assert total["crash"] == 0 and total["hang"] == 0 and total["silent_load"] + total["loaded"] == 0, problems[:10]
    assert not problems, "\n".join(f"case {i} ({kind}): {status}: {detail}" for i, kind, status, detail in problems)


@pytest.mark.skipif(not _compilable(), reason="torch.compile (and its cache artefacts) cannot run on the CPU here")
def test_a_damaged_cache_file_still_gives_the_right_outputs_and_is_rewritten(base, tmp_path, monkeypatch):
    """CompiledCall over damaged files, compiled for real: the outputs match eager, the event says
    why the file was ignored, nothing damaged reaches torch, and the rewritten file loads."""
    data, payload, env = base
    real_load = torch.compiler.load_cache_artifacts
    handed: list[bytes] = []

    def recording_load(p):
        handed.append(p)
        return real_load(p)

    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", recording_load)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    want = _f(x)
    cache = CompileCache(tmp_path)
    path = cache.path("f", "f-call", compiled.signature((x,)))
    flipped = bytearray(data)
    flipped[len(data) - len(payload) // 2] ^= 0x10
    other_env = _signed(
        json.dumps(dict(json.loads(data.split(b"\n")[2]), environment={"torch": "0"})).encode(), payload
    )
    cases = [
        ("directory", "directory", "corrupt"),  # not rewritable: the module runs compiled, uncached
        ("flip_payload", bytes(flipped), "corrupt"),
        ("truncate", data[: len(data) // 3], "corrupt"),
        ("environment", other_env, "stale"),
    ]
    counts: Counter = Counter()
    for kind, mutated, expected in cases:
        torch._dynamo.reset()
        call = compiled.CompiledCall("f", _f, "f-call", "cpu", cache=cache)
        path.unlink(missing_ok=True)  # the previous case's rewritten file
        _place(path, mutated)
        if mutated == "directory":
            with pytest.warns(RuntimeWarning, match="could not write the compile cache file"):
                out = call(x)
        else:
            out = call(x)
        status, detail = call.events[0][1:]
        assert torch.allclose(out, want, rtol=1e-5, atol=1e-6), kind
        assert status == expected and "ignored, rebuilding" in detail, (kind, status, detail)
        assert handed == [], kind
        counts[status] += 1
        if mutated == "directory":
            (path / "inside.bin").unlink()
            path.rmdir()
            continue
        header, _ = CompileCache.read(path)  # rewritten intact for this environment
        assert header["environment"] == env, kind

    torch._dynamo.reset()
    call = compiled.CompiledCall("f", _f, "f-call", "cpu", cache=cache)
    assert torch.allclose(call(x), want, rtol=1e-5, atol=1e-6)
    assert call.events[0][1] == "loaded" and len(handed) == 1
    record(
        "compile_cache",
        "compile-cache files",
        cases=len(cases) + 1,
        bad_inputs=len(cases),
        clear_errors=counts["corrupt"] + counts["stale"],
        loads=1,
    )
