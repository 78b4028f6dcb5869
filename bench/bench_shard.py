"""The datatrove sharder against today's sharder and the `zstd -3` command-line tool, on the same bytes.

    python bench/bench_shard.py [--corpus ../shared/corpus/raw] [--repeat 3] [--machine "2-core CPU VM"]
        [--baseline 4f9b4ff] [--curation-repeat N] [--profile]

Measures, in one run on the real corpus (The Pile and WuDao raw files):
- `zstd -3 -T1` compressing the same uncompressed bytes the sharders read (one core),
- today's sharder (`data/shard.py` of git commit --baseline, extracted with `git archive` into a temporary
  folder) and the datatrove pipeline with today's steps (normalise, exact dedup, write: the default
  options), each with 1 and 2 workers: MB/s, MB/s per worker, the ratio of the two per worker (goal: at
  least 0.8) and the scaling from 1 to 2 workers,
- the full curation (`--near-dedup --filters all --languages en,zh`) with 2 workers,
- peak memory of both sharders (resident set summed over the process tree, sampled every 50 ms) with 2
  workers on the corpus and on 4 copies of it (each copy's texts made distinct so dedup keeps them): flat
  means the larger's peak is within a few tens of MB of the smaller's.
Every sharder runs as a subprocess of its own `data/shard.py` (both pay the same interpreter start), timed
from outside; the best of --repeat runs is kept, beside the least CPU time of the process tree (less
disturbed by other jobs on the cores). The same measurements on the 4 copies (the same 6 inputs, each 4x
larger) show the rate per byte once the fixed costs (imports, a task's set-up) weigh less, as they do on
real corpora, whose files are gigabytes. Throughput is MB/s of uncompressed input. Prints markdown rows for
docs/benchmarks.md. When the ratio is under the goal (or with --profile), profiles the datatrove
pipeline on one worker in this process (cProfile, `data.shard.shard_inputs`).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import orjson
import psutil
import zstandard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data.pipeline import expand_inputs  # noqa: E402 (after the path, for `python bench/bench_shard.py`)
from data.readers import iter_decompressed  # noqa: E402

DEFAULT_CORPUS = ROOT.parent / "shared" / "corpus" / "raw"
BASELINE = "4f9b4ff"  # the last commit of the sharder before datatrove: "today's sharder" of issue 21
GOAL = 0.8  # datatrove pipeline per worker / today's sharder per worker
CURATION = ["--near-dedup", "--filters", "all", "--languages", "en,zh"]
COPIES = 4  # the larger corpus of the memory measurement
SAMPLE_S = 0.05
# Manifest totals that are not a count of removed documents.
NOT_REMOVALS = (
    "records",
    "documents",
    "bytes_in",
    "bytes_out",
    "invalid_utf8",
    "shards",
    "inputs",
    "failed_inputs",
)


@dataclass
class Run:
    """The best of a program's runs: seconds, peak resident set of its process tree (bytes, when sampled),
    the summary it printed on stderr, its manifest's totals and the least CPU time (user + system of the
    process tree, seconds) of the runs: less disturbed than the wall time by other jobs on the cores."""

    seconds: float
    peak_rss: int
    summary: str
    totals: dict
    cpu: float
    hashes: frozenset = frozenset()
    """(name, sha256) of its shards, to check that every run wrote the same bytes."""


def machine_name() -> str:
    """'2-core AMD EPYC VM' from lscpu (cores, model name, hypervisor), for the table's machine column."""
    try:
        fields = dict(
            line.split(":", 1)
            for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        )
    except (OSError, ValueError):
        return f"{os.cpu_count()}-core CPU"
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    model = fields.get("Model name", "CPU")
    return (
        f"{fields.get('CPU(s)', os.cpu_count())}-core {model}{' VM' if 'Hypervisor vendor' in fields else ''}"
    )


def load() -> str:
    """The load averages, as `uptime` prints them: the other jobs sharing the cores during the run."""
    return "load {:.2f} / {:.2f} / {:.2f} (1 / 5 / 15 min)".format(*os.getloadavg())


def tree_rss(process: psutil.Process) -> int:
    """Resident set of `process` and all its descendants, summed (shared pages counted in each)."""
    total = 0
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for member in members:
        with contextlib.suppress(psutil.NoSuchProcess):  # a worker that ended meanwhile
            total += member.memory_info().rss
    return total


