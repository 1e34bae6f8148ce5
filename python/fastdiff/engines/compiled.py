"""torch.compile of the engine's modules, with the compile artefacts kept on disk.

Each compiled module keeps, per input signature, one file under the compile cache
(``$FASTDIFF_CACHE/compile``, default ~/.cache/fastdiff/compile) holding the artefacts that
torch.compiler.save_cache_artifacts() returns (Inductor's generated code, AOTAutograd
graphs, autotuning results). The file is named by the module's architecture and the input
signature. Its format (version 2) is one line of magic, ``FASTDIFF-COMPILE-CACHE 2``, a line
holding the sha256 of the rest of the file, one line of JSON header — the environment it was
built in (torch and Triton versions and the device: GPU name and compute capability, or the
CPU), a description and the artefacts' length in bytes — and then the artefacts.

On the first call with a signature the file is loaded when it is intact (the magic, the
checksum, a header of the right types and the length all match) and its header matches this
environment. Anything else takes the documented fallback: a file from another torch version or
GPU, or of another cache format (version 1 files had no checksum), is "stale"; a file that
cannot be read, is truncated, has a damaged header, does not match its checksum (one flipped
byte anywhere) or is not a regular file is "corrupt". Either way it is ignored — never handed to
torch — the module is compiled afresh, the file rewritten, and the event says why. A cache file
that cannot be written leaves the module compiled but uncached, with a RuntimeWarning. Each
file holds only what its own first call compiled (torch records the artefacts of that compile
apart from the rest of the process's); a torch that cannot keep them apart gets no file rather
than a file holding every module's artefacts.

Shapes are static (`dynamic=False`): every input signature compiles once. Dynamo compiles one
function at most `torch._dynamo.config.recompile_limit` times (8 by default) and then silently
runs it uncompiled; here a signature past the limit runs eagerly *with a RuntimeWarning* naming
the limit and how to raise it, and its event says "eager".
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import threading
import warnings
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from pathlib import Path

import torch

from ..dtypes import dtype_name
from ..files import atomic_write
from ..graphs import signature

FORMAT = 2
MAGIC = b"FASTDIFF-COMPILE-CACHE %d\n" % FORMAT
_MAGIC_PREFIX = b"FASTDIFF-COMPILE-CACHE "
MAX_HEADER_BYTES = 64 * 1024  # a header line is a few hundred bytes; past this the file is damaged
_FIRST_CALLS = threading.Lock()  # one first call (compile + its artefacts) at a time, process-wide


def cache_root() -> Path:
    base = Path(os.environ.get("FASTDIFF_CACHE", Path.home() / ".cache" / "fastdiff"))
    return base / "compile"


def supported() -> bool:
    """Whether this torch can save and load compile artefacts (torch >= 2.7)."""
    compiler = getattr(torch, "compiler", None)
    return hasattr(compiler, "save_cache_artifacts") and hasattr(compiler, "load_cache_artifacts")


def _fresh_artifacts():
    """A context in which torch records only the compile artefacts made inside it, or None when
    this torch cannot keep them apart (CacheArtifactManager.with_fresh_cache, torch >= 2.8)."""
    try:
        from torch.compiler._cache import CacheArtifactManager
    except ImportError:
        return None
    return getattr(CacheArtifactManager, "with_fresh_cache", None)


def recompile_limit() -> int | None:
    """Dynamo's per-function compile limit (recompile_limit; cache_size_limit before torch 2.6)."""
    config = torch._dynamo.config
    return getattr(config, "recompile_limit", getattr(config, "cache_size_limit", None))


class _NeverRaised(Exception):
    pass


def _limit_hit() -> type[Exception]:
    """What Dynamo raises instead of falling back to eager when fail_on_recompile_limit_hit is set."""
    return getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", _NeverRaised)


def _fail_on_limit():
    config = torch._dynamo.config
    if hasattr(config, "fail_on_recompile_limit_hit"):
        return config.patch(fail_on_recompile_limit_hit=True)
    return nullcontext()


