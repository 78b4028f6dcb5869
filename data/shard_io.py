"""Reading the pipeline's own shards: `part-<source>-<index>.jsonl.zst`, one JSON document per line.

Every later stage (tokenizer training, the pretraining stream) reads shards through this module, so
the checks live in one place: a truncated zstd stream is an error naming the file (python-zstandard's
streaming reader returns a short read instead of raising, so the frame end is checked here), and a
malformed line names the file and line number. Which files a list of paths, folders and globs names is
defined here too (`match_patterns`), once for the readers of shards and for the sharder's inputs.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import orjson
import zstandard

CHUNK_BYTES = 1 << 20


class ShardError(ValueError):
    """A shard that cannot be read completely; the message names the file (and line)."""


def iter_zstd_chunks(path: str | Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Decompressed bytes of a (possibly multi-frame) .zst file; raises ShardError if it is truncated."""
    with open(path, "rb") as raw:
        decompressor = zstandard.ZstdDecompressor().decompressobj()
        frame_open = False
        while True:
            compressed = raw.read(chunk_bytes)
            if not compressed:
                break
            while compressed:
                try:
                    out = decompressor.decompress(compressed)
                except zstandard.ZstdError as exc:
                    raise ShardError(f"{path}: corrupt zstd data ({exc})") from exc
                frame_open = not decompressor.eof
                if out:
                    yield out
                # A finished frame leaves the next frame's bytes in unused_data: start a new one.
                compressed = decompressor.unused_data if decompressor.eof else b""
                if decompressor.eof:
                    decompressor = zstandard.ZstdDecompressor().decompressobj()
                    frame_open = bool(compressed)
        if frame_open:
            raise ShardError(f"{path}: truncated zstd stream (the last frame has no end)")


def iter_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Split a byte stream into lines without the trailing newline (a final unterminated line too)."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        lines = pending.split(b"\n")
        pending = lines.pop()
        yield from lines
    if pending:
        yield pending


def iter_shard_records(path: str | Path) -> Iterator[dict]:
    """The JSON objects of one shard, in order. Blank lines are skipped; anything else malformed raises."""
    for line_number, line in enumerate(iter_lines(iter_zstd_chunks(path)), start=1):
        if not line.strip():
            continue
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ShardError(f"{path}:{line_number}: malformed JSON ({exc})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ShardError(f"{path}:{line_number}: expected an object with a 'text' string, found {found}")
        yield record


def iter_shard_texts(paths: Iterable[str | Path]) -> Iterator[str]:
    """The `text` of every document in the given shards, shard by shard."""
    for path in paths:
        for record in iter_shard_records(path):
            yield record["text"]


def match_patterns(
    patterns: str | Path | Iterable[str | Path], folder_files: Callable[[Path], list[Path]]
) -> Iterator[tuple[str, list[Path]]]:
    """Each pattern with the files it names: a file, itself; a folder, `folder_files(folder)`; anything else
    is a glob (`**` recursive) whose sorted matches are taken the same way (a matched folder gives its
    `folder_files`).

    The one definition of input paths, for the sharder (which searches folders for data files) and for the
    readers of shards (a folder's `*.jsonl.zst`). Each caller orders the files, drops duplicates and says
    what is wrong with a pattern that names no file (an empty list here).
    """
    if isinstance(patterns, str | Path):
        patterns = [patterns]
    for pattern in map(str, patterns):
        path = Path(pattern)
        if path.is_file():
            yield pattern, [path]
            continue
        roots = [path] if path.is_dir() else sorted(map(Path, glob.glob(pattern, recursive=True)))
        # A match that is no file (a broken link) stays: reading it fails naming it, it is not skipped.
        yield pattern, [f for root in roots for f in (folder_files(root) if root.is_dir() else [root])]


def shards_in(folder: Path) -> list[Path]:
    """The shards directly in `folder` (`*.jsonl.zst`, hidden files skipped), sorted."""
    return sorted(p for p in folder.glob("*.jsonl.zst") if not p.name.startswith("."))


def expand_shard_paths(patterns: str | Path | Iterable[str | Path]) -> list[Path]:
    """Files matching glob patterns (or plain paths/folders of shards), sorted and de-duplicated.

    Raises FileNotFoundError naming the pattern when a pattern matches nothing, so a typo never
    silently trains on an empty corpus.
    """
    found: set[Path] = set()
    for pattern, files in match_patterns(patterns, shards_in):
        if not files:
            raise FileNotFoundError(f"no shard files match {pattern!r}")
        found.update(files)
    return sorted(found)
