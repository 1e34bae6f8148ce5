"""Writing files so that a kill at any moment leaves the old file or the new one, never half of
one: the one home of atomic writes (plans, calibration and training state, student directories).

A write goes to a temporary file in the same directory (so the rename cannot cross file systems),
is flushed and fsynced, then renamed over the target with os.replace (atomic on POSIX and
Windows). Readers therefore never see a half-written file as complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[BinaryIO], object]) -> Path:
    """Write `data` (text, bytes, or a function writing to a binary file) to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def replace_entries(staging: str | os.PathLike, out: str | os.PathLike, *, last: tuple[str, ...] = ()) -> Path:
    """Move every entry of the directory `staging` into `out` (replacing what is there), the names
    in `last` after the others, then remove `staging`. Each entry arrives whole (a rename); a
    kill in between leaves some entries old or missing, never a half-written one, and the entries
    in `last` (a completion marker such as fastdiff.json) only once the rest are in place."""
    staging, out = Path(staging), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries = sorted(staging.iterdir(), key=lambda p: (p.name in last, last.index(p.name) if p.name in last else 0))
    for entry in entries:
        target = out / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging.rmdir()
    return out
