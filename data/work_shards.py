"""Phase 1 of the sharder (data/shard.py): one input file -> its work shards in DIR/.shard-state/work/.

`shard_one_input` reads one input after the shards an earlier, killed run finished, normalises and
filters each record, drops duplicates within the file and writes the documents kept into work shards.
`WorkShards` is the resumable part: a work shard `<input>-<shard>.jsonl.zst` comes with `.hashes` (the
16-byte content hash of each of its documents, for phase 2's cross-file dedup) and `.json` (its lines,
size and sha256, and what the records read for it counted), written last, so that a shard counts only
once complete; a resumed run reloads the finished ones and reads the input from where they end.
`ShardWriter` writes one zstd shard, here and in phase 2.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
import zstandard

from common.files import write_atomic
from data.readers import (
    FILE_FORMATS,
    NORMALISERS,
    InputError,
    MissingField,
    detect_format,
    fix_surrogates,
    iter_records,
    logical_stem,
)

if TYPE_CHECKING:
    from data.shard import ShardOptions

ZSTD_LEVEL = 3  # fixed, so that the same input always gives the same bytes
HASH_BYTES = 16
MAX_EXAMPLES = 5  # malformed lines / bad records reported in full per input
# Testing hook: seconds to sleep before each shard is renamed into place, so a test can kill -9 mid-run.
DELAY_ENV = "OPEN_LLAMA_SHARD_DELAY"
DROP_REASONS = ("empty", "too_short", "too_long", "duplicate", "malformed", "missing_text")
STAT_KEYS = ("records", "documents", "bytes_in", *DROP_REASONS, "invalid_utf8")
PROGRESS_INTERVAL_S = 0.5
SOURCE_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None if there is no such file."""
    try:
        return orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None


def testing_delay() -> None:
    if seconds := float(os.environ.get(DELAY_ENV, "0") or 0):
        time.sleep(seconds)


def empty_stats() -> dict[str, int]:
    return dict.fromkeys(STAT_KEYS, 0)


def read_hashes(path: Path) -> list[bytes]:
    raw = path.read_bytes()
    return [raw[i : i + HASH_BYTES] for i in range(0, len(raw), HASH_BYTES)]


def work_name(index: int, shard: int) -> str:
    return f"{index:05d}-{shard:05d}"


def derive_source(kind: str, path: str | Path) -> str:
    """'pile' and 'wudao' for those corpora, else the input's file name without suffixes."""
    if kind in ("pile", "wudao"):
        return kind
    return SOURCE_CHARS.sub("_", logical_stem(path)).strip("_.-") or "corpus"


# --- writing one shard ----------------------------------------------------------------------------


class _HashingFile:
    """A binary file wrapper that hashes and counts what zstd writes through it."""

    def __init__(self, fh) -> None:
        self.fh, self.sha256, self.size = fh, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


