"""The compiled backend: torch.compile (Inductor on the CPU here) with compile artefacts cached on
disk, stale or corrupt cache files ignored and rebuilt."""

from __future__ import annotations

import json

import pytest
import torch

from fastdiff.engines import compiled
from fastdiff.engines.compiled import MAGIC, CompileCache
from tests.conftest import toy_engine

pytestmark = pytest.mark.skipif(
    compiled.why_not_compilable("cpu") is not None or not compiled.supported(),
    reason=f"torch.compile cannot run here: {compiled.why_not_compilable('cpu') or 'no save_cache_artifacts'}",
)


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.out = torch.nn.Conv2d(8, 3, 3, padding=1)
        self.emb = torch.nn.Embedding(3, 8)

    def forward(self, x, t, class_labels=None, return_dict=False):
        h = torch.nn.functional.silu(self.inp(x) + self.emb(class_labels)[:, :, None, None])
        return (self.out(h) * (t / 1000.0)[:, None, None, None],)


def sample(engine):
    return engine.sample(["0", "1"], steps=3, seed=0).latents


def fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path))
    torch._dynamo.reset()
    return toy_engine(Small(), torch.float32, backend="compiled")


def cache_file(tmp_path):
    files = sorted((tmp_path / "compile").glob("unet-*.bin"))
    assert len(files) == 1, files
    return files[0]


def test_compiled_matches_eager_and_reuses_or_rebuilds_its_disk_cache(tmp_path, monkeypatch):
    eager = sample(toy_engine(Small(), torch.float32))

    engine = fresh(tmp_path, monkeypatch)
    assert torch.allclose(sample(engine), eager, rtol=1e-5, atol=1e-6)
    assert [e[1] for e in engine._unet_call.inner.events] == ["missing"]
    path = cache_file(tmp_path)
    header, payload = CompileCache.read(path)
    assert header["environment"] == compiled.environment("cpu") and len(payload) > 0
    assert "unet 2x3x6x6:float32" in header["what"]

    engine = fresh(tmp_path, monkeypatch)  # a new process would do the same
    assert torch.allclose(sample(engine), eager, rtol=1e-5, atol=1e-6)
    assert [e[1] for e in engine._unet_call.inner.events] == ["loaded"]

    # A cache from another torch version: ignored (never loaded), rebuilt, rewritten.
    path.write_bytes(CompileCache.encode(dict(header["environment"], torch="2.0.0"), header["what"], payload))
    engine = fresh(tmp_path, monkeypatch)
    assert torch.allclose(sample(engine), eager, rtol=1e-5, atol=1e-6)
    status, detail = engine._unet_call.inner.events[0][1:]
    assert status == "stale" and "'torch': '2.0.0'" in detail and "ignored, rebuilding" in detail
    assert CompileCache.read(cache_file(tmp_path))[0]["environment"] == compiled.environment("cpu")

    # A truncated file: the same.
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    engine = fresh(tmp_path, monkeypatch)
    assert torch.allclose(sample(engine), eager, rtol=1e-5, atol=1e-6)
    assert engine._unet_call.inner.events[0][1] == "corrupt"
    assert CompileCache.read(cache_file(tmp_path))[0]["environment"] == compiled.environment("cpu")


def test_cache_files_are_keyed_by_architecture_and_shape(tmp_path):
    cache = CompileCache(tmp_path)
    a = compiled.module_fingerprint(Small())
    sig = (((2, 3, 6, 6), torch.float32, torch.device("cpu"), (108, 36, 6, 1)),)
    other = (((4, 3, 6, 6), torch.float32, torch.device("cpu"), (108, 36, 6, 1)),)
    assert cache.path("unet", a, sig) == cache.path("unet", compiled.module_fingerprint(Small()), sig)
    assert cache.path("unet", a, sig) != cache.path("unet", a, other)
    wider = Small()
    wider.inp = torch.nn.Conv2d(3, 16, 3, padding=1)
    assert compiled.module_fingerprint(wider) != a
    assert cache.load(tmp_path / "absent.bin", {})[0] == "missing"
    (tmp_path / "junk.bin").write_bytes(b"not a cache")
    assert cache.load(tmp_path / "junk.bin", {})[0] == "corrupt"


