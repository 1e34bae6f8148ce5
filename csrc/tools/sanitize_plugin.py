"""pytest plugin of `make test-sanitize` (csrc/tools/sanitize.sh): the sanitizer build's
fastdiff._C replaces the installed one, without touching the package.

FASTDIFF_SANITIZED_C names the directory that holds the sanitized module (CMake's
FASTDIFF_PYTHON_MODULE_DIR of the sanitizer build). The plugin loads it as `fastdiff._C` when
pytest starts, before any test or conftest imports the package's own _C: every later
`from fastdiff import _C` finds it in sys.modules. It refuses to run when the module is missing,
and checks at the end that no test swapped another _C in, so a run that says it tested the
sanitized module did.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import fastdiff


def _load_sanitized():
    directory = os.environ.get("FASTDIFF_SANITIZED_C")
    if not directory:
        raise RuntimeError("sanitize_plugin: set FASTDIFF_SANITIZED_C to the sanitized _C's directory")
    found = sorted(Path(directory).glob("_C.*.so")) or sorted(Path(directory).glob("_C.so"))
    if len(found) != 1:
        raise RuntimeError(f"sanitize_plugin: expected one _C module in {directory}, found {[str(p) for p in found]}")
    if "fastdiff._C" in sys.modules:
        raise RuntimeError(f"sanitize_plugin: fastdiff._C was imported before the plugin: {sys.modules['fastdiff._C']}")
    spec = importlib.util.spec_from_file_location("fastdiff._C", found[0])
    module = importlib.util.module_from_spec(spec)  # runs PyInit__C: fails here without the ASan runtime
    sys.modules["fastdiff._C"] = module
    spec.loader.exec_module(module)
    fastdiff._C = module
    return module


_SANITIZED = _load_sanitized()


def pytest_report_header(config):
    return f"fastdiff._C: {_SANITIZED.__file__} (sanitizer build; LD_PRELOAD={os.environ.get('LD_PRELOAD', '')})"


def pytest_sessionfinish(session, exitstatus):
    if sys.modules.get("fastdiff._C") is not _SANITIZED or getattr(fastdiff, "_C", None) is not _SANITIZED:
        print(f"\nsanitize_plugin: fastdiff._C is no longer {_SANITIZED.__file__}", file=sys.stderr)
        session.exitstatus = 1
