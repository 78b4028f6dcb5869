"""The sharding pipeline: its stages, in order, as datatrove pipelines, and the job around them.

    read      one task per input    InputReader -> [Curate] -> [ExactDedupSignatures] -> WorkShardWriter
    exact     one task              datatrove's ExactFindDedups: merges the sorted signature files on disk
    near      --near-dedup only     SurvivorReader -> NearDedupSignatures (one task per input), then
                                    datatrove's MinhashDedupBuckets (a task per bucket) and MinhashDedupCluster
    final     one task per input    Finalise: work shards -> part-*.jsonl.zst, duplicates dropped
    manifest  one task              WriteManifest: counts per input, per source and in total -> manifest.json

Determinism: an input's documents stay in order and in their own tasks, exact dedup keeps the first copy
in input order, MinHash clusters are formed the same way every run; the output is the same bytes whatever
--workers or the executor. Resuming: each stage runs only its tasks that datatrove has not marked
complete, and every file a task writes appears whole (data/steps.py); the job's state folder holds the
options it belongs to, and a finished job (its manifest) is not redone.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import orjson
from datatrove.pipeline.base import PipelineStep

from common.files import write_atomic
from data.executors import ExecutorOptions, make_executor, start_ray
from data.job import (
    DEDUP_REASONS,
    DROP_REASONS,
    MANIFEST,
    MANIFEST_VERSION,
    MAX_EXAMPLES,
    MAX_INPUTS,
    STATE_DIR,
    Job,
    ShardingError,
    ShardOptions,
    read_json,
)
from data.readers import DATA_SUFFIXES, logical_suffix
from data.shard_io import match_patterns
from data.steps import (
    Curate,
    ExactDedupSignatures,
    Finalise,
    InputReader,
    JobStep,
    NearDedupSignatures,
    SurvivorReader,
    WorkShardWriter,
    document_text,
)


def stat_keys() -> tuple[str, ...]:
    return ("records", "documents", "bytes_in", "bytes_out", *DROP_REASONS, "invalid_utf8")


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


def input_paths(inputs: str | Path | Iterable[str | Path], output_dir: Path) -> list[Path]:
    paths = expand_inputs(inputs)
    # An input folder may contain the output folder (e.g. a rerun): never read our own shards back.
    paths = [p for p in paths if not p.is_relative_to(output_dir.resolve())]
    if not paths:
        raise ShardingError(f"no input files outside the output folder {output_dir}")
    if len(paths) > MAX_INPUTS:
        raise ShardingError(
            f"{len(paths):,} input files; a job takes at most {MAX_INPUTS:,}: concatenate some"
        )
    return paths


def check_options(options: ShardOptions) -> None:
    """Every option checked before anything is written: ShardingError names what is wrong."""
    options.validate()
    if options.curated or options.language_model is not None:
        from data.curation import Curation

        try:  # curation checks its own options (a model without languages, a missing model file)
            Curation(options.filters, options.languages, options.pii, options.language_model)
        except ValueError as exc:
            raise ShardingError(str(exc)) from exc


# --- the stages ---------------------------------------------------------------------------------


def stages(job: Job) -> list[tuple[str, list[PipelineStep], int]]:
    """The job's stages in order: (name, pipeline, number of tasks)."""
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig, ExactFindDedups
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster
    from datatrove.utils.text import TextNormConfig

    opts, state, inputs = job.options, job.state_dir, len(job.inputs)
    # One config for both exact-dedup stages: building one checks xxhash's installation (80 ms).
    exact_config = ExactDedupConfig(content_getter=document_text)
    read: list[PipelineStep] = [InputReader(job)]
    if opts.curated:
        from data.curation import Curation  # datatrove's filters, jieba, fastText: only when asked for

        read.append(Curate(job, Curation(opts.filters, opts.languages, opts.pii, opts.language_model)))
    if opts.dedup:
        read.append(ExactDedupSignatures(str(state / "exact" / "sigs"), exact_config))
    read.append(WorkShardWriter(job))
    result = [("read", read, inputs)]
    if opts.dedup:
        find = ExactFindDedups(str(state / "exact" / "sigs"), str(state / "exact" / "dups"), exact_config)
        result.append(("exact", [find], 1))
    if (near := opts.near_dedup) is not None:
        # Accents are kept: folding them (a per-character Python loop) took most of the signature time.
        config = MinhashConfig(
            n_grams=near.n_grams,
            num_buckets=near.buckets,
            hashes_per_bucket=near.hashes_per_bucket,
            norm_config=TextNormConfig(norm_unicode_diacritics=False),
        )
        sigs, buckets = str(state / "near" / "sigs"), str(state / "near" / "buckets")
        result += [
            ("near-signatures", [SurvivorReader(job), NearDedupSignatures(sigs, config)], inputs),
            ("near-buckets", [MinhashDedupBuckets(sigs, buckets, config=config)], near.buckets),
            (
                "near-clusters",
                [MinhashDedupCluster(buckets, str(state / "near" / "remove"), config=config)],
                1,
            ),
        ]
    result += [("final", [Finalise(job)], inputs), ("manifest", [WriteManifest(job)], 1)]
    return result


