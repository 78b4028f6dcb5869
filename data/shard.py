"""The sharder: raw corpora (The Pile, WuDao, any jsonl/json/parquet/text) -> jsonl.zst shards.

    python data/shard.py INPUT... --output-dir DIR [--format auto|pile|wudao|jsonl|json|parquet|text]
        [--source NAME] [--lines-per-shard 16384] [--workers N] [--strict] [--no-dedup]
        [--min-chars N] [--max-chars N] [--text-field NAME] [--text-unit line|paragraph|file]

Each output line is `{"text": ..., "meta": {"source": ..., ...}}`; shards are
`part-<source>-<input:05d>-<shard:05d>.jsonl.zst` (at most --lines-per-shard lines, zstd level 3 with
checksums), listed with their line counts, sizes and sha256 in `manifest.json`.

How it stays deterministic, resumable and parallel:

1. Each input file (in the order given, folders and globs sorted) is one task, run in parallel over
   --workers processes. A task reads, normalises and filters its documents, drops duplicates within
   the file, and writes work shards (plus the 16-byte content hash of every document) into
   DIR/.shard-state/. A shard and its metadata appear there only when complete (temp file, then
   rename); after a kill, a task skips the input units its finished shards cover and carries on.
2. In the main process, inputs and shards in order: documents whose hash an earlier input already had
   are removed (the first occurrence in input order wins, whatever --workers is), then each shard is
   moved to its final name. A shard appears under its final name only complete and final.
3. manifest.json is written (temp, then rename) and the state folder removed. A rerun of a finished
   job with the same inputs and options does nothing.

Deduplication keeps a set of 16-byte hashes in memory, about 130 bytes per unique document (~1.3 GB
per 10 million documents, measured); `--no-dedup` makes memory independent of the corpus size.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import multiprocessing
import os
import queue
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python data/shard.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
import zstandard

from common.files import write_atomic
from data.readers import (
    DATA_SUFFIXES,
    FILE_FORMATS,
    FORMATS,
    NORMALISERS,
    TEXT_UNITS,
    InputError,
    MissingField,
    detect_format,
    fix_surrogates,
    iter_records,
    logical_stem,
    logical_suffix,
)
from data.shard_io import iter_lines, iter_zstd_chunks

LINES_PER_SHARD = 16384  # Open-Llama's shard size
ZSTD_LEVEL = 3  # fixed, so that the same input always gives the same bytes
HASH_BYTES = 16
STATE_DIR = ".shard-state"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
MAX_EXAMPLES = 5  # malformed lines / bad records reported in full per input
# Testing hook: seconds to sleep before each shard is renamed into place, so a test can kill -9 mid-run.
DELAY_ENV = "OPEN_LLAMA_SHARD_DELAY"
DROP_REASONS = ("empty", "too_short", "too_long", "duplicate", "malformed", "missing_text")
STAT_KEYS = ("records", "documents", "bytes_in", *DROP_REASONS, "invalid_utf8")
_SOURCE_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


class ShardingError(Exception):
    """A fatal problem with the job (bad options, unusable output folder, --strict input error)."""


@dataclass(frozen=True)
class ShardOptions:
    """What determines the output (not --workers, which only changes the speed)."""

    fmt: str = "auto"
    source: str | None = None
    lines_per_shard: int = LINES_PER_SHARD
    dedup: bool = True
    min_chars: int = 0
    max_chars: int | None = None
    text_field: str = "text"
    text_unit: str = "line"
    strict: bool = False

    def validate(self) -> None:
        if self.fmt not in FORMATS:
            raise ShardingError(f"unknown --format {self.fmt!r}; expected one of {', '.join(FORMATS)}")
        if self.text_unit not in TEXT_UNITS:
            raise ShardingError(f"unknown --text-unit {self.text_unit!r}; expected {', '.join(TEXT_UNITS)}")
        if self.lines_per_shard < 1:
            raise ShardingError("--lines-per-shard must be at least 1")
        if self.max_chars is not None and self.max_chars < max(1, self.min_chars):
            raise ShardingError("--max-chars must be at least 1 and at least --min-chars")
        if self.source is not None and (not self.source or _SOURCE_CHARS.search(self.source)):
            raise ShardingError(f"--source {self.source!r}: use letters, digits, '_', '.' and '-' only")


@dataclass
class ShardSummary:
    """What a sharding job did; `manifest` is the content of manifest.json."""

    output_dir: Path
    manifest: dict
    seconds: float = 0.0
    nothing_to_do: bool = False
    bytes_read: int = 0
    """Input bytes read by this run (a resumed run skips the inputs finished before it): the MB/s basis."""

    @property
    def totals(self) -> dict:
        return self.manifest["totals"]

    @property
    def shards(self) -> list[Path]:
        return [self.output_dir / s["name"] for s in self.manifest["shards"]]

    @property
    def failed_inputs(self) -> list[dict]:
        return [i for i in self.manifest["inputs"] if i["status"] != "ok"]

    def format(self) -> str:
        """A human-readable closing summary."""
        t = self.totals
        dropped = ", ".join(f"{r} {t[r]:,}" for r in DROP_REASONS if t[r]) or "none"
        rate = self.bytes_read / 1e6 / self.seconds if self.seconds > 0 else 0.0
        if self.nothing_to_do:
            speed = ""
        elif self.bytes_read < t["bytes_in"]:  # resumed: part of the input was sharded by an earlier run
            speed = f" ({self.bytes_read / 1e6:,.1f} MB of it read by this run, {rate:,.1f} MB/s)"
        else:
            speed = f" ({rate:,.1f} MB/s)"
        head = "nothing to do: already complete" if self.nothing_to_do else f"done in {self.seconds:.1f} s"
        lines = [
            f"{head}: {len(self.manifest['inputs'])} input(s) -> {len(self.shards)} shard(s) in {self.output_dir}",
            f"documents: {t['records']:,} in, {t['documents']:,} out; dropped: {dropped}",
            f"bytes: {t['bytes_in'] / 1e6:,.1f} MB in{speed}, {t['bytes_out'] / 1e6:,.1f} MB of shards out",
        ]
        if t["invalid_utf8"]:
            lines.append(f"invalid UTF-8: {t['invalid_utf8']:,} document(s) repaired with U+FFFD")
        examples = [e for i in self.manifest["inputs"] for e in i["examples"]][:MAX_EXAMPLES]
        if examples:
            lines.append("first problems:")
            lines += [f"  {e}" for e in examples]
        for failed in self.failed_inputs:
            lines.append(f"input error: {failed['error']}")
        return "\n".join(lines)


# --- helpers --------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict | None:
    try:
        return orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None


def _delay() -> None:
    if seconds := float(os.environ.get(DELAY_ENV, "0") or 0):
        time.sleep(seconds)


def _empty_stats() -> dict[str, int]:
    return dict.fromkeys(STAT_KEYS, 0)


def derive_source(kind: str, path: str | Path) -> str:
    """'pile' and 'wudao' for those corpora, else the input's file name without suffixes."""
    if kind in ("pile", "wudao"):
        return kind
    return _SOURCE_CHARS.sub("_", logical_stem(path)).strip("_.-") or "corpus"


