"""The sharder: raw corpora (The Pile, WuDao, any jsonl/json/parquet/text) -> jsonl.zst shards.

    python data/shard.py INPUT... --output_dir DIR [--format auto|pile|wudao|jsonl|json|parquet|text]
        [--source NAME] [--lines_per_shard 16384] [--workers N] [--strict] [--no-dedup]
        [--min_chars N] [--max_chars N] [--text_field NAME] [--text_unit line|paragraph|file]

(`--help` lists every option; `--output-dir` and the other dash spellings are aliases of the `_` keys.)

Each output line is `{"text": ..., "meta": {"source": ..., ...}}`; shards are
`part-<source>-<input:05d>-<shard:05d>.jsonl.zst` (at most --lines-per-shard lines, zstd level 3 with
checksums), listed with their line counts, sizes and sha256 in `manifest.json`.

How it stays deterministic, resumable and parallel:

1. Each input file (in the order given, folders and globs sorted) is one task, run in parallel over
   --workers processes. A task reads, normalises and filters its documents, drops duplicates within
   the file, and writes work shards (plus the 16-byte content hash of every document) into
   DIR/.shard-state/. A shard and its metadata appear there only when complete (temp file, then
   rename); after a kill, a task skips the input units its finished shards cover and carries on.
   (data/work_shards.py; the workers exit with the main process, even when it is killed with -9.)
2. In the main process, inputs and shards in order: documents whose hash an earlier input already had
   are removed (the first occurrence in input order wins, whatever --workers is), then each shard is
   moved to its final name. A shard appears under its final name only complete and final.
3. manifest.json is written (temp, then rename) and the state folder removed. A rerun of a finished
   job with the same inputs and options does nothing.

Deduplication keeps a set of 16-byte hashes in memory, about 130 bytes per unique document (~1.3 GB
per 10 million documents, measured); `--no-dedup` makes memory independent of the corpus size.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import orjson

from common.config import ConfigError, parse_config
from common.files import write_atomic
from common.processes import exit_with_parent
from data.readers import DATA_SUFFIXES, FORMATS, TEXT_UNITS, InputError, logical_suffix
from data.shard_io import iter_lines, iter_zstd_chunks, match_patterns
from data.work_shards import (
    DROP_REASONS,
    MAX_EXAMPLES,
    SOURCE_CHARS,
    STAT_KEYS,
    InputTask,
    ShardWriter,
    empty_stats,
    read_hashes,
    read_json,
    shard_one_input,
    testing_delay,
    work_name,
)

LINES_PER_SHARD = 16384  # Open-Llama's shard size
STATE_DIR = ".shard-state"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


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
        if self.source is not None and (not self.source or SOURCE_CHARS.search(self.source)):
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


# --- inputs -------------------------------------------------------------------------------------


def _data_files_in(folder: Path) -> list[Path]:
    """A folder's data files, searched recursively (hidden files and folders, broken links skipped), sorted."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and logical_suffix(p) in DATA_SUFFIXES
    )


def expand_inputs(patterns: str | Path | Iterable[str | Path]) -> list[Path]:
    """Input files from paths, folders (searched recursively for data files) and globs.

    Order: as given, each folder or glob sorted; duplicates dropped; paths resolved. Raises ShardingError
    for a pattern that matches nothing.
    """
    unique: dict[Path, None] = {}
    for pattern, matches in match_patterns(patterns, _data_files_in):
        files = [path for path in matches if path.is_file()]  # a glob's broken links are skipped too
        if not files and Path(pattern).is_dir():
            raise ShardingError(
                f"no data files in folder {pattern!r} (looked for {', '.join(sorted(DATA_SUFFIXES))}, "
                "each optionally .zst/.gz/.bz2/.xz; name files explicitly to read other names)"
            )
        if not files:
            raise ShardingError(f"no input files match {pattern!r}")
        unique.update(dict.fromkeys(path.resolve() for path in files))
    return list(unique)


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


def _finalise_shard(work_stem: Path, dest: Path, info_path: Path, drop: set[int]) -> dict:
    """Move the work shard `<work_stem>.jsonl.zst` to its final name `dest`, rewritten without the lines in
    `drop`; returns its lines, bytes, sha256 and the lines dropped, saved in `info_path` before the rename."""
    if drop:
        # Built in the state folder (same file system: the rename stays atomic), so that a kill mid-rewrite
        # leaves no temporary file in the output folder; the state folder is removed at the end.
        building = info_path.with_name(f"{dest.name}.building")
        info = _rewrite_without(Path(f"{work_stem}.jsonl.zst"), building, drop) | {"dropped": len(drop)}
        write_atomic(info_path, orjson.dumps(info))
        if info["lines"]:
            testing_delay()
            os.replace(building, dest)
        return info
    work_info = read_json(Path(f"{work_stem}.json"))
    info = {k: work_info[k] for k in ("lines", "bytes", "sha256")} | {"dropped": 0}
    write_atomic(info_path, orjson.dumps(info))
    testing_delay()
    os.replace(f"{work_stem}.jsonl.zst", dest)
    return info


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
            work_stem = work / work_name(state["index"], shard)
            name = _final_name(state["source"], state["index"], shard)
            hashes = read_hashes(Path(f"{work_stem}.hashes")) if dedup else []
            info = read_json(final_state / f"{name}.json")
            if info is None or (info["lines"] and not (output_dir / name).exists()):
                drop = {n for n, h in enumerate(hashes) if h in seen}
                info = _finalise_shard(work_stem, output_dir / name, final_state / f"{name}.json", drop)
            seen.update(hashes)
            cross_duplicates += info["dropped"]
            if info["lines"]:
                shards.append({"name": name, "source": state["source"], "input": state["index"]} | info)
                shards[-1].pop("dropped")
        state["stats"]["duplicate"] += cross_duplicates
        state["stats"]["documents"] -= cross_duplicates
    return shards


