"""Whole-file atomic writes, the one way the project writes a small file that a reader or a resumed job
relies on: a reader, or a run restarted after kill -9 or a power cut, sees the old content or the new,
never half a file."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write `data` (str as UTF-8) to a temporary file beside `path`, flush it to disk, rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: ranks never share a temp file
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