def children_cpu() -> float:
    """User + system seconds of this process' finished children (and of their own reaped children)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_program(
    command: list[str], cwd: Path, pythonpath: Path, sample: bool
) -> tuple[float, int, str, float]:
    """Run one sharder to its end: (seconds, peak tree RSS or 0, stderr, CPU seconds). Raises on a non-zero
    exit."""
    env = os.environ | {"PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": "1"}
    peak = 0
    cpu = children_cpu()
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if sample:
        watched = psutil.Process(proc.pid)
        stop = threading.Event()

        def sampler() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, tree_rss(watched))
                stop.wait(SAMPLE_S)

        thread = threading.Thread(target=sampler, daemon=True)
        thread.start()
    stderr = proc.communicate()[1].decode(errors="replace")
    seconds = time.perf_counter() - start
    if sample:
        stop.set()
        thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {proc.returncode}:\n{stderr[-3000:]}")
    return seconds, peak, stderr, children_cpu() - cpu


def best_run(repeat: int, command: list[str], cwd: Path, pythonpath: Path, output: Path, sample=False) -> Run:
    """The fastest of `repeat` runs (the least disturbed by other load), each into an empty `output`; with
    `sample`, the lowest peak memory of them."""
    runs = []
    for _ in range(repeat):
        shutil.rmtree(output, ignore_errors=True)  # a finished job is not redone: start from nothing
        runs.append(run_program([*command, "--output-dir", str(output)], cwd, pythonpath, sample))
    seconds, _, summary, _ = min(runs)
    return Run(seconds, min(r[1] for r in runs), summary, manifest_totals(output), min(r[3] for r in runs))


def extract_baseline(commit: str, dest: Path) -> None:
    """data/ and common/ of `commit`, unpacked into `dest` (git archive: the working tree and git state
    are left alone)."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit, "data", "common"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")


def write_copies(inputs: list[Path], dest: Path, copies: int) -> None:
    """Each input `copies` times over in one file of the same kind (so the file count stays the corpus's and
    only the bytes grow), each copy's texts prefixed with its number so that exact dedup keeps them all
    (Pile: jsonl.zst at level 3; WuDao: JSON arrays)."""
    for number, path in enumerate(inputs):
        raw = b"".join(iter_decompressed(path))
        if path.name.endswith(".jsonl.zst"):
            lines = []
            for copy in range(copies):
                for line in raw.splitlines():
                    record = orjson.loads(line)
                    record["text"] = f"[copy {copy}] " + record["text"]
                    lines.append(orjson.dumps(record))
            data = zstandard.ZstdCompressor(level=3).compress(b"\n".join(lines) + b"\n")
            name = f"copies-{number}.jsonl.zst"
        else:
            records = []
            for copy in range(copies):
                for record in orjson.loads(raw):
                    record["content"] = f"[copy {copy}] " + record["content"]
                    records.append(record)
            data = orjson.dumps(records)
            name = f"copies-{number}.json"
        (dest / name).write_bytes(data)


def manifest_totals(output: Path) -> dict:
    return orjson.loads((output / "manifest.json").read_bytes())["totals"]


def shard_hashes(output: Path) -> frozenset:
    return frozenset(
        (s["name"], s["sha256"]) for s in orjson.loads((output / "manifest.json").read_bytes())["shards"]
    )


def profile(inputs: list[Path], tmp: Path, top: int = 30) -> str:
    """cProfile of the datatrove pipeline with the default options on one worker, in this process."""
    from data.shard import shard_inputs

    out = tmp / "profiled"
    shutil.rmtree(out, ignore_errors=True)
    profiler = cProfile.Profile()
    profiler.enable()
    shard_inputs(inputs, out, workers=1)
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).strip_dirs()
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return text.getvalue()


def steps_line(summary: str) -> str:
    """The 'steps: read 1.2 s, ...' line of the datatrove sharder's summary ('' if none)."""
    return next((line for line in summary.splitlines() if line.startswith("steps:")), "")