def why_not_compilable(device) -> str | None:
    """None when torch.compile can generate code for `device` here, else the reason."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    device = torch.device(device)
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch.compile on CUDA needs Triton (pip install triton)"
        return None
    if device.type == "cpu":
        cxx = os.environ.get("CXX")
        if not any(shutil.which(c) for c in ([cxx] if cxx else []) + ["g++", "c++", "clang++"]):
            return "torch.compile on the CPU needs a C++ compiler (g++ or clang++) on PATH"
        return None
    return f"torch.compile is not set up for {device.type} devices here"


def environment(device) -> dict:
    """What compile artefacts depend on besides the model and shapes."""
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        where = f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})"
    else:
        where = f"{device.type}: {platform.machine()} {platform.processor() or ''}".strip()
    return {"torch": torch.__version__, "triton": triton_version, "device": where}


def module_fingerprint(module: torch.nn.Module) -> str:
    """Architecture (class, config, parameter shapes and dtypes), not weights: compiled code
    reads the weights as inputs."""
    h = hashlib.sha256(type(module).__qualname__.encode())
    config = getattr(module, "config", None)
    if hasattr(config, "to_dict"):  # transformers' PretrainedConfig
        config = config.to_dict()
    if config is not None:
        config = dict(config) if isinstance(config, Mapping) else {"repr": repr(config)}
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, p in module.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
    return h.hexdigest()[:16]


def _describe_signature(sig: tuple) -> str:
    return ";".join(f"{'x'.join(map(str, shape))}:{dtype_name(dtype)}" for shape, dtype, _, _ in sig)


class StaleCacheError(ValueError):
    """A compile cache file of another format version."""


class CompileCache:
    """Compile artefacts on disk, one file per (module, architecture, input signature)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else cache_root()

    def path(self, name: str, fingerprint: str, sig: tuple) -> Path:
        key = hashlib.sha256(f"{fingerprint}|{_describe_signature(sig)}".encode()).hexdigest()[:16]
        return self.root / f"{name}-{key}.bin"

    @staticmethod
    def encode(env: dict, description: str, payload: bytes) -> bytes:
        """The bytes of a cache file holding payload (torch's artefacts) built in env."""
        header = {"environment": env, "what": description, "bytes": len(payload)}
        body = json.dumps(header).encode() + b"\n" + payload
        return MAGIC + b"sha256:" + hashlib.sha256(body).hexdigest().encode() + b"\n" + body

    @staticmethod
    def read(path: Path) -> tuple[dict, bytes]:
        """(header, artefacts) of an intact cache file of this format; StaleCacheError for a file of
        another format version, ValueError (corrupt) for anything else."""
        data = Path(path).read_bytes()
        if not data.startswith(MAGIC):
            first = data[: len(MAGIC) + 8].partition(b"\n")[0]
            version = first[len(_MAGIC_PREFIX) :]
            if first.startswith(_MAGIC_PREFIX) and version.isdigit() and int(version) != FORMAT:
                raise StaleCacheError(f"cache format {version.decode()}, this fastdiff reads format {FORMAT}")
            raise ValueError("not a fastdiff compile cache file")
        digest_line, sep, body = data[len(MAGIC) :].partition(b"\n")
        digest = digest_line.removeprefix(b"sha256:")
        if not sep or len(digest) != 64 or digest_line == digest:
            raise ValueError("truncated or damaged checksum line")
        end = body.find(b"\n", 0, MAX_HEADER_BYTES + 1)
        if end < 0:
            raise ValueError("truncated or oversized header")
        payload = body[end + 1 :]
        try:
            header = json.loads(body[:end])
        except RecursionError as exc:
            raise ValueError("header nested too deeply") from exc
        except ValueError as exc:
            raise ValueError(f"damaged header: {exc}") from exc
        if not isinstance(header, dict):
            raise ValueError(f"header is a {type(header).__name__}, not an object")
        size = header.get("bytes")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"header 'bytes' is {size!r}, not a length")
        if size != len(payload):
            raise ValueError(f"truncated or corrupt artefacts: {len(payload)} bytes, the header says {size}")
        if hashlib.sha256(body).hexdigest().encode() != digest:
            raise ValueError("the header and artefacts do not match their sha256 (a damaged file)")
        if not isinstance(header.get("environment"), dict) or not isinstance(header.get("what"), str):
            raise ValueError("header 'environment' or 'what' has the wrong type")
        return header, payload

    def load(self, path: Path, env: dict) -> tuple[str, str]:
        """Load the artefacts in `path` into torch when the file is intact and was built here.
        Returns (status, detail): "loaded", "missing", "stale" (another environment or cache
        format) or "corrupt" (anything else); only "loaded" hands anything to torch."""
        path = Path(path)
        if not os.path.lexists(path):
            return "missing", str(path)
        if not path.is_file():
            return "corrupt", f"{path}: not a regular file; ignored, rebuilding"
        try:
            header, payload = self.read(path)
        except StaleCacheError as exc:
            return "stale", f"{path}: {exc}; ignored, rebuilding"
        except (OSError, ValueError) as exc:
            return "corrupt", f"{path}: {exc}; ignored, rebuilding"
        built = header["environment"]
        if built != env:
            return "stale", f"{path} was built with {built}, this is {env}; ignored, rebuilding"
        try:
            torch.compiler.load_cache_artifacts(payload)
        except Exception as exc:  # noqa: BLE001 - torch's own deserialisation of intact bytes
            return "corrupt", f"{path}: torch could not load its artefacts ({type(exc).__name__}: {exc}); rebuilding"
        return "loaded", str(path)

    def save(self, path: Path, env: dict, description: str) -> bool:
        """Write the artefacts this process has compiled so far (atomically); False when torch
        has none to give or the file cannot be written (a RuntimeWarning says why)."""
        saved = torch.compiler.save_cache_artifacts()
        if not saved or not saved[0]:
            return False
        path = Path(path)
        try:
            atomic_write(path, self.encode(env, description, saved[0]))
        except OSError as exc:
            warnings.warn(
                f"fastdiff: could not write the compile cache file {path} ({exc}); the module is compiled "
                "but its artefacts are not cached",
                RuntimeWarning,
                stacklevel=2,
            )
            return False
        return True