def expand_inputs(patterns: Iterable[str | Path]) -> list[Path]:
    """Input files from paths, folders (searched recursively for data files) and globs.

    Order: as given, each folder or glob sorted; duplicates dropped. Raises ShardingError for a
    pattern that matches nothing.
    """
    found: list[Path] = []
    for pattern in patterns:
        pattern = str(pattern)
        if Path(pattern).is_file():
            matches = [Path(pattern)]
        else:
            roots = (
                [Path(pattern)]
                if Path(pattern).is_dir()
                else sorted(map(Path, glob.glob(pattern, recursive=True)))
            )
            matches = []
            for root in roots:
                if root.is_dir():
                    matches += sorted(
                        p
                        for p in root.rglob("*")
                        if p.is_file()
                        and not any(part.startswith(".") for part in p.relative_to(root).parts)
                        and logical_suffix(p) in DATA_SUFFIXES
                    )
                elif root.is_file():
                    matches.append(root)
        if not matches and Path(pattern).is_dir():
            raise ShardingError(
                f"no data files in folder {pattern!r} (looked for {', '.join(sorted(DATA_SUFFIXES))}, "
                "each optionally .zst/.gz/.bz2/.xz; name files explicitly to read other names)"
            )
        if not matches:
            raise ShardingError(f"no input files match {pattern!r}")
        found += matches
    unique: dict[Path, None] = {}
    for path in found:
        unique.setdefault(path.resolve(), None)
    return list(unique)


