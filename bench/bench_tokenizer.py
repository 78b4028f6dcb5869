"""Tokenizer benchmark: encoding throughput beside AutoTokenizer, training cost against plain SentencePiece.

    python bench/bench_tokenizer.py [--corpus ../shared/corpus/raw] [--vocab-size 16000] [--machine "..."]

Measures, in one run on the real corpus (The Pile and WuDao raw files, written as jsonl.zst shards):
- training with `dataset/train_tokenizer.py` at several --sample-bytes: seconds and peak RSS, per 10 MB
  sampled (each run is a fresh process, so the peak is its own),
- SentencePiece's trainer on the same whole corpus read from a text file (`input=`, one line per sentence,
  no sampling) with the same options: the usual way to train it,
- encoding throughput (MB/s of UTF-8 text, tokens/s) of `Tokenizer.encode_batch` with 1 and 2 processes,
  beside the exported `AutoTokenizer` fast tokenizer on the same documents (same ids, checked).
Prints markdown tables for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import array
import hashlib
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
import zstandard

from data.shard_io import expand_shard_paths, iter_shard_texts

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO_ROOT.parent / "shared" / "corpus" / "raw"
MB = 1e6


def write_shards(corpus: Path, out: Path) -> list[str]:
    """The corpus as shards: the Pile files already are jsonl.zst of {"text", "meta"}; WuDao is converted."""
    texts: list[str] = []
    for path in sorted(corpus.glob("pile/*.jsonl.zst")):
        (out / f"part-pile-{path.stem.split('.')[0]}.jsonl.zst").write_bytes(path.read_bytes())
        texts += iter_shard_texts([path])
    for index, path in enumerate(sorted(corpus.glob("wudao/*.json"))):
        docs = [r["title"] + "\n" + r["content"] for r in json.loads(path.read_text(encoding="utf-8"))]
        lines = b"".join(orjson.dumps({"text": t, "meta": {"source": "wudao"}}) + b"\n" for t in docs)
        (out / f"part-wudao-{index}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
        texts += docs
    return texts


def train_run(shards: Path, out: Path, vocab_size: int, sample_bytes: str) -> dict:
    """One training run of our CLI in a fresh process; returns its summary."""
    command = [sys.executable, str(REPO_ROOT / "dataset/train_tokenizer.py"), "--input", str(shards)]
    command += ["--vocab-size", str(vocab_size), "--output-dir", str(out), "--sample-bytes", sample_bytes]
    command += ["--heldout-fraction", "0", "--quiet"]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    summary = json.loads((out / "training_summary.json").read_text())
    summary["wall_seconds"] = time.perf_counter() - start
    return summary


SENTENCEPIECE_ALONE = """
import json, sys, time
import sentencepiece as spm
from common.memory import peak_rss_bytes
from dataset.train_tokenizer import sentencepiece_options
options = sentencepiece_options(int(sys.argv[2]), normalization="identity", character_coverage=0.9995,
                                num_threads=int(sys.argv[3]))
start = time.perf_counter()
spm.SentencePieceTrainer.train(input=sys.argv[1], model_prefix=sys.argv[4], minloglevel=2, **options)
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_bytes": peak_rss_bytes()}))
"""


def sentencepiece_alone(texts: list[str], tmp: Path, vocab_size: int) -> dict:
    """SentencePiece's trainer on the whole corpus as a text file, one line per sentence (no sampling)."""
    text_file = tmp / "corpus.txt"
    with open(text_file, "w", encoding="utf-8") as f:
        for text in texts:
            f.writelines(line + "\n" for line in text.split("\n") if line)
    command = [sys.executable, "-c", SENTENCEPIECE_ALONE, str(text_file), str(vocab_size)]
    command += [str(os.cpu_count() or 1), str(tmp / "sp_alone")]
    result = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO_ROOT)
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    stats["bytes"] = text_file.stat().st_size
    return stats


_worker: tuple[str, object] | None = None  # (kind, tokenizer) in each worker process


def _init_worker(kind: str, tokdir: str) -> None:
    global _worker
    if kind == "ours":
        from dataset.tokenizer import Tokenizer

        _worker = (kind, Tokenizer.load(tokdir))
    else:
        from transformers import AutoTokenizer

        _worker = (kind, AutoTokenizer.from_pretrained(tokdir))


def _encode_chunk(texts: list[str]) -> tuple[int, str]:
    """Token count and a digest of the ids: sending the ids themselves back would cost more than encoding."""
    kind, tokenizer = _worker
    if kind == "ours":
        ids = tokenizer.encode_batch(texts, num_threads=1)
    else:
        ids = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    digest = hashlib.sha1(b"".join(array.array("i", row).tobytes() + b"|" for row in ids)).hexdigest()
    return sum(map(len, ids)), digest