class ShardWriter:
    """Writes one zstd shard to a temporary file; `finish` renames it into place and returns its stats."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self._fh = open(self.tmp, "wb")  # noqa: SIM115 (closed by finish/abort; lives across calls)
        self._hashing = _HashingFile(self._fh)
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True)
        self._writer = compressor.stream_writer(self._hashing, closefd=False)
        self.lines = 0

    def write(self, line: bytes) -> None:
        """One JSON line, without its newline."""
        self._writer.write(line + b"\n")
        self.lines += 1

    def finish(self) -> dict:
        self._writer.flush(zstandard.FLUSH_FRAME)
        self._writer.close()
        self._fh.close()
        testing_delay()
        os.replace(self.tmp, self.path)
        return {"lines": self.lines, "bytes": self._hashing.size, "sha256": self._hashing.sha256.hexdigest()}

    def abort(self) -> None:
        self._fh.close()
        self.tmp.unlink(missing_ok=True)


# --- one input's work shards: the finished ones, reloaded after a kill, and the open one --------------


@dataclass
class InputTask:
    """One input file of a job: what a worker process is handed."""

    index: int
    path: Path
    options: ShardOptions
    state_dir: Path


class WorkShards:
    """One input's work shards and the counts of the records read for them.

    Counts (`stats`, `examples`) cover the finished shards; `pending` and `pending_examples` the records
    read since, which go into the next shard's metadata. `last_unit` is the input unit (line, item, row)
    of the last record read: a finished shard records it, and a resumed run reads on after it.
    """

    def __init__(self, task: InputTask) -> None:
        self.task, self.opts = task, task.options
        self.folder = task.state_dir / "work"
        self.count = 0  # finished shards
        self.source = self.opts.source
        self.last_unit = 0
        self.stats, self.examples = empty_stats(), []
        self.seen: set[bytes] = set()  # the hashes of the documents kept, for the within-file dedup
        self.writer: ShardWriter | None = None
        self.hashes: list[bytes] = []  # of the documents in the open shard
        self.pending, self.pending_examples = empty_stats(), []
        self._reload_finished()

    def _reload_finished(self) -> None:
        """Resume: finished work shards are kept; their counts, hashes and position are reloaded."""
        while True:
            name = work_name(self.task.index, self.count)
            meta = read_json(self.folder / f"{name}.json")
            if meta is None or not (meta["lines"] == 0 or (self.folder / f"{name}.jsonl.zst").exists()):
                return
            for key in STAT_KEYS:
                self.stats[key] += meta["stats"][key]
            self.examples += meta["examples"]
            self.last_unit, self.source = meta["records_end"], meta["source"]
            if self.opts.dedup:
                self.seen.update(read_hashes(self.folder / f"{name}.hashes"))
            self.count += 1

    @property
    def records_read(self) -> int:
        return self.stats["records"] + self.pending["records"]

    @property
    def bytes_read(self) -> int:
        return self.stats["bytes_in"] + self.pending["bytes_in"]

    def drop(self, reason: str, problem: str | None = None) -> None:
        """Count a record left out; a `problem` worth showing is kept as an example (fatal under --strict)."""
        self.pending[reason] += 1
        if problem is None:
            return
        if self.opts.strict:
            raise InputError(problem)
        if len(self.examples) + len(self.pending_examples) < MAX_EXAMPLES:
            self.pending_examples.append(problem)

    def write(self, line: bytes, digest: bytes | None) -> None:
        """One document's JSON line (and its hash, under dedup); a full shard is finished at once."""
        if self.writer is None:
            self.writer = ShardWriter(self.folder / f"{work_name(self.task.index, self.count)}.jsonl.zst")
        self.writer.write(line)
        self.pending["documents"] += 1
        if digest is not None:
            self.hashes.append(digest)
        if self.writer.lines == self.opts.lines_per_shard:
            self._finish_shard()

    def _finish_shard(self) -> None:
        name = work_name(self.task.index, self.count)
        if self.opts.dedup:
            write_atomic(self.folder / f"{name}.hashes", b"".join(self.hashes))
        meta = {
            **self.writer.finish(),
            "records_end": self.last_unit,
            "source": self.source,
            "stats": self.pending,
            "examples": self.pending_examples,
        }
        # The metadata is written last: its presence means the shard is complete.
        write_atomic(self.folder / f"{name}.json", orjson.dumps(meta))
        self._add_pending()
        self.writer, self.hashes, self.count = None, [], self.count + 1

    def _add_pending(self) -> None:
        for key in STAT_KEYS:
            self.stats[key] += self.pending[key]
        self.examples.extend(self.pending_examples)
        # Emptied in place: the record loop holds `pending` in a local (it runs once per document).
        self.pending.update(empty_stats())
        self.pending_examples.clear()

    def close(self) -> None:
        """Finish the open shard; the records read after it (all left out) are added to the counts."""
        if self.writer is not None:
            self._finish_shard()
        self._add_pending()

    def abort(self) -> None:
        """Drop the open shard (the finished ones stay)."""
        if self.writer is not None:
            self.writer.abort()


# --- reading one input ----------------------------------------------------------------------------


class _Progress:
    """Hands `progress(docs, nbytes)` what this run read since the last call, at most twice a second."""

    def __init__(self, progress: Callable[[int, int], None] | None, shards: WorkShards) -> None:
        self.progress, self.shards = progress, shards
        self.reported = (shards.records_read, shards.bytes_read)  # read by an earlier run: not reported
        self.last = time.monotonic()

    def tick(self) -> None:
        if self.progress is not None and time.monotonic() - self.last > PROGRESS_INTERVAL_S:
            self.report()

    def report(self) -> None:
        if self.progress is not None:
            docs, nbytes = self.shards.records_read, self.shards.bytes_read
            self.progress(docs - self.reported[0], nbytes - self.reported[1])
            self.reported, self.last = (docs, nbytes), time.monotonic()


def _where(path: Path, file_format: str | None, number: int) -> str:
    """'file:line' for line-based files, 'file: item N' / 'file: row N' for JSON arrays and parquet."""
    if file_format == "json":
        return f"{path}: item {number}"
    if file_format == "parquet":
        return f"{path}: row {number}"
    return f"{path}:{number}"


def _file_format(task: InputTask) -> str:
    if task.options.fmt == "text":
        return "text"
    return FILE_FORMATS.get(task.options.fmt) or detect_format(task.path)