# --- one input: parse, normalise, filter, dedup within the file, write work shards ---------------


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
        _delay()
        os.replace(self.tmp, self.path)
        return {"lines": self.lines, "bytes": self._hashing.size, "sha256": self._hashing.sha256.hexdigest()}

    def abort(self) -> None:
        self._fh.close()
        self.tmp.unlink(missing_ok=True)


@dataclass
class _Task:
    index: int
    path: Path
    options: ShardOptions
    state_dir: Path


def _work_name(index: int, shard: int) -> str:
    return f"{index:05d}-{shard:05d}"


def _where(path: Path, file_format: str | None, number: int) -> str:
    """'file:line' for line-based files, 'file: item N' / 'file: row N' for JSON arrays and parquet."""
    if file_format == "json":
        return f"{path}: item {number}"
    if file_format == "parquet":
        return f"{path}: row {number}"
    return f"{path}:{number}"


def _encode(text: str, meta: dict) -> tuple[bytes, bool]:
    try:
        return orjson.dumps({"text": text, "meta": meta}), False
    except TypeError:  # orjson refuses lone surrogates (possible from parquet/JSON escapes)
        text, fixed = fix_surrogates(text)
        meta = {k: fix_surrogates(v)[0] if isinstance(v, str) else v for k, v in meta.items()}
        return orjson.dumps({"text": text, "meta": meta}), fixed