def test_a_damaged_or_old_cache_file_is_never_handed_to_torch(tmp_path, monkeypatch):
    """Format 2 checksums the header and artefacts: a byte flipped in the artefacts (same length)
    is "corrupt", a format-1 file "stale", a directory in the file's place "corrupt"; only the
    intact file reaches torch.compiler.load_cache_artifacts."""
    handed = []
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda payload: handed.append(payload))
    cache, env = CompileCache(tmp_path), compiled.environment("cpu")
    payload = bytes(range(256)) * 8
    path = tmp_path / "unet-0.bin"
    good = CompileCache.encode(env, "unet 2x3x6x6:float32", payload)
    assert good.startswith(MAGIC) and MAGIC == b"FASTDIFF-COMPILE-CACHE 2\n"

    flipped = bytearray(good)
    flipped[-100] ^= 0x01
    path.write_bytes(bytes(flipped))
    status, detail = cache.load(path, env)
    assert status == "corrupt" and "sha256" in detail and "ignored, rebuilding" in detail

    header = {"environment": env, "what": "unet", "bytes": len(payload)}  # what format 1 wrote
    path.write_bytes(b"FASTDIFF-COMPILE-CACHE 1\n" + json.dumps(header).encode() + b"\n" + payload)
    status, detail = cache.load(path, env)
    assert status == "stale" and "cache format 1" in detail

    path.unlink()
    path.mkdir()
    assert cache.load(path, env)[0] == "corrupt"
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (payload, None))
    with pytest.warns(RuntimeWarning, match="could not write the compile cache file"):
        assert cache.save(path, env, "unet") is False
    assert not list(tmp_path.glob("*.tmp"))
    assert handed == []

    path.rmdir()
    path.write_bytes(good)
    assert cache.load(path, env) == ("loaded", str(path)) and handed == [payload]


def test_every_shipped_module_has_a_fingerprint():
    """diffusers configs are mappings, transformers' are objects with to_dict()."""
    pytest.importorskip("diffusers", reason="engines need diffusers")
    import fastdiff

    engine = fastdiff.build_engine("tiny-shapes", device="cpu", backend="compiled")  # compiles lazily
    modules = [engine.unet, engine.conditioner.text_encoder, engine.decoder.vae]
    prints = {compiled.module_fingerprint(m) for m in modules}
    assert len(prints) == 3
    assert compiled.module_fingerprint(engine.conditioner.text_encoder) == compiled.module_fingerprint(
        engine.conditioner.text_encoder
    )


def _artifact_keys(path) -> set:
    from torch.compiler._cache import CacheArtifactManager

    artifacts = CacheArtifactManager.deserialize(CompileCache.read(path)[1])
    return {a.key for group in artifacts.values() for a in group}


@pytest.mark.skipif(compiled._fresh_artifacts() is None, reason="this torch cannot keep modules' artefacts apart")
def test_each_module_file_holds_only_its_own_artefacts(tmp_path):
    """save_cache_artifacts() returns everything the process compiled; a module's file must hold
    only what its own first call compiled (else each file grows with every other module)."""
    torch._dynamo.reset()
    cache = CompileCache(tmp_path)
    x = torch.randn(3, 5)

    def first(x):
        return torch.sin(x) * 2 + 1

    def second(x):
        return torch.cos(x) - x * 3

    a = compiled.CompiledCall("a", first, "fa", "cpu", cache=cache)
    b = compiled.CompiledCall("b", second, "fb", "cpu", cache=cache)
    assert torch.allclose(a(x), first(x)) and torch.allclose(b(x), second(x))
    (file_a,) = tmp_path.glob("a-*.bin")
    (file_b,) = tmp_path.glob("b-*.bin")
    keys_a, keys_b = _artifact_keys(file_a), _artifact_keys(file_b)
    assert keys_a and keys_b and not keys_a & keys_b
    payload_b = CompileCache.read(file_b)[1]
    assert not any(key.encode() in payload_b for key in keys_a), "b's file holds a's artefacts"


def test_past_the_recompile_limit_inputs_run_eagerly_with_a_warning(tmp_path, monkeypatch):
    """Dynamo silently stops compiling a function after recompile_limit signatures; here the
    signature past the limit is named in a warning, runs eagerly, and says so in events."""
    torch._dynamo.reset()
    config = torch._dynamo.config
    monkeypatch.setattr(config, "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit", 1)

    def f(x):
        return torch.tanh(x) * 3

    call = compiled.CompiledCall("limited", f, "fl", "cpu", cache=CompileCache(tmp_path))
    first = torch.randn(2, 3)
    assert torch.allclose(call(first), f(first), rtol=1e-5, atol=1e-6)  # compiled: within the limit
    x = torch.randn(4, 3)
    limit = r"recompile limit \(torch._dynamo.config.recompile_limit = 1\) at inputs 4x3:float32"
    with pytest.warns(RuntimeWarning, match=limit):
        out = call(x)
    assert torch.equal(out, f(x))
    assert [e[1] for e in call.events] == ["missing", "eager"]
    assert torch.equal(call(x), f(x))  # still eager, no second warning needed