def uncompressed_mb(inputs: list[Path], dest: Path) -> float:
    """Write the exact bytes the sharders read, uncompressed, into `dest` (for the zstd CLI); their MB."""
    with open(dest, "wb") as out:
        for path in inputs:
            for chunk in iter_decompressed(path):
                out.write(chunk)
    return dest.stat().st_size / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="folder of raw corpus files")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best is kept")
    parser.add_argument("--machine", default=None, help="machine description for the table (default: lscpu)")
    parser.add_argument("--baseline", default=BASELINE, help="git commit of today's sharder")
    parser.add_argument(
        "--curation-repeat",
        type=int,
        default=None,
        help="runs of the full curation (default: --repeat; 0: none)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="profile the datatrove pipeline whatever the ratio"
    )
    args = parser.parse_args()
    machine = args.machine or machine_name()
    zstd = shutil.which("zstd")
    if zstd is None:
        print(
            "error: the zstd command-line tool is needed for the comparison: apt-get install -y zstd",
            file=sys.stderr,
        )
        return 1
    if not args.corpus.is_dir():
        print(f"error: corpus folder {args.corpus} not found (pass --corpus)", file=sys.stderr)
        return 1
    inputs = expand_inputs([args.corpus])
    curation_repeat = args.repeat if args.curation_repeat is None else args.curation_repeat
    load_before = load()

    with tempfile.TemporaryDirectory(prefix="bench_shard-") as tmp:
        tmp = Path(tmp)
        baseline = tmp / "baseline"
        extract_baseline(args.baseline, baseline)
        copies = tmp / "copies"
        copies.mkdir()
        write_copies(inputs, copies, COPIES)
        corpora = {"corpus": args.corpus.resolve(), f"{COPIES} copies": copies}
        sharders = {"today": baseline, "datatrove": ROOT}  # each runs its own data/shard.py, from its folder

        def sharder(name: str, corpus: Path, workers: int, *options: str, sample: bool = False) -> Run:
            command = [
                sys.executable,
                "data/shard.py",
                str(corpus),
                "--no-progress",
                "--workers",
                str(workers),
            ]
            out = tmp / f"out-{name}-{workers}"
            repeat = curation_repeat if options else args.repeat
            run = best_run(repeat, [*command, *options], sharders[name], sharders[name], out, sample)
            run.hashes = shard_hashes(out)
            return run

        mb, zstd_s, times = {}, {}, {}
        for label, corpus in corpora.items():
            raw = tmp / "input.bin"
            mb[label] = uncompressed_mb(expand_inputs([corpus]), raw)
            command = [zstd, "-3", "-T1", "-q", "-f", "-o", str(tmp / "out.zst"), str(raw)]
            zstd_s[label] = min(
                _timed(lambda command=command: subprocess.run(command, check=True))
                for _ in range(args.repeat)
            )
            raw.unlink()
            for workers in (1, 2):
                for name in sharders:
                    times[name, label, workers] = sharder(name, corpus, workers)
                    rate = mb[label] / times[name, label, workers].seconds
                    print(f"{label}: {name}, {workers} worker(s): {rate:,.1f} MB/s", flush=True)
        identical = all(
            len({run.hashes for (_, lab, _), run in times.items() if lab == label}) == 1 for label in corpora
        )
        curation = None
        if curation_repeat:
            curation = sharder("datatrove", corpora["corpus"], 2, *CURATION)
            print(f"full curation, 2 workers: {mb['corpus'] / curation.seconds:,.1f} MB/s", flush=True)
        memory = {}
        for label, corpus in corpora.items():
            for name in sharders:
                memory[name, label] = sharder(name, corpus, 2, sample=True)
            print(f"{label}: peak memory measured", flush=True)
        ratios = {
            (label, workers): times["today", label, workers].seconds
            / times["datatrove", label, workers].seconds
            for label in corpora
            for workers in (1, 2)
        }
        findings = ""
        if args.profile or min(ratios.values()) < GOAL:
            findings = profile(inputs, tmp)

    load_after = load()
    day = date.today().isoformat()
    print(f"\ninput: {len(inputs)} files ({args.corpus}); baseline {args.baseline}")
    print(f"{load_before} before, {load_after} after; shards of both sharders byte-identical: {identical}\n")
    print(
        "| date | machine | input | `zstd -3 -T1` | today's sharder, 1 worker | datatrove, 1 worker | ratio "
        "| today's, 2 workers (per worker) | datatrove, 2 workers (per worker) | ratio per worker "
        "| datatrove scaling 1→2 | full curation, 2 workers |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label in corpora:
        rate = {(name, w): mb[label] / times[name, label, w].seconds for name in sharders for w in (1, 2)}
        what = "pile + wudao raw" if label == "corpus" else f"{COPIES} distinct copies"
        curated = f"{mb[label] / curation.seconds:,.2f} MB/s" if curation and label == "corpus" else "—"
        print(
            f"| {day} | {machine} | {mb[label]:.1f} MB ({what}) | {mb[label] / zstd_s[label]:,.1f} MB/s "
            f"| {rate['today', 1]:,.1f} MB/s | {rate['datatrove', 1]:,.1f} MB/s | **{ratios[label, 1]:.2f}×** "
            f"| {rate['today', 2]:,.1f} MB/s ({rate['today', 2] / 2:,.1f}) "
            f"| {rate['datatrove', 2]:,.1f} MB/s ({rate['datatrove', 2] / 2:,.1f}) | **{ratios[label, 2]:.2f}×** "
            f"| {rate['datatrove', 2] / rate['datatrove', 1]:.2f}× | {curated} |"
        )
    print()
    print("| date | machine | sharder, 2 workers | input | documents | peak RSS (process tree) |")
    print("|---|---|---|---|---:|---:|")
    for (name, label), run in memory.items():
        program = "today's sharder" if name == "today" else "datatrove, default steps"
        print(
            f"| {day} | {machine} | {program} | {mb[label]:.1f} MB ({label}) | {run.totals['documents']:,} "
            f"| {run.peak_rss / 2**20:,.0f} MiB |"
        )
    larger = f"{COPIES} copies"
    for name in sharders:
        grew = (memory[name, larger].peak_rss - memory[name, "corpus"].peak_rss) / 2**20
        print(f"{name}: peak grows by {grew:+,.0f} MiB from the corpus to {larger}")
    # The corpus and its copies lie in the same 6 files, so the difference of the two runs is the cost of
    # the extra bytes alone: the rate per byte, free of the fixed costs of a run (imports, tasks' set-up).
    extra = mb[larger] - mb["corpus"]
    print(
        f"\nper byte: the {extra:,.1f} MB more of the {larger}, over the extra time (MB/s), today's / datatrove:"
    )
    for workers in (1, 2):
        marginal = {
            name: extra / (times[name, larger, workers].seconds - times[name, "corpus", workers].seconds)
            for name in sharders
        }
        fixed = {
            name: times[name, "corpus", workers].seconds - mb["corpus"] / marginal[name] for name in sharders
        }
        print(
            f"  {workers} worker(s): {marginal['today']:,.1f} / {marginal['datatrove']:,.1f} MB/s "
            f"(ratio {marginal['datatrove'] / marginal['today']:.2f}×); fixed cost of a run "
            f"{fixed['today']:.2f} / {fixed['datatrove']:.2f} s"
        )
    # One worker only: both sharders then work in their main process, whose CPU time is counted whole
    # (a pool worker still exiting when its sharder ends is not).
    print("\nCPU seconds, 1 worker (least of the runs), today's sharder / datatrove:")
    for label in corpora:
        today_cpu, datatrove_cpu = (times[name, label, 1].cpu for name in sharders)
        print(f"  {label}: {today_cpu:.2f} / {datatrove_cpu:.2f} s (ratio {today_cpu / datatrove_cpu:.2f}×)")
    print("\ndatatrove stage times (best runs):")
    for (name, label, workers), run in times.items():
        if name == "datatrove":
            print(f"  {label}, {workers} worker(s): {steps_line(run.summary)}")
    if curation:
        print(f"  full curation: {steps_line(curation.summary)}")
        t = curation.totals
        removed = {k: v for k, v in t.items() if v and k not in NOT_REMOVALS}
        print(f"  full curation kept {t['documents']:,} of {t['records']:,} documents; removed: {removed}")
    if findings:
        print(
            f"\nprofile of the datatrove pipeline, 1 worker, in-process (a ratio under {GOAL}):\n{findings}"
        )
    return 0


def _timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


if __name__ == "__main__":
    sys.exit(main())