def shard_one_input(task: _Task, progress: Callable[[int, int], None] | None = None) -> dict:
    """Phase 1 for one input file; returns its state (also saved as inputs/<index>.json)."""
    opts, work = task.options, task.state_dir / "work"
    done_path = task.state_dir / "inputs" / f"{task.index:05d}.json"
    if (done := _read_json(done_path)) is not None:
        return done

    # Resume: finished work shards are kept; their stats, hashes and position are reloaded.
    stats, examples, seen = _empty_stats(), [], set()
    shard_index, skip, source = 0, 0, opts.source
    while True:
        name = _work_name(task.index, shard_index)
        meta = _read_json(work / f"{name}.json")
        if meta is None or not (meta["lines"] == 0 or (work / f"{name}.jsonl.zst").exists()):
            break
        for key in STAT_KEYS:
            stats[key] += meta["stats"][key]
        examples += meta["examples"]
        skip, source = meta["records_end"], meta["source"]
        if opts.dedup:
            raw = (work / f"{name}.hashes").read_bytes()
            seen.update(raw[i : i + HASH_BYTES] for i in range(0, len(raw), HASH_BYTES))
        shard_index += 1

    state = {"index": task.index, "path": str(task.path), "format": None, "status": "ok", "error": None}
    delta, delta_examples = _empty_stats(), []
    writer: ShardWriter | None = None
    hashes: list[bytes] = []
    normalise = NORMALISERS[opts.fmt]
    last_unit = skip
    reported = [stats["records"], stats["bytes_in"]]
    last_report = time.monotonic()
    first_missing: str | None = None

    def report() -> None:
        if progress is not None:
            docs, nbytes = stats["records"] + delta["records"], stats["bytes_in"] + delta["bytes_in"]
            progress(docs - reported[0], nbytes - reported[1])
            reported[:] = [docs, nbytes]

    def note(message: str) -> None:
        if opts.strict:
            raise InputError(message)
        if len(examples) + len(delta_examples) < MAX_EXAMPLES:
            delta_examples.append(message)

    def finish_shard() -> None:
        nonlocal writer, shard_index, delta, delta_examples, hashes
        name = _work_name(task.index, shard_index)
        if opts.dedup:
            write_atomic(work / f"{name}.hashes", b"".join(hashes))
        info = writer.finish()
        meta = {
            **info,
            "records_end": last_unit,
            "source": source,
            "stats": delta,
            "examples": delta_examples,
        }
        # The metadata is written last: its presence means the shard is complete.
        write_atomic(work / f"{name}.json", orjson.dumps(meta))
        for key in STAT_KEYS:
            stats[key] += delta[key]
        examples.extend(delta_examples)
        writer, shard_index, delta, delta_examples, hashes = None, shard_index + 1, _empty_stats(), [], []

    try:
        if opts.fmt == "text":
            file_format = "text"
        else:
            file_format = FILE_FORMATS.get(opts.fmt) or detect_format(task.path)
        state["format"] = file_format
        records = iter_records(
            task.path, file_format, skip=skip, text_unit=opts.text_unit, tmp_dir=task.state_dir
        )
        for record in records:
            last_unit = record.line
            delta["bytes_in"] += record.nbytes
            if progress is not None and time.monotonic() - last_report > 0.5:
                report()
                last_report = time.monotonic()
            delta["records"] += 1
            if record.error is not None:
                delta["malformed"] += 1
                note(record.error)
                continue
            try:
                text, meta, kind = normalise(record.value, opts.text_field)
            except MissingField as exc:
                delta["missing_text"] += 1
                first_missing = first_missing or str(exc)
                note(f"{_where(task.path, file_format, record.line)}: {exc}")
                continue
            delta["invalid_utf8"] += record.invalid_utf8
            if not text or text.isspace():
                delta["empty"] += 1
                continue
            if len(text) < opts.min_chars:
                delta["too_short"] += 1
                continue
            if opts.max_chars is not None and len(text) > opts.max_chars:
                delta["too_long"] += 1
                continue
            if opts.dedup:
                digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:HASH_BYTES]
                if digest in seen:
                    delta["duplicate"] += 1
                    continue
                seen.add(digest)
                hashes.append(digest)
            if source is None:
                source = derive_source(kind, task.path)
            meta["source"] = source
            line, fixed = _encode(text, meta)
            delta["invalid_utf8"] += fixed and not record.invalid_utf8
            if writer is None:
                writer = ShardWriter(work / f"{_work_name(task.index, shard_index)}.jsonl.zst")
            writer.write(line)
            delta["documents"] += 1
            if writer.lines == opts.lines_per_shard:
                finish_shard()
    except InputError as exc:
        if opts.strict:
            if writer is not None:
                writer.abort()
            raise
        # The documents read before the error are complete records (never a partial last one):
        # they are kept, and the input is reported as failed.
        read = stats["records"] + delta["records"]
        state["status"], state["error"] = (
            "error",
            f"{exc} (the {read:,} records before it were read and kept)",
        )
    if writer is not None:
        finish_shard()
    for key in STAT_KEYS:
        stats[key] += delta[key]
    examples.extend(delta_examples)
    report()
    usable = stats["records"] - stats["malformed"]
    if state["status"] == "ok" and usable and stats["missing_text"] == usable:
        # Every record lacks the field: a wrong --text-field or --format, not a few bad records. (Such an
        # input finishes no shard, so a resumed run reads it from the start and sets first_missing.)
        state["status"] = "error"
        state["error"] = (
            f"{task.path}: none of its {usable:,} records has the text field (first: {first_missing}); "
            "name the field with --text-field or the corpus with --format"
        )
    state.update(source=source or derive_source("generic", task.path), shards=shard_index, stats=stats)
    state["examples"] = examples[:MAX_EXAMPLES]
    write_atomic(done_path, orjson.dumps(state))
    return state


# --- phase 2: cross-file duplicates in input order, final names ----------------------------------


def _final_name(source: str, index: int, shard: int) -> str:
    return f"part-{source}-{index:05d}-{shard:05d}.jsonl.zst"


