"""Sharder throughput against the `zstd -3` command-line tool on the same bytes (not a test).

    python bench/bench_shard.py [--corpus ../shared/corpus/raw] [--repeat 3] [--machine "2-core CPU VM"]

Measures, in one run on the real corpus (The Pile and WuDao raw files):
- JSON handling candidates on the corpus lines (stdlib json vs orjson; msgspec when installed),
- `zstd -3 -T1` compressing the same uncompressed bytes the sharder reads (one core),
- the sharder (read, normalise, dedup, write zstd shards) with 1 and 2 workers.
Throughput is MB/s of uncompressed input; the ratio compares the sharder per worker with the zstd CLI
(goal: at least 0.3). Prints markdown table rows for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson

from data.readers import iter_decompressed
from data.shard import expand_inputs, shard_inputs

DEFAULT_CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus" / "raw"


def best_of(repeat: int, run) -> float:
    """The fastest of `repeat` timings, in seconds (the least disturbed by other load)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def json_rows(lines: list[bytes], nbytes: int, repeat: int) -> list[tuple[str, float, float]]:
    """(library, loads MB/s, dumps MB/s) on the corpus' JSON Lines."""
    objects = [orjson.loads(line) for line in lines]
    candidates = {
        "json (stdlib)": (json.loads, lambda o: json.dumps(o, ensure_ascii=False).encode()),
        "orjson": (orjson.loads, orjson.dumps),
    }
    try:
        import msgspec

        candidates["msgspec"] = (msgspec.json.decode, msgspec.json.encode)
    except ImportError:
        pass
    rows = []
    for name, (loads, dumps) in candidates.items():
        load_s = best_of(repeat, lambda loads=loads: [loads(line) for line in lines])
        dump_s = best_of(repeat, lambda dumps=dumps: [dumps(o) for o in objects])
        rows.append((name, nbytes / 1e6 / load_s, nbytes / 1e6 / dump_s))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="folder of raw corpus files")
    parser.add_argument("--repeat", type=int, default=3, help="timings per measurement; the best is kept")
    parser.add_argument("--machine", default="2-core CPU VM", help="machine description for the table")
    args = parser.parse_args()
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
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # The exact bytes the sharder reads, uncompressed, for the zstd CLI and the JSON measurements.
        raw = tmp / "input.bin"
        with open(raw, "wb") as out:
            for path in inputs:
                for chunk in iter_decompressed(path):
                    out.write(chunk)
        nbytes = raw.stat().st_size
        mb = nbytes / 1e6
        pile_lines = [
            line
            for p in inputs
            if p.name.endswith(".jsonl.zst")
            for line in b"".join(iter_decompressed(p)).split(b"\n")
            if line
        ]
        pile_bytes = sum(len(line) + 1 for line in pile_lines)

        def zstd_cli() -> None:
            subprocess.run([zstd, "-3", "-T1", "-q", "-f", "-o", str(tmp / "out.zst"), str(raw)], check=True)

        zstd_s = best_of(args.repeat, zstd_cli)

        def sharder(workers: int):
            def run() -> None:
                out = tmp / f"shards-{workers}"
                shutil.rmtree(out, ignore_errors=True)
                shard_inputs(inputs, out, workers=workers)

            return run

        one_s = best_of(args.repeat, sharder(1))
        two_s = best_of(args.repeat, sharder(2))
        json_table = json_rows(pile_lines, pile_bytes, args.repeat)

    zstd_rate, one_rate, two_rate = mb / zstd_s, mb / one_s, mb / two_s
    print(f"input: {len(inputs)} files, {mb:.1f} MB uncompressed ({args.corpus})\n")
    print("| library | loads MB/s | dumps MB/s |")
    print("|---|---:|---:|")
    for name, load_rate, dump_rate in json_table:
        print(f"| {name} | {load_rate:,.0f} | {dump_rate:,.0f} |")
    print()
    print(
        "| date | machine | input | `zstd -3 -T1` CLI | sharder, 1 worker | ratio (per worker / zstd) "
        "| sharder, 2 workers (per worker) | scaling 1→2 workers |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    print(
        f"| {date.today().isoformat()} | {args.machine} | {mb:.1f} MB (pile + wudao raw) | {zstd_rate:,.1f} MB/s "
        f"| {one_rate:,.1f} MB/s | {one_rate / zstd_rate:.2f}× | {two_rate:,.1f} MB/s ({two_rate / 2:,.1f}) "
        f"| {two_rate / one_rate:.2f}× |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
