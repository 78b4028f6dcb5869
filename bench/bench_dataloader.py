"""Pretraining data-loader throughput and resume time on the real corpus (not a test).

    python bench/bench_dataloader.py [--corpus ../shared/corpus/raw] [--tokenizer TOKDIR] [--tokens 4000000]

Measures, in one run:
- tokenizer candidates on the corpus documents, one core each: `Tokenizer.encode_batch` (SentencePiece,
  the project's safe encoder) and Hugging Face `tokenizers`' `encode_batch` on the same tokenizer's
  `tokenizer.json` (RAYON_NUM_THREADS=1), plus SentencePiece with 2 threads;
- the pretraining stream (read shards, tokenize, mix pile:wudao 1:1, pack into 8 x 2048 rows) with 0, 1
  and 2 worker processes, tokens/s after the first batch (the pipeline fill is reported separately);
- resume: seconds from `load_state_dict` to the first batch at a late position, against a fresh start,
  and how many units (pieces of shards) each had to tokenize.

The shards are written by data/shard.py into a temporary folder; without --tokenizer a 32k-vocabulary
tokenizer is trained on them first. Goal: >= 450k tokens/s with 2 workers on a 2-core machine.
Prints markdown rows for docs/benchmarks.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # tokenizers reads it when its thread pool starts
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import platform
import resource
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.shard import main as shard_main
from data.shard_io import expand_shard_paths, iter_shard_texts
from dataset import pretrain_dataset as pd
from dataset.pretrain_dataset import PretrainDataConfig, PretrainDataLoader
from dataset.tokenizer import Tokenizer
from dataset.train_tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parent.parent


def machine_name() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {model}"


def make_shards(corpus: Path, out: Path) -> list[str]:
    shards = []
    for corpus_format in ("pile", "wudao"):
        target = out / corpus_format
        code = shard_main(
            [str(corpus / corpus_format), "--format", corpus_format, "--output-dir", str(target)]
        )
        if code != 0:
            raise SystemExit(f"sharding {corpus / corpus_format} failed")
        shards.append(str(target))
    return shards


def bench_tokenizers(tokenizer: Tokenizer, texts: list[str]) -> list[tuple[str, float]]:
    """(candidate, tokens/s) on `texts`."""
    from tokenizers import Tokenizer as HFTokenizer

    results = []
    for threads in (1, 2):
        started = time.perf_counter()
        n = sum(map(len, tokenizer.encode_batch(texts, num_threads=threads)))
        results.append(
            (
                f"SentencePiece `Tokenizer.encode_batch`, {threads} thread(s)",
                n / (time.perf_counter() - started),
            )
        )
    hf = HFTokenizer.from_file(str(Path(tokenizer.path) / "tokenizer.json"))
    started = time.perf_counter()
    n = sum(len(e.ids) for e in hf.encode_batch(texts, add_special_tokens=False))
    results.append(("HF tokenizers `encode_batch`, 1 thread", n / (time.perf_counter() - started)))
    return results


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the worker processes, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_stream(config: PretrainDataConfig, tokenizer: Tokenizer, tokens: int) -> dict[str, float]:
    """Tokens/s of the stream after its first batch, the first batch's delay, and tokens per CPU-second
    (main process + workers, whole run): the figure that load from other jobs does not distort."""
    per_batch = config.batch_size * config.seq_len
    cpu_started = cpu_seconds()
    with PretrainDataLoader(config, tokenizer) as loader:
        started = time.perf_counter()
        it = iter(loader)
        next(it)
        first = time.perf_counter() - started
        batches = max(1, tokens // per_batch)
        started = time.perf_counter()
        for _ in range(batches):
            next(it)
        elapsed = time.perf_counter() - started
    cpu = cpu_seconds() - cpu_started
    return {
        "tokens_per_s": batches * per_batch / elapsed,
        "first_batch_s": first,
        "tokens_per_cpu_s": (batches + 1) * per_batch / cpu,
    }


def count_units(config: PretrainDataConfig, tokenizer: Tokenizer, state: dict | None) -> tuple[float, int]:
    """Seconds to the first batch (from a fresh start or from `state`) and units tokenized on the way."""
    calls = 0
    real = pd.tokenize_unit

    def counting(request, tok):
        nonlocal calls
        calls += 1
        return real(request, tok)

    pd.tokenize_unit = counting  # num_workers=0: units are tokenized in this process, so they are counted
    try:
        with PretrainDataLoader(config, tokenizer) as loader:
            started = time.perf_counter()
            if state is not None:
                loader.load_state_dict(state)
            next(iter(loader))
            return time.perf_counter() - started, calls
    finally:
        pd.tokenize_unit = real


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default=str(REPO.parent / "shared" / "corpus" / "raw"))
    parser.add_argument("--tokenizer", help="tokenizer folder (default: train a 32k one on the corpus)")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--tokens", type=int, default=4_000_000, help="tokens timed per configuration")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--machine", default=machine_name())
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_dataloader_") as tmp:
        shards = make_shards(Path(args.corpus), Path(tmp) / "shards")
        if args.tokenizer:
            tokdir = Path(args.tokenizer)
        else:
            print(f"training a {args.vocab_size}-token tokenizer on the corpus ...", flush=True)
            tokdir = train_tokenizer(shards, args.vocab_size, Path(tmp) / "tok", character_coverage=0.9995)
        tokenizer = Tokenizer.load(tokdir)
        texts = list(iter_shard_texts(expand_shard_paths(shards)))
        print(
            f"{len(texts):,} documents, {sum(len(t.encode()) for t in texts) / 1e6:.1f} MB of text",
            flush=True,
        )

        rows = []
        for name, speed in bench_tokenizers(tokenizer, texts[::2]):
            rows.append(f"| tokenizer: {name} | {speed / 1e3:,.0f}k | |")
            print(rows[-1], flush=True)

        config = PretrainDataConfig(
            shards=shards, seq_len=2048, batch_size=8, mixture={"pile": 1, "wudao": 1}
        )
        for workers in args.workers:
            config.num_workers = workers
            result = run_stream(config, tokenizer, args.tokens)
            per_worker = result["tokens_per_s"] / max(1, workers)
            rows.append(
                f"| stream, {workers} worker(s) (8 x 2048 rows, pile:wudao 1:1) | "
                f"{result['tokens_per_s'] / 1e3:,.0f}k ({per_worker / 1e3:,.0f}k per worker) | "
                f"first batch after {result['first_batch_s']:.1f} s; "
                f"{result['tokens_per_cpu_s'] / 1e3:,.0f}k tokens per CPU-second |"
            )
            print(rows[-1], flush=True)

        config.num_workers = 0
        with PretrainDataLoader(config, tokenizer) as loader:
            it = iter(loader)
            skip = args.tokens // (config.batch_size * config.seq_len)
            for _ in range(skip):
                next(it)
            state = loader.state_dict()
        fresh_s, fresh_units = count_units(config, tokenizer, None)
        resume_s, resume_units = count_units(config, tokenizer, state)
        passed = sum(state["tokens_per_source"].values())
        rows.append(
            f"| resume after {passed / 1e6:.1f}M tokens (0 workers) | first batch after {resume_s:.2f} s, "
            f"{resume_units} units tokenized | fresh start: {fresh_s:.2f} s, {fresh_units} units |"
        )
        print(rows[-1], flush=True)

    print(f"\n{date.today().isoformat()}, {args.machine}, tokenizer vocab {tokenizer.vocab_size:,}:\n")
    print("| measurement | tokens/s | notes |\n|---|---:|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