def _rewrite_without(src: Path, dest: Path, drop: set[int]) -> dict:
    """Copy shard `src` to `dest` leaving out the lines whose 0-based numbers are in `drop`."""
    writer = ShardWriter(dest)
    try:
        for number, line in enumerate(iter_lines(iter_zstd_chunks(src))):
            if number not in drop:
                writer.write(line)
    except BaseException:
        writer.abort()
        raise
    if writer.lines == 0:
        writer.abort()
        return {"lines": 0, "bytes": 0, "sha256": None}
    return writer.finish()


def finalise_shards(inputs: list[dict], output_dir: Path, state_dir: Path, dedup: bool) -> list[dict]:
    """Phase 2, in input order: drop cross-file duplicates and move shards to their final names.

    Each step is idempotent (a final shard's metadata is written before its rename), so a kill
    anywhere here is resumed by running it again.
    """
    work, final_state = state_dir / "work", state_dir / "final"
    seen: set[bytes] = set()
    shards: list[dict] = []
    for state in inputs:
        cross_duplicates = 0
        for shard in range(state["shards"]):
            work_name = _work_name(state["index"], shard)
            name = _final_name(state["source"], state["index"], shard)
            hashes: list[bytes] = []
            if dedup:
                raw = (work / f"{work_name}.hashes").read_bytes()
                hashes = [raw[i : i + HASH_BYTES] for i in range(0, len(raw), HASH_BYTES)]
            info = _read_json(final_state / f"{name}.json")
            if info is None or (info["lines"] and not (output_dir / name).exists()):
                drop = {n for n, h in enumerate(hashes) if h in seen}
                if drop:
                    info = _rewrite_without(
                        work / f"{work_name}.jsonl.zst", output_dir / f".{name}.building", drop
                    )
                    info["dropped"] = len(drop)
                    write_atomic(final_state / f"{name}.json", orjson.dumps(info))
                    if info["lines"]:
                        _delay()
                        os.replace(output_dir / f".{name}.building", output_dir / name)
                else:
                    work_info = _read_json(work / f"{work_name}.json")
                    info = {k: work_info[k] for k in ("lines", "bytes", "sha256")} | {"dropped": 0}
                    write_atomic(final_state / f"{name}.json", orjson.dumps(info))
                    _delay()
                    os.replace(work / f"{work_name}.jsonl.zst", output_dir / name)
            seen.update(hashes)
            cross_duplicates += info["dropped"]
            if info["lines"]:
                shards.append({"name": name, "source": state["source"], "input": state["index"]} | info)
                shards[-1].pop("dropped")
        state["stats"]["duplicate"] += cross_duplicates
        state["stats"]["documents"] -= cross_duplicates
    return shards


# --- the job --------------------------------------------------------------------------------------

_progress_queue = None


def _init_worker(progress_queue) -> None:
    global _progress_queue
    _progress_queue = progress_queue


def _run_task(task: _Task) -> dict:
    return shard_one_input(task, lambda docs, nbytes: _progress_queue.put((docs, nbytes)))


def _config(paths: list[Path], options: ShardOptions) -> dict:
    return {
        "version": MANIFEST_VERSION,
        "options": asdict(options),
        "inputs": [[str(p), p.stat().st_size] for p in paths],
    }


def _config_difference(old: dict, new: dict) -> str:
    changed = [k for k in new["options"] if old.get("options", {}).get(k) != new["options"][k]]
    if old.get("inputs") != new["inputs"]:
        changed.append("input files")
    return ", ".join(changed) or "format version"


