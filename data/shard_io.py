"""Reading the pipeline's own shards: `part-<source>-<index>.jsonl.zst`, one JSON document per line.

Every later stage (tokenizer training, the pretraining stream) reads shards through this module, so
the checks live in one place: a truncated zstd stream is an error naming the file (python-zstandard's
streaming reader returns a short read instead of raising, so the frame end is checked here), and a
malformed line names the file and line number.
"""

from __future__ import annotations

import glob
from collections.abc import Iterable, Iterator
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


def expand_shard_paths(patterns: str | Iterable[str]) -> list[Path]:
    """Files matching glob patterns (or plain paths/folders of shards), sorted and de-duplicated.

    Raises FileNotFoundError naming the pattern when a pattern matches nothing, so a typo never
    silently trains on an empty corpus.
    """
    if isinstance(patterns, str | Path):
        patterns = [str(patterns)]
    found: set[Path] = set()
    for pattern in patterns:
        pattern = str(pattern)
        if Path(pattern).is_dir():
            matches = glob.glob(str(Path(pattern) / "*.jsonl.zst"))
        else:
            matches = glob.glob(pattern, recursive=True)
        if not matches:
            raise FileNotFoundError(f"no shard files match {pattern!r}")
        found.update(Path(m) for m in matches)
    return sorted(found)