def encode_throughput(
    kind: str, tokdir: Path, texts: list[str], processes: int
) -> tuple[float, list[list[int]]]:
    """Seconds to encode `texts` with `processes` worker processes (loading excluded), and the ids."""
    chunks = [texts[i : i + 64] for i in range(0, len(texts), 64)]
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes, initializer=_init_worker, initargs=(kind, str(tokdir))) as pool:
        pool.map(_encode_chunk, [texts[:1]] * processes * 4, chunksize=1)  # wait until every worker loaded
        start = time.perf_counter()
        digests = pool.map(_encode_chunk, chunks, chunksize=1)
        seconds = time.perf_counter() - start
    return seconds, digests


def machine_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {cpu}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--vocab-size", type=int, default=16000)
    parser.add_argument("--samples", default="5M,10M,20M,64M", help="--sample-bytes values to train with")
    parser.add_argument("--repeat", type=int, default=2, help="encoding timings: best of N")
    parser.add_argument("--machine", default=None, help="machine description for the table")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process, on both sides
    machine = args.machine or machine_name()
    today = date.today().isoformat()

    with tempfile.TemporaryDirectory(prefix="bench_tokenizer_") as tmp_name:
        tmp = Path(tmp_name)
        shards = tmp / "shards"
        shards.mkdir()
        texts = write_shards(args.corpus, shards)
        total = sum(len(t.encode()) for t in texts)
        print(
            f"corpus: {len(texts):,} documents, {total / MB:.1f} MB in {len(expand_shard_paths(shards))} shards"
        )

        print(f"\n### Training (vocab {args.vocab_size:,})\n")
        print(
            "| date | machine | sampled | documents | training s | s per 10 MB | peak RSS MiB | RSS per 10 MB |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        runs = []
        for sample in args.samples.split(","):
            summary = train_run(shards, tmp / f"tok-{sample}", args.vocab_size, sample)
            runs.append(summary)
            mb = summary["bytes_sampled"] / MB
            seconds = summary["sampling_seconds"] + summary["training_seconds"]
            rss = summary["peak_rss_bytes"] / 2**20
            print(
                f"| {today} | {machine} | {mb:.1f} MB | {summary['documents_sampled']:,} | {seconds:.1f} | "
                f"{seconds / mb * 10:.1f} | {rss:.0f} | {rss / mb * 10:.0f} MiB |"
            )
        alone = sentencepiece_alone(texts, tmp, args.vocab_size)
        mb = alone["bytes"] / MB
        print(
            f"| {today} | {machine} | SentencePiece alone, `input=` text file, {mb:.1f} MB | all lines | "
            f"{alone['seconds']:.1f} | {alone['seconds'] / mb * 10:.1f} | {alone['peak_rss_bytes'] / 2**20:.0f} | "
            f"{alone['peak_rss_bytes'] / 2**20 / mb * 10:.0f} MiB |"
        )
        if len(runs) >= 2:
            (a, b) = runs[0], runs[-1]
            slope = (
                (b["peak_rss_bytes"] - a["peak_rss_bytes"])
                / 2**20
                / ((b["bytes_sampled"] - a["bytes_sampled"]) / MB)
            )
            print(
                f"\nmarginal peak RSS: {slope * 10:.0f} MiB per 10 MB sampled (between the smallest and largest sample)"
            )

        tokdir = tmp / f"tok-{args.samples.split(',')[-1]}"
        print(f"\n### Encoding ({total / MB:.1f} MB, vocab {args.vocab_size:,})\n")
        print("| date | machine | encoder | processes | MB/s | tokens/s |")
        print("|---|---|---|---:|---:|---:|")
        reference = None
        for kind, label in [
            ("ours", "`Tokenizer.encode_batch` (SentencePiece)"),
            ("hf", "`AutoTokenizer` fast"),
        ]:
            for processes in (1, 2):
                seconds, digests = min(
                    (encode_throughput(kind, tokdir, texts, processes) for _ in range(args.repeat)),
                    key=lambda r: r[0],
                )
                if reference is None:
                    reference = digests
                elif digests != reference:
                    raise SystemExit(f"{label} gave different ids from Tokenizer.encode_batch")
                n_tokens = sum(count for count, _ in digests)
                print(
                    f"| {today} | {machine} | {label} | {processes} | {total / MB / seconds:.2f} | "
                    f"{n_tokens / seconds:,.0f} |"
                )
        n_tokens = sum(count for count, _ in reference)
        print(f"\n{n_tokens:,} tokens: {total / n_tokens:.2f} bytes/token overall")


if __name__ == "__main__":
    main()