def _run_phase_one(tasks: list[_Task], workers: int, progress: bool) -> tuple[list[dict], int]:
    """Run every input's task (in-process, or over a pool); returns their states in input order and the
    input bytes read by this run."""
    from tqdm import tqdm

    workers = min(workers, len(tasks))
    pool = progress_queue = None
    if workers > 1:
        # fork starts workers in milliseconds; it happens before the progress bar starts its
        # monitor thread, so no thread is ever forked. Elsewhere spawn is the safe choice.
        context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        progress_queue = context.Queue()
        pool = context.Pool(workers, _init_worker, (progress_queue,))
    bar = tqdm(
        desc="sharding",
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        file=sys.stderr,
        disable=not progress,
        mininterval=0.5,
        dynamic_ncols=True,
    )
    documents = bytes_read = 0

    def advance(docs: int, nbytes: int) -> None:
        nonlocal documents, bytes_read
        documents += docs
        bytes_read += nbytes
        bar.update(nbytes)
        bar.set_postfix_str(f"{documents:,} docs", refresh=False)

    try:
        if pool is None:
            return [shard_one_input(task, advance) for task in tasks], bytes_read
        with pool:  # __exit__ terminates the workers, also on an error (--strict) or Ctrl-C
            # Largest inputs first balances the workers; results are still collected in input order.
            by_size = sorted(tasks, key=lambda t: -t.path.stat().st_size)
            pending = {task.index: pool.apply_async(_run_task, (task,)) for task in by_size}
            while not all(result.ready() for result in pending.values()):
                with contextlib.suppress(queue.Empty):
                    advance(*progress_queue.get(timeout=0.05))
                for result in pending.values():  # fail fast (--strict) instead of waiting for all
                    if result.ready() and not result.successful():
                        result.get()
            while not progress_queue.empty():
                advance(*progress_queue.get())
            return [pending[task.index].get() for task in tasks], bytes_read
    finally:
        bar.close()


def shard_inputs(
    inputs: str | Path | Iterable[str | Path],
    output_dir: str | Path,
    *,
    fmt: str = "auto",
    source: str | None = None,
    lines_per_shard: int = LINES_PER_SHARD,
    workers: int = 1,
    dedup: bool = True,
    min_chars: int = 0,
    max_chars: int | None = None,
    text_field: str = "text",
    text_unit: str = "line",
    strict: bool = False,
    progress: bool = False,
) -> ShardSummary:
    """Shard `inputs` (files, folders, globs) into `output_dir`; resumes an interrupted job.

    Raises ShardingError on fatal problems (nothing matched, output folder made with other options,
    an input error under `strict`). Problems in single records and failed inputs are counted and
    reported in the summary/manifest instead.
    """
    started = time.perf_counter()
    options = ShardOptions(
        fmt, source, lines_per_shard, dedup, min_chars, max_chars, text_field, text_unit, strict
    )
    options.validate()
    if workers < 1:
        raise ShardingError("--workers must be at least 1")
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ShardingError(f"--output-dir {output_dir} is a file, not a folder")
    paths = expand_inputs([inputs] if isinstance(inputs, str | Path) else inputs)
    # An input folder may contain the output folder (e.g. a rerun): never read our own shards back.
    paths = [p for p in paths if not p.is_relative_to(output_dir.resolve())]
    if not paths:
        raise ShardingError(f"no input files outside the output folder {output_dir}")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ShardingError(f"cannot create --output-dir {output_dir}: {exc.strerror or exc}") from exc
    state_dir = output_dir / STATE_DIR
    config = _config(paths, options)

    manifest_path = output_dir / MANIFEST
    if (manifest := _read_json(manifest_path)) is not None:
        if manifest.get("config") != config:
            raise ShardingError(
                f"{output_dir} already holds shards made with other {_config_difference(manifest.get('config', {}), config)}; "
                "use another --output-dir or delete it"
            )
        shutil.rmtree(state_dir, ignore_errors=True)  # left over if a kill came right after the manifest
        return ShardSummary(output_dir, manifest, time.perf_counter() - started, nothing_to_do=True)
    if (old := _read_json(state_dir / "config.json")) is not None:
        if old != config:
            raise ShardingError(
                f"{output_dir} holds an unfinished job with other {_config_difference(old, config)}; "
                f"rerun it with the same inputs and options, or delete {state_dir}"
            )
    else:
        if any(output_dir.glob("part-*.jsonl.zst")):
            raise ShardingError(
                f"{output_dir} already holds shards but no {MANIFEST}; use an empty --output-dir"
            )
        for sub in ("work", "inputs", "final"):
            (state_dir / sub).mkdir(parents=True, exist_ok=True)
        write_atomic(state_dir / "config.json", orjson.dumps(config))

    tasks = [_Task(i, path, options, state_dir) for i, path in enumerate(paths)]
    try:
        states, bytes_read = _run_phase_one(tasks, workers, progress)
    except InputError as exc:  # only raised under --strict
        raise ShardingError(f"{exc} (--strict)") from exc
    shards = finalise_shards(states, output_dir, state_dir, dedup)

    totals = _empty_stats() | {"bytes_out": sum(s["bytes"] for s in shards)}
    input_entries = []
    for state in states:
        for key in STAT_KEYS:
            totals[key] += state["stats"][key]
        names = [s["name"] for s in shards if s["input"] == state["index"]]
        input_entries.append(
            {k: state[k] for k in ("path", "format", "source", "status", "error")}
            | state["stats"]
            | {"shards": names, "examples": state["examples"]}
        )
    totals |= {
        "shards": len(shards),
        "inputs": len(states),
        "failed_inputs": sum(s["status"] != "ok" for s in states),
    }
    manifest = {
        "version": MANIFEST_VERSION,
        "config": config,
        "totals": totals,
        "inputs": input_entries,
        "shards": shards,
    }
    write_atomic(manifest_path, orjson.dumps(manifest, option=orjson.OPT_INDENT_2) + b"\n")
    shutil.rmtree(state_dir, ignore_errors=True)
    return ShardSummary(output_dir, manifest, time.perf_counter() - started, bytes_read=bytes_read)