def _filtered_out(text: str, opts: ShardOptions) -> str | None:
    """Why a document is left out by the filters ('empty', 'too_short', 'too_long'), or None."""
    if not text or text.isspace():
        return "empty"
    if len(text) < opts.min_chars:
        return "too_short"
    if opts.max_chars is not None and len(text) > opts.max_chars:
        return "too_long"
    return None


def _encode(text: str, meta: dict) -> tuple[bytes, bool]:
    try:
        return orjson.dumps({"text": text, "meta": meta}), False
    except TypeError:  # orjson refuses lone surrogates (possible from parquet/JSON escapes)
        text, fixed = fix_surrogates(text)
        meta = {k: fix_surrogates(v)[0] if isinstance(v, str) else v for k, v in meta.items()}
        return orjson.dumps({"text": text, "meta": meta}), fixed


def _shard_records(task: InputTask, file_format: str, shards: WorkShards, progress: _Progress) -> str | None:
    """Read the input after its finished shards; normalise, filter and dedup each record; write the
    documents kept. Returns the first record's missing-field message (None if none missed the field)."""
    opts, path = task.options, task.path
    normalise = NORMALISERS[opts.fmt]
    first_missing: str | None = None
    records = iter_records(
        path, file_format, skip=shards.last_unit, text_unit=opts.text_unit, tmp_dir=task.state_dir
    )
    pending, seen = shards.pending, shards.seen
    for record in records:
        shards.last_unit = record.line
        pending["records"] += 1
        pending["bytes_in"] += record.nbytes
        progress.tick()
        if record.error is not None:
            shards.drop("malformed", record.error)
            continue
        try:
            text, meta, kind = normalise(record.value, opts.text_field)
        except MissingField as exc:
            first_missing = first_missing or str(exc)
            shards.drop("missing_text", f"{_where(path, file_format, record.line)}: {exc}")
            continue
        pending["invalid_utf8"] += record.invalid_utf8
        if reason := _filtered_out(text, opts):
            shards.drop(reason)
            continue
        digest = None
        if opts.dedup:
            digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:HASH_BYTES]
            if digest in seen:
                shards.drop("duplicate")
                continue
            seen.add(digest)
        if shards.source is None:
            shards.source = derive_source(kind, path)
        meta["source"] = shards.source
        line, fixed = _encode(text, meta)
        pending["invalid_utf8"] += fixed and not record.invalid_utf8
        shards.write(line, digest)
    return first_missing


def _missing_field_error(path: Path, stats: dict[str, int], first_missing: str | None) -> str | None:
    """The error for an input none of whose records has the text field: a wrong --text-field or
    --format, not a few bad records. (Such an input finishes no shard, so a resumed run reads it from the
    start and sees its first missing field.)"""
    usable = stats["records"] - stats["malformed"]
    if not usable or stats["missing_text"] != usable:
        return None
    return (
        f"{path}: none of its {usable:,} records has the text field (first: {first_missing}); "
        "name the field with --text-field or the corpus with --format"
    )


def shard_one_input(task: InputTask, progress: Callable[[int, int], None] | None = None) -> dict:
    """Phase 1 for one input file; returns its state (also saved as inputs/<index>.json).

    `progress(docs, nbytes)` is called now and then with the records and input bytes read since its last
    call. An input error (a truncated or corrupt file) marks the input failed and keeps the documents
    read before it; under --strict it, or any bad record, raises InputError instead.
    """
    done_path = task.state_dir / "inputs" / f"{task.index:05d}.json"
    if (done := read_json(done_path)) is not None:
        return done
    shards = WorkShards(task)
    progress_deltas = _Progress(progress, shards)
    state = {"index": task.index, "path": str(task.path), "format": None, "status": "ok", "error": None}
    first_missing = None
    try:
        state["format"] = _file_format(task)
        first_missing = _shard_records(task, state["format"], shards, progress_deltas)
    except InputError as exc:
        if task.options.strict:
            shards.abort()
            raise
        # The documents read before the error are complete records (never a partial last one):
        # they are kept, and the input is reported as failed.
        state["status"] = "error"
        state["error"] = f"{exc} (the {shards.records_read:,} records before it were read and kept)"
    shards.close()
    progress_deltas.report()
    if state["status"] == "ok" and (error := _missing_field_error(task.path, shards.stats, first_missing)):
        state["status"], state["error"] = "error", error
    state.update(source=shards.source or derive_source("generic", task.path), shards=shards.count)
    state.update(stats=shards.stats, examples=shards.examples[:MAX_EXAMPLES])
    write_atomic(done_path, orjson.dumps(state))
    return state
