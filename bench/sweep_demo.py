"""The demo's pretraining settings, chosen by measurement (not a test): candidate configs through the real
`pretrain_llama.py`, held-out bits per byte and wall time of each. Results in docs/demo_sweep.md.

    python bench/sweep_demo.py --prepare                      # corpus, shards, tokenizers under --root
    python bench/sweep_demo.py --steps 150 base wide lr2e-3   # short runs of the named candidates
    python bench/sweep_demo.py base@200 batch4@400            # each at its own step count
    python bench/sweep_demo.py chosen                         # a candidate at demo.yaml's step count

The corpus, shards and tokenizers are made once as `make demo` makes them (data/demo_corpus.py,
data/shard.py, dataset/train_tokenizer.py), one tokenizer per vocabulary size the candidates use. Every run
starts from configs/pretrain/demo.yaml with the candidate's `--section.key value` overrides, validates only
at its end (on `eval_batches` held-out batches, the same batches for every candidate of a vocabulary) and
saves no intermediate checkpoint. Each result is appended to `<root>/results.jsonl`; the table printed at
the end lists every result there, so runs made in several calls are compared side by side.

Bits per byte, unlike the loss, does not depend on the tokenizer: it is the figure that compares runs with
different vocabularies. On a shared machine wall time is noisy; tokens/s (the loop's median over the run)
and the token count are what the time estimates of longer runs are made from.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "pretrain" / "demo.yaml"

# vocabulary -> SentencePiece character coverage: with full coverage the Chinese dictionary's characters
# alone need about 6,500 pieces, so a smaller vocabulary must leave its rarest characters to byte pieces.
VOCABULARIES = {4000: 0.998, 8000: 1.0, 12000: 1.0, 16000: 1.0}


def _shape(dim: int, layers: int = 4, kv_heads: int = 1) -> list[str]:
    """Model shape overrides; head_dim stays 64 (n_heads = dim / 64)."""
    return ["--model.dim", str(dim), "--model.n_heads", str(dim // 64), "--model.n_kv_heads", str(kv_heads),
            "--model.n_layers", str(layers)]  # fmt: skip


# The first sweep's starting point (demo.yaml until this sweep chose its shape): the tiny preset as it is
# (dim 256, 4 layers, 4 heads / 2 kv heads) in fp32, lr 1e-3.
TINY_FP32 = [*_shape(256, kv_heads=2), "--train.precision", "fp32", "--optim.lr", "1e-3"]
# bf16 autocast: ~1.6x the tokens/s of fp32 on CPUs with AMX (docs/demo_sweep.md).
TINY_BF16 = [*_shape(256, kv_heads=2), "--train.precision", "bf16", "--optim.lr", "1e-3"]
D192_BF16 = [*_shape(192), "--train.precision", "bf16", "--optim.lr", "1e-3"]

# name -> (vocabulary, overrides of demo.yaml). "chosen" is demo.yaml as it is; every other candidate sets
# the shape, precision and learning rate it is measured at, so its meaning does not change with demo.yaml.
CANDIDATES: dict[str, tuple[int, list[str]]] = {
    "chosen": (8000, []),
    "base": (8000, TINY_FP32),
    "lr5e-4": (8000, [*TINY_FP32, "--optim.lr", "5e-4"]),
    "lr2e-3": (8000, [*TINY_FP32, "--optim.lr", "2e-3"]),
    "v4000": (4000, TINY_FP32),
    "v12000": (12000, TINY_FP32),
    "v16000": (16000, TINY_FP32),
    "batch4": (8000, [*TINY_FP32, "--data.batch_size", "4"]),
    "batch16": (8000, [*TINY_FP32, "--data.batch_size", "16"]),
    "seq128": (8000, [*TINY_FP32, "--data.seq_len", "128", "--data.batch_size", "16"]),
    "d192": (8000, [*TINY_FP32, *_shape(192)]),
    "bf16": (8000, TINY_BF16),
    "d192-bf16": (8000, D192_BF16),
    "d192-bf16-lr2e-3": (8000, [*D192_BF16, "--optim.lr", "2e-3"]),
    "d192-bf16-lr7e-4": (8000, [*D192_BF16, "--optim.lr", "7e-4"]),
    "d192-l6-bf16": (8000, [*D192_BF16, *_shape(192, layers=6)]),
    "d128-l6-bf16": (8000, [*D192_BF16, *_shape(128, layers=6)]),
    "v12000-bf16": (12000, TINY_BF16),
    "v12000-d192-bf16": (12000, D192_BF16),
}


def tokenizer_dir(root: Path, vocab: int) -> Path:
    return root / f"tok{vocab}"


def prepare(root: Path, vocabularies: list[int]) -> None:
    """The demo corpus, its shards and one tokenizer per vocabulary (each skipped when already there)."""
    sys.path.insert(0, str(REPO))
    from data.demo_corpus import fetch_demo_corpus
    from data.shard import shard_inputs
    from dataset.train_tokenizer import train_tokenizer

    if not (root / "shards" / "manifest.json").is_file():
        files = fetch_demo_corpus(root / "corpus", log=print)
        print(shard_inputs(files, root / "shards", workers=2).format(), flush=True)
    for vocab in vocabularies:
        if not (tokenizer_dir(root, vocab) / "tokenizer.model").is_file():
            train_tokenizer(
                str(root / "shards" / "*.jsonl.zst"),
                vocab,
                tokenizer_dir(root, vocab),
                sample_bytes=64 << 20,  # demo.py's; the demo corpus is smaller, so all of it
                character_coverage=VOCABULARIES[vocab],
                log=print,
            )


def run(
    root: Path,
    name: str,
    steps: int | None,
    *,
    eval_batches: int,
    eval_every: int | None,
    label: str,
    threads: int | None,
) -> dict:
    """One pretraining run of candidate `name` (at `steps` steps, or demo.yaml's / the candidate's own)."""
    vocab, overrides = CANDIDATES[name]
    out = root / "runs" / label
    subprocess.run(["rm", "-rf", str(out)], check=True)
    args = [
        "--data.shards", json.dumps([str(root / "shards" / "*.jsonl.zst")]),
        "--data.tokenizer", str(tokenizer_dir(root, vocab)),
        "--train.output_dir", str(out),
        "--train.eval_batches", str(eval_batches),
        "--train.checkpoint_every", "0",
        "--logging.sample_every", "0",
        "--logging.progress_bar", "false",
        "--logging.plot", "false",
        *overrides,
    ]  # fmt: skip
    if steps is not None:
        args += ["--train.max_steps", str(steps)]
    # By default validation at the end only (a step count that is never reached, the end always validates).
    args += ["--train.eval_every", str(eval_every or steps or 10**9)]
    start, cpu_start = time.perf_counter(), _children_cpu_s()
    command = [sys.executable, str(REPO / "pretrain_llama.py"), "--config", str(CONFIG), *args]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, _children_cpu_s() - cpu_start
    if result.returncode != 0:
        raise SystemExit(f"{label}: pretrain_llama.py failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    vals = [r for r in records if "val_loss" in r]
    val = vals[-1]
    speeds = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
    params = next((line for line in result.stdout.splitlines() if line.startswith("model: ")), "")
    return {
        "label": label,
        "threads": threads or "default",
        "candidate": name,
        "vocab": vocab,
        "overrides": " ".join(overrides),
        "parameters": params.split(" parameters")[0].removeprefix("model: "),
        "steps": val["step"],
        "tokens": records[-1]["tokens_seen"],
        "wall_s": round(wall, 1),
        "tokens_per_s": round(statistics.median(speeds)),
        # CPU seconds of the whole run (start-up, validation and export included) per 1k trained tokens:
        # less sensitive than wall time to other jobs on the machine.
        "cpu_s_per_1k_tokens": round(1000 * cpu / records[-1]["tokens_seen"], 3),
        "train_loss": records[-1].get("loss"),
        "val_loss": val["val_loss"],
        "val_bytes_per_token": val["val_bytes_per_token"],
        "val_bpb": val["val_bpb"],
        "val_bpb_curve": {r["step"]: round(r["val_bpb"], 4) for r in vals},
    }


def speeds(names: list[str], rounds: int, steps: int) -> dict[str, float]:
    """Training tokens/s of each candidate's model and batch shape (forward, backward, AdamW step on random
    ids), the best of `rounds` rounds that visit the candidates in turn: on a shared machine the best
    round is the one least slowed by other jobs, and interleaving slows every candidate alike."""
    import torch

    sys.path.insert(0, str(REPO))
    from common.config import parse_config
    from models.llama import Llama
    from pretrain_llama import PretrainConfig

    setups = {}
    for name in names:
        vocab, overrides = CANDIDATES[name]
        config = parse_config(
            PretrainConfig, ["--config", str(CONFIG), *overrides, "--model.vocab_size", str(vocab)]
        )
        torch.manual_seed(0)
        model = Llama(config.model, config.train.run_options()).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(0, vocab, (config.data.batch_size, config.data.seq_len))
        bf16 = config.train.precision == "bf16"
        setups[name] = (model, optimizer, ids, bf16)
    best = {name: 0.0 for name in names}
    for _ in range(rounds):
        for name, (model, optimizer, ids, bf16) in setups.items():
            for i in range(steps + 1):
                if i == 1:  # the first step of a round warms caches up
                    start = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # as the loop's bf16 does
                    loss = model(ids, labels=ids).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            best[name] = max(best[name], ids.numel() * steps / (time.perf_counter() - start))
    return best


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def table(results: list[dict]) -> str:
    head = (
        "| run | vocab | params | steps | tokens | threads | wall s | tokens/s | CPU s / 1k tokens | val loss "
        "| bytes/token | val bpb |"
    )
    rows = [head, "|" + "---|" * 12]
    for r in results:
        rows.append(
            f"| {r['label']} | {r['vocab']} | {r['parameters']} | {r['steps']} | {r['tokens']:,} | "
            f"{r.get('threads', 'default')} | {r['wall_s']:.0f} | {r['tokens_per_s']:,} | "
            f"{r.get('cpu_s_per_1k_tokens', float('nan')):.3f} | {r['val_loss']:.3f} | "
            f"{r['val_bytes_per_token']:.2f} | {r['val_bpb']:.3f} |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("candidates", nargs="*", help=f"candidates to run: {', '.join(CANDIDATES)}")
    parser.add_argument("--root", type=Path, default=Path("/tmp/sweep"), help="corpus, tokenizers, runs")
    parser.add_argument("--prepare", action="store_true", help="make the corpus, shards and tokenizers")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: each config's own)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the runs (default: torch's choice)")
    parser.add_argument("--speed", action="store_true", help="measure each candidate's tokens/s only")
    parser.add_argument("--eval-batches", type=int, default=16, help="held-out batches per validation")
    parser.add_argument(
        "--eval-every", type=int, help="validate every N steps too (default: at the end only)"
    )
    args = parser.parse_args()
    unknown = [name for name in args.candidates if name.split("@")[0] not in CANDIDATES]
    if unknown:
        parser.error(f"unknown candidate(s) {unknown}; choose from {', '.join(CANDIDATES)}")

    if args.speed:
        names = [spec.split("@")[0] for spec in args.candidates] or list(CANDIDATES)
        measured = speeds(names, rounds=3, steps=4)
        print(f"| candidate | tokens/s (best of 3 rounds) | relative to {names[0]} |")
        print("|---|---|---|")
        for name in names:
            print(f"| {name} | {measured[name]:,.0f} | {measured[name] / measured[names[0]]:.2f} |")
        return 0
    if args.prepare:
        prepare(args.root, sorted({CANDIDATES[name][0] for name in args.candidates or CANDIDATES}))
    results_path = args.root / "results.jsonl"
    for spec in args.candidates if not args.prepare else []:
        name, _, steps_text = spec.partition("@")
        steps = int(steps_text) if steps_text else args.steps
        label = f"{name}@{steps}" if steps else f"{name}@full"
        result = run(
            args.root,
            name,
            steps,
            eval_batches=args.eval_batches,
            eval_every=args.eval_every,
            label=label,
            threads=args.threads,
        )
        print(json.dumps(result), flush=True)
        with results_path.open("a") as f:
            f.write(json.dumps(result) + "\n")
    if results_path.is_file():
        print(table([json.loads(line) for line in results_path.read_text().splitlines() if line]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