class CompiledCall:
    """torch.compile(fn) over tensor arguments, with the artefacts of each input signature
    loaded from / saved to a CompileCache. `events` records (signature, status, detail)."""

    def __init__(
        self,
        name: str,
        fn: Callable,
        fingerprint: str,
        device,
        *,
        cache: CompileCache | None = None,
        mode: str | None = None,
    ):
        self.name = name
        self.fn = fn
        self.fingerprint = fingerprint
        self.device = torch.device(device)
        self.cache = cache if cache is not None else (CompileCache() if supported() else None)
        self.compiled = torch.compile(fn, dynamic=False, mode=mode)
        self.seen: set = set()
        self.eager: set = set()  # signatures past Dynamo's recompile limit: run uncompiled
        self.events: list[tuple[str, str, str]] = []

    def __call__(self, *args):
        sig = signature(args)
        if sig in self.seen:
            return self.fn(*args) if sig in self.eager else self.compiled(*args)
        with _FIRST_CALLS:
            if sig in self.seen:  # another thread compiled it meanwhile
                return self(*args)
            return self._first_call(sig, args)

    def _first_call(self, sig: tuple, args: tuple):
        described = _describe_signature(sig)
        status, detail = "uncached", "this torch cannot save compile artefacts"
        path = env = None
        fresh = _fresh_artifacts()
        if self.cache is not None and fresh is None:
            detail = "this torch cannot keep one module's compile artefacts apart from the others'"
        elif self.cache is not None:
            env = environment(self.device)
            path = self.cache.path(self.name, self.fingerprint, sig)
            status, detail = self.cache.load(path, env)
        with fresh() if path is not None else nullcontext():
            try:
                with _fail_on_limit():
                    out = self.compiled(*args)
            except _limit_hit():
                return self._past_limit(sig, described, args)
            except Exception as exc:
                raise RuntimeError(
                    f"torch.compile of {self.name} failed for inputs {described}: {type(exc).__name__}: {exc}. "
                    "Use backend='eager' (or 'cuda_graph' on a GPU) for this model"
                ) from exc
            if path is not None and status != "loaded":
                self.cache.save(path, env, f"{self.name} {described}")
        self.seen.add(sig)
        self.events.append((described, status, detail))
        return out

    def _past_limit(self, sig: tuple, described: str, args: tuple):
        limit = recompile_limit()
        detail = (
            f"torch.compile of {self.name} reached Dynamo's recompile limit "
            f"(torch._dynamo.config.recompile_limit = {limit}) at inputs {described}: these inputs run "
            "eagerly (not compiled); set torch._dynamo.config.recompile_limit higher before the first call, "
            "or use fewer shapes"
        )
        warnings.warn(f"fastdiff: {detail}", RuntimeWarning, stacklevel=4)
        self.eager.add(sig)
        self.seen.add(sig)
        self.events.append((described, "eager", detail))
        return self.fn(*args)
