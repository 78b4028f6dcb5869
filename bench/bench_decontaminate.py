"""Decontamination throughput against the sharder on the same corpus, per worker (not a test).

    python bench/bench_decontaminate.py [--corpus ../shared/corpus/raw] [--tasks core] [--repeat 3]

In one process on the real corpus (The Pile and WuDao raw files), --repeat times in turn: the sharder
(`data.shard.shard_inputs`, 1 worker) shards it into a temporary folder, then `evaluation.decontaminate`
checks the tasks' documents against those shards (1 worker, then 2), the task index built each time. Taking
them in turn gives both the same share of whatever else the machine runs; the best time of each is kept. Both
rates are MB/s of the same document text (UTF-8 bytes), so their ratio is the ratio of their times; the
sharder's rate over its raw input is printed too. Goal: decontamination per worker at least the sharder's
speed (ratio >= 1). Prints a markdown table row for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.shard import shard_inputs
from evaluation.decontaminate import decontaminate
from evaluation.tasks import load_task, resolve_tasks, task_dir

DEFAULT_CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus" / "raw"


def timed(run: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds `run` took, and what it returned."""
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="folder of raw corpus files")
    parser.add_argument("--tasks", default="core", help="tasks whose documents are checked")
    parser.add_argument("--repeat", type=int, default=3, help="timings per measurement; the best is kept")
    parser.add_argument("--machine", default="2-core CPU VM", help="machine description for the table")
    args = parser.parse_args()
    if not args.corpus.is_dir():
        print(f"error: corpus folder {args.corpus} not found (pass --corpus)", file=sys.stderr)
        return 1
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    tasks = [load_task(name, path) for name, path in resolve_tasks([args.tasks], task_dir()).items()]

    times: dict[str, list[float]] = {"sharder": [], "one": [], "two": []}
    stats: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        for _ in range(args.repeat):
            shutil.rmtree(shards, ignore_errors=True)
            seconds, summary = timed(lambda: shard_inputs([args.corpus], shards, workers=1))
            times["sharder"].append(seconds)
            seconds, report = timed(lambda: decontaminate(str(shards), tasks, workers=1, stats=stats))
            times["one"].append(seconds)
            times["two"].append(timed(lambda: decontaminate(str(shards), tasks, workers=2))[0])
    shard_s, one_s, two_s = (min(times[key]) for key in ("sharder", "one", "two"))
    raw_bytes, inputs = summary.bytes_read, len(summary.manifest["inputs"])

    mb = stats["bytes"] / 1e6
    docs = sum(entry["docs"] for entry in report["contamination"].values())
    dirty = sum(entry["contaminated"] for entry in report["contamination"].values())
    shard_rate, one_rate, two_rate = mb / shard_s, mb / one_s, mb / two_s
    print(
        f"corpus: {inputs} files, {raw_bytes / 1e6:.1f} MB raw, {stats['documents']:,} documents, "
        f"{mb:.1f} MB of text in {stats['shards']} shards; tasks: {args.tasks} ({docs:,} documents, "
        f"{dirty} contaminated); sharder over its raw input: {raw_bytes / 1e6 / shard_s:.1f} MB/s\n"
    )
    print(
        "| date | machine | text | sharder, 1 worker | decontaminate, 1 worker | ratio (decontaminate / "
        "sharder) | decontaminate, 2 workers (per worker) |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    print(
        f"| {date.today().isoformat()} | {args.machine} | {mb:.1f} MB, {args.tasks} ({docs:,} docs) "
        f"| {shard_rate:.1f} MB/s | {one_rate:.1f} MB/s | **{one_rate / shard_rate:.2f}×** "
        f"| {two_rate:.1f} MB/s ({two_rate / 2:.1f}) |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
