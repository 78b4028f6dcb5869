"""Atomic writes, the one way the project writes a file or folder that a reader or a resumed job relies on:
a reader, or a run restarted after kill -9 or a power cut, sees the old content or the new, never half."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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


def replace_dir(new: str | Path, target: str | Path) -> None:
    """Move the finished folder `new` to `target`, replacing a folder already there.

    The old folder is renamed aside first and removed only once `new` is in place, so a kill at any moment
    leaves either the old or the new folder at `target` (and at worst a `.NAME.old-PID` folder beside it).
    """
    new, target = Path(new), Path(target)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old)


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """A temporary folder beside `target` to write into; when the block ends, it replaces `target`
    (replace_dir) with the permissions a plain mkdir would give, or is removed if the block raised."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        apply_umask(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def apply_umask(folder: str | Path) -> None:
    """Give `folder` and everything in it the permissions a plain mkdir / open would have: mkdtemp makes a
    folder 0700 and safetensors writes 0600, which would hide a finished export from other users of a
    shared machine."""
    folder = Path(folder)
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
