"""`make bench`: run every CPU benchmark one after another (never in parallel: they would slow each other).

Each script prints its own table, measured side by side with its peer in the same run; copy the rows
into docs/benchmarks.md with the date and machine. Scripts that need the real corpus read
../shared/corpus (or --corpus). bench/train_gpu.py runs its full table on a CUDA machine and its
CPU smoke mode elsewhere.

    python bench/run_all.py                  # all of them
    python bench/run_all.py shard tokenizer  # a subset, by name
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SCRIPTS = {
    "shard": ["bench_shard.py"],
    "tokenizer": ["bench_tokenizer.py"],
    "dataloader": ["bench_dataloader.py"],
    "model": ["bench_model.py"],
    "train": ["bench_train.py"],
    "sft": ["bench_sft.py"],
    "serve": ["bench_serve.py"],
    "gpu": ["train_gpu.py", "--out", str(BENCH.parent / "runs" / "bench_gpu")],
}


def main(names: list[str]) -> int:
    unknown = [n for n in names if n not in SCRIPTS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {list(SCRIPTS)}", file=sys.stderr)
        return 2
    failed = []
    for name in names or list(SCRIPTS):
        script, *args = SCRIPTS[name]
        print(f"\n##### {name}: bench/{script} {' '.join(args)}", flush=True)
        start = time.perf_counter()
        result = subprocess.run([sys.executable, str(BENCH / script), *args])
        print(f"##### {name}: exit {result.returncode} after {time.perf_counter() - start:.0f} s", flush=True)
        if result.returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