# --- phase 1 over a pool of worker processes --------------------------------------------------------

_progress_queue = None


def _init_worker(progress_queue, parent_pid: int) -> None:
    """In each worker: exit when the main process dies (even by kill -9); report progress to the queue."""
    exit_with_parent(parent_pid)
    global _progress_queue
    _progress_queue = progress_queue


def _run_task(task: InputTask) -> dict:
    return shard_one_input(task, lambda docs, nbytes: _progress_queue.put((docs, nbytes)))


def _start_pool(workers: int):
    """A pool of `workers` processes and the queue through which they report progress."""
    # fork starts workers in milliseconds; it happens before the progress bar starts its monitor thread,
    # so no thread is ever forked. Elsewhere spawn is the safe choice. The main thread forks them, which
    # matters for the parent-death signal that `exit_with_parent` arms (see common/processes.py).
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    progress_queue = context.Queue()
    return context.Pool(workers, _init_worker, (progress_queue, os.getpid())), progress_queue


class _ProgressBar:
    """Input bytes read and documents seen by this run, shown on stderr (tqdm) when enabled."""

    def __init__(self, enabled: bool) -> None:
        from tqdm import tqdm

        self.documents = self.bytes_read = 0
        self.bar = tqdm(
            desc="sharding",
            unit="B",
            unit_scale=True,
            unit_divisor=1000,
            file=sys.stderr,
            disable=not enabled,
            mininterval=0.5,
            dynamic_ncols=True,
        )

    def advance(self, docs: int, nbytes: int) -> None:
        self.documents += docs
        self.bytes_read += nbytes
        self.bar.update(nbytes)
        self.bar.set_postfix_str(f"{self.documents:,} docs", refresh=False)

    def close(self) -> None:
        self.bar.close()


def _run_in_pool(pool, progress_queue, tasks: list[InputTask], bar: _ProgressBar) -> list[dict]:
    # Largest inputs first balances the workers; results are still collected in input order.
    by_size = sorted(tasks, key=lambda t: -t.path.stat().st_size)
    pending = {task.index: pool.apply_async(_run_task, (task,)) for task in by_size}
    while not all(result.ready() for result in pending.values()):
        with contextlib.suppress(queue.Empty):
            bar.advance(*progress_queue.get(timeout=0.05))
        for result in pending.values():  # fail fast (--strict) instead of waiting for all
            if result.ready() and not result.successful():
                result.get()
    while not progress_queue.empty():
        bar.advance(*progress_queue.get())
    return [pending[task.index].get() for task in tasks]


def _run_phase_one(tasks: list[InputTask], workers: int, progress: bool) -> tuple[list[dict], int]:
    """Run every input's task (in-process, or over a pool); returns their states in input order and the
    input bytes read by this run."""
    workers = min(workers, len(tasks))
    pool, progress_queue = _start_pool(workers) if workers > 1 else (None, None)  # before the bar: see there
    bar = _ProgressBar(progress)
    try:
        if pool is None:
            return [shard_one_input(task, bar.advance) for task in tasks], bar.bytes_read
        with pool:  # __exit__ terminates the workers, also on an error (--strict) or Ctrl-C
            return _run_in_pool(pool, progress_queue, tasks, bar), bar.bytes_read
    finally:
        bar.close()


# --- the job --------------------------------------------------------------------------------------


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


def _input_paths(inputs: str | Path | Iterable[str | Path], output_dir: Path) -> list[Path]:
    paths = expand_inputs(inputs)
    # An input folder may contain the output folder (e.g. a rerun): never read our own shards back.
    paths = [p for p in paths if not p.is_relative_to(output_dir.resolve())]
    if not paths:
        raise ShardingError(f"no input files outside the output folder {output_dir}")
    return paths


def _finished_manifest(output_dir: Path, config: dict) -> dict | None:
    """The manifest of a finished job with this `config` in `output_dir` (None if there is none)."""
    if (manifest := read_json(output_dir / MANIFEST)) is None:
        return None
    if manifest.get("config") != config:
        raise ShardingError(
            f"{output_dir} already holds shards made with other "
            f"{_config_difference(manifest.get('config', {}), config)}; use another --output-dir or delete it"
        )
    shutil.rmtree(output_dir / STATE_DIR, ignore_errors=True)  # left if a kill came right after the manifest
    return manifest