class WriteManifest(JobStep):
    """The last stage: every step's counts for every input summed per input, per source and in total, and
    written with the shards' names, lines, sizes and sha256 into manifest.json (atomically)."""

    name = "📋 manifest"
    type = "💽 - WRITER"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        write_atomic(
            Path(self.job.output_dir) / MANIFEST,
            orjson.dumps(manifest(self.job), option=orjson.OPT_INDENT_2) + b"\n",
        )
        return
        yield


def _input_entry(job: Job, index: int) -> tuple[dict, list[dict]]:
    reader = job.load_counts("reader", index)
    curate = job.load_counts("curate", index) or {}
    written = job.load_counts("writer", index)
    final = job.load_counts("final", index)
    stats = dict.fromkeys(stat_keys(), 0)
    stats.update(reader["counts"])
    for key in (*curate, *DEDUP_REASONS):
        stats[key] = curate.get(key, 0) + final.get(key, 0)
    stats["invalid_utf8"] += written["invalid_utf8"]
    stats["documents"] = sum(s["lines"] for s in final["shards"])
    stats["bytes_out"] = sum(s["bytes"] for s in final["shards"])
    shards = [s | {"source": reader["source"], "input": index} for s in final["shards"]]
    entry = {k: reader[k] for k in ("path", "format", "source", "status", "error")}
    return entry | stats | {"shards": [s["name"] for s in shards], "examples": reader["examples"]}, shards


def manifest(job: Job) -> dict:
    config = read_json(job.state_dir / "config.json")
    entries, shards = [], []
    for index in range(len(job.inputs)):
        entry, input_shards = _input_entry(job, index)
        entries.append(entry)
        shards += input_shards
    keys = stat_keys()
    totals = {k: sum(e[k] for e in entries) for k in keys}
    sources: dict[str, dict] = {}
    for entry in entries:
        into = sources.setdefault(entry["source"], dict.fromkeys(keys, 0))
        for key in keys:
            into[key] += entry[key]
    totals |= {
        "shards": len(shards),
        "inputs": len(entries),
        "failed_inputs": sum(e["status"] != "ok" for e in entries),
    }
    return {
        "version": MANIFEST_VERSION,
        "config": config,
        "totals": totals,
        "sources": sources,
        "inputs": entries,
        "shards": shards,
    }


# --- the job ------------------------------------------------------------------------------------


def job_config(paths: list[Path], job: Job) -> dict:
    return {
        "version": MANIFEST_VERSION,
        "options": job.options.manifest_form(),
        "inputs": [[str(p), p.stat().st_size] for p in paths],
    }


def _config_difference(old: dict, new: dict) -> str:
    changed = [k for k in new["options"] if old.get("options", {}).get(k) != new["options"][k]]
    if old.get("inputs") != new["inputs"]:
        changed.append("input files")
    return ", ".join(changed) or "format version"