# --- command line ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python data/shard.py",
        description="Normalise raw corpora (The Pile, WuDao, any jsonl/JSON-array/parquet/text file, plain or "
        "zstd/gzip/bz2/xz) into part-<source>-<input>-<shard>.jsonl.zst shards of "
        '{"text": ..., "meta": {"source": ...}} lines, with a manifest.json. Interrupted jobs resume '
        "when rerun with the same arguments; a finished job is not redone.",
        epilog="Exit status: 0 done; 1 fatal error (one-line message); 3 done, but some input files "
        "were unreadable, truncated or corrupt (named in the summary and the manifest).",
    )
    parser.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="input files, folders (searched recursively) or globs"
    )
    parser.add_argument("--output-dir", required=True, type=Path, help="where shards and manifest.json go")
    parser.add_argument(
        "--format",
        default="auto",
        choices=FORMATS,
        help="auto (default): from each file's suffix/content; pile: jsonl with text+meta; wudao: JSON "
        "arrays of title/content/dataType; jsonl, json (one array), parquet: records with a text field; "
        "text: plain text (see --text-unit)",
    )
    parser.add_argument(
        "--source",
        help="meta.source and the name in the shard names (default: 'pile'/'wudao' for those corpora, "
        "else each input's file name without suffixes)",
    )
    parser.add_argument("--lines-per-shard", type=int, default=LINES_PER_SHARD, help="default %(default)s")
    parser.add_argument(
        "--workers", type=int, default=1, help="parallel processes, one input file each (default 1)"
    )
    parser.add_argument(
        "--strict", action="store_true", help="stop at the first malformed record or bad file"
    )
    parser.add_argument(
        "--no-dedup",
        dest="dedup",
        action="store_false",
        help="keep exact duplicate documents (deduplication holds ~130 bytes of memory per unique document)",
    )
    parser.add_argument(
        "--min-chars", type=int, default=0, help="drop documents shorter than this (characters)"
    )
    parser.add_argument(
        "--max-chars", type=int, default=None, help="drop documents longer than this (characters)"
    )
    parser.add_argument(
        "--text-field", default="text", help="field holding the text in jsonl/json/parquet records"
    )
    parser.add_argument(
        "--text-unit",
        default="line",
        choices=TEXT_UNITS,
        help="plain text: a document per line (default), per blank-line-separated paragraph, or per file",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = vars(args)
    options["fmt"] = options.pop("format")
    try:
        summary = shard_inputs(options.pop("inputs"), options.pop("output_dir"), **options)
    except (ShardingError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary.format(), file=sys.stderr)
    return 3 if summary.failed_inputs else 0


if __name__ == "__main__":
    sys.exit(main())