def _start_or_resume(output_dir: Path, config: dict) -> Path:
    """The state folder of the job: an unfinished one with the same `config`, or a new one."""
    state_dir = output_dir / STATE_DIR
    if (old := read_json(state_dir / "config.json")) is not None:
        if old != config:
            raise ShardingError(
                f"{output_dir} holds an unfinished job with other {_config_difference(old, config)}; "
                f"rerun it with the same inputs and options, or delete {state_dir}"
            )
        return state_dir
    if any(output_dir.glob("part-*.jsonl.zst")):
        raise ShardingError(f"{output_dir} already holds shards but no {MANIFEST}; use an empty --output-dir")
    for sub in ("work", "inputs", "final"):
        (state_dir / sub).mkdir(parents=True, exist_ok=True)
    write_atomic(state_dir / "config.json", orjson.dumps(config))
    return state_dir


def _manifest(config: dict, states: list[dict], shards: list[dict]) -> dict:
    totals = empty_stats() | {"bytes_out": sum(s["bytes"] for s in shards)}
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
    return {
        "version": MANIFEST_VERSION,
        "config": config,
        "totals": totals,
        "inputs": input_entries,
        "shards": shards,
    }


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
    paths = _input_paths(inputs, output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ShardingError(f"cannot create --output-dir {output_dir}: {exc.strerror or exc}") from exc
    config = _config(paths, options)
    if (manifest := _finished_manifest(output_dir, config)) is not None:
        return ShardSummary(output_dir, manifest, time.perf_counter() - started, nothing_to_do=True)

    state_dir = _start_or_resume(output_dir, config)
    tasks = [InputTask(i, path, options, state_dir) for i, path in enumerate(paths)]
    try:
        states, bytes_read = _run_phase_one(tasks, workers, progress)
    except InputError as exc:  # only raised under --strict
        raise ShardingError(f"{exc} (--strict)") from exc
    shards = finalise_shards(states, output_dir, state_dir, dedup)
    manifest = _manifest(config, states, shards)
    write_atomic(output_dir / MANIFEST, orjson.dumps(manifest, option=orjson.OPT_INDENT_2) + b"\n")
    shutil.rmtree(state_dir, ignore_errors=True)
    return ShardSummary(output_dir, manifest, time.perf_counter() - started, bytes_read=bytes_read)


# --- command line ---------------------------------------------------------------------------------


@dataclass
class ShardConfig:
    """Normalise raw corpora into jsonl.zst shards of {"text": ..., "meta": {"source": ...}} lines.

    Inputs: The Pile, WuDao, any jsonl/JSON-array/parquet/text file, plain or zstd/gzip/bz2/xz. The shards
    are part-<source>-<input>-<shard>.jsonl.zst, listed in manifest.json. Interrupted jobs resume when rerun
    with the same arguments; a finished job is not redone. Exit status: 0 done; 1 fatal error (one-line
    message); 2 bad arguments; 3 done, but some input files were unreadable, truncated or corrupt (named in
    the summary and the manifest).
    """

    inputs: list[str] = field(default_factory=list)
    """Input files, folders (searched recursively) or globs: the arguments without -- (or after --inputs)."""
    output_dir: str = ""
    """Where the shards and manifest.json go (required)."""
    format: Literal[FORMATS] = "auto"
    """auto: from each file's suffix/content; pile: jsonl with text+meta; wudao: JSON arrays of
    title/content/dataType; jsonl, json (one array), parquet: records with a text field; text: plain text
    (see text_unit)."""
    source: str | None = None
    """meta.source and the name in the shard names (default: 'pile'/'wudao' for those corpora, else each
    input's file name without suffixes)."""
    lines_per_shard: int = LINES_PER_SHARD
    """Documents per shard at most."""
    workers: int = 1
    """Parallel processes, one input file each."""
    strict: bool = False
    """Stop at the first malformed record or bad file."""
    dedup: bool = True
    """Drop exact duplicate documents (holds ~130 bytes of memory per unique document; --no-dedup: keep them)."""
    min_chars: int = 0
    """Drop documents shorter than this (characters)."""
    max_chars: int | None = None
    """Drop documents longer than this (characters)."""
    text_field: str = "text"
    """Field holding the text in jsonl/json/parquet records."""
    text_unit: Literal[TEXT_UNITS] = "line"
    """Plain text: a document per line, per blank-line-separated paragraph, or per file."""
    progress: bool = True
    """Show a progress bar (--no-progress: none)."""

    def __post_init__(self) -> None:
        if not self.inputs or not self.output_dir:
            raise ValueError("give the inputs and the output folder: INPUT... --output_dir DIR")


PROG = "data/shard.py"
# Dash spellings of the keys, the usual style of command-line tools.
ALIASES = {
    "output-dir": "output_dir",
    "lines-per-shard": "lines_per_shard",
    "min-chars": "min_chars",
    "max-chars": "max_chars",
    "text-field": "text_field",
    "text-unit": "text_unit",
}


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_config(ShardConfig, argv, aliases=ALIASES, prog=PROG, positional="inputs")
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    options = asdict(config)
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