def finished_manifest(output_dir: Path, config: dict) -> dict | None:
    """The manifest of a finished job with this `config` in `output_dir` (None if there is none)."""
    if (found := read_json(output_dir / MANIFEST)) is None:
        return None
    if found.get("config") != config:
        raise ShardingError(
            f"{output_dir} already holds shards made with other "
            f"{_config_difference(found.get('config', {}), config)}; use another --output-dir or delete it"
        )
    shutil.rmtree(output_dir / STATE_DIR, ignore_errors=True)  # left by a kill right after the manifest
    return found


def start_or_resume(output_dir: Path, config: dict) -> None:
    """Check the state folder belongs to this job (same inputs and options), or start a new one."""
    state_dir = output_dir / STATE_DIR
    if (old := read_json(state_dir / "config.json")) is not None:
        if old != config:
            raise ShardingError(
                f"{output_dir} holds an unfinished job with other {_config_difference(old, config)}; "
                f"rerun it with the same inputs and options, or delete {state_dir}"
            )
        return
    if any(output_dir.glob("part-*.jsonl.zst")):
        raise ShardingError(f"{output_dir} already holds shards but no {MANIFEST}; use an empty --output-dir")
    state_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(state_dir / "config.json", orjson.dumps(config))


@dataclass
class RunResult:
    manifest: dict | None
    """None when the job was submitted (Slurm) rather than run here."""
    seconds: float
    bytes_read: int
    """Input bytes read by this run (a resumed run skips the inputs finished before it): the MB/s basis."""
    nothing_to_do: bool = False
    stage_seconds: dict | None = None


def run_job(job: Job, config: dict, executor: ExecutorOptions, progress: bool = False) -> RunResult:
    """Run (or resume) the job's stages with the executor asked for, and remove the state folder at the end.

    `progress`: a line on stderr as each stage starts and ends (datatrove's own logs, one file per task,
    are in the state folder's logs/ while the job runs)."""
    started = time.perf_counter()
    output_dir = Path(job.output_dir)
    if (found := finished_manifest(output_dir, config)) is not None:
        return RunResult(found, time.perf_counter() - started, 0, nothing_to_do=True)
    start_or_resume(output_dir, config)
    if executor.kind == "ray":
        start_ray(executor.ray_address)
    chain, previous = [], None
    for name, pipeline, tasks in stages(job):
        previous = make_executor(
            executor, pipeline, tasks, str(job.state_dir / "logs" / name), previous, name
        )
        chain.append((name, previous))
    unread = chain[0][1].get_incomplete_ranks(range(len(job.inputs)))
    stage_seconds = {}
    if executor.kind == "slurm":
        chain[-1][1].run()  # submits every stage, each depending on the one before
        return RunResult(None, time.perf_counter() - started, 0)
    _run_stages(chain, progress, stage_seconds)
    found = read_json(output_dir / MANIFEST)
    if found is None:
        raise ShardingError(
            f"the pipeline ended without writing {output_dir / MANIFEST}; see the logs in {job.state_dir / 'logs'}"
        )
    shutil.rmtree(job.state_dir, ignore_errors=True)
    bytes_read = sum(found["inputs"][i]["bytes_in"] for i in unread)
    return RunResult(found, time.perf_counter() - started, bytes_read, stage_seconds=stage_seconds)


def _run_stages(chain: list, progress: bool, stage_seconds: dict) -> None:
    for name, stage in chain:  # each stage's run() would run its dependencies first: run them in order
        begun = time.perf_counter()
        if progress:
            print(f"{name}: {stage.world_size} task(s) ...", end="", file=sys.stderr, flush=True)
        try:
            stage.run()
        except BaseException:
            if progress:  # the error message goes on a line of its own
                print(file=sys.stderr, flush=True)
            raise
        stage_seconds[name] = time.perf_counter() - begun
        if progress:
            print(f" done in {stage_seconds[name]:.1f} s", file=sys.stderr, flush=True)


def examples_of(found: dict) -> list[str]:
    return [e for i in found["inputs"] for e in i["examples"]][:MAX_EXAMPLES]
