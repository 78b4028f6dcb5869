"""Training speed and peak memory of the `demo` preset: our Llama against transformers' LlamaForCausalLM.

Both models are trained by the same shared loop (training/loop.py) with the run config of
configs/pretrain/demo.yaml (model shape, micro-batch, sequence length, AdamW, schedule, precision) on the
same batches (fixed random token ids: speed does not depend on the text). transformers' model uses its
sdpa attention. Each run is a fresh subprocess, so its peak RSS is its own; ours and theirs alternate so
that load from other jobs hits both alike; each run times a second window of steps after a warm-up window.

    python bench/bench_train.py                    # demo preset, 2 threads, 3 rounds
    python bench/bench_train.py --steps 20 --rounds 5 --threads 2
    python bench/bench_train.py --compile          # both models with train.compile (per-block torch.compile)
    python bench/bench_train.py --precision bf16   # both models under bf16 autocast

Besides wall-clock tokens/s it reports CPU seconds per 1k tokens over the timed window (process CPU time,
all threads), which load from other jobs on a shared machine distorts much less than wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python bench/bench_train.py` from a fresh clone


def worker(args: argparse.Namespace) -> None:
    """Train one model for 2 x args.steps steps in this fresh process; print one JSON line."""
    import dataclasses
    import time

    import torch

    torch.set_num_threads(args.threads)
    from common.config import parse_config
    from common.memory import peak_rss_bytes
    from pretrain_llama import PretrainConfig
    from training.distributed import build_accelerator
    from training.loop import train
    from training.objectives import CausalLMObjective

    config = parse_config(PretrainConfig, ["--config", args.config])
    # Identical math on both sides: transformers has no embedding LayerNorm (BLOOM's stable embedding).
    config.model = dataclasses.replace(config.model, vocab_size=args.vocab_size, stable_embedding=False)
    out = Path(tempfile.mkdtemp(prefix="bench_train_"))
    config.train = dataclasses.replace(
        config.train,
        output_dir=str(out),
        max_steps=2 * args.steps,
        checkpoint_every=0,
        eval_every=0,
        export_hf=False,
        resume="",
        compile=args.compile,
        precision=args.precision or config.train.precision,
    )
    config.logging = dataclasses.replace(
        config.logging, log_every=args.steps, progress_bar=False, sample_every=0, plot=False
    )
    batch, seq = config.data.batch_size, config.data.seq_len

    cpu_at_batch: list[float] = []  # process CPU time when each batch is drawn, i.e. as each step starts

    class RandomBatches:
        """Random token rows, as a TrainingData stream (nothing to resume, nothing to count)."""

        def __iter__(self):
            g = torch.Generator().manual_seed(0)
            while True:
                ids = torch.randint(0, args.vocab_size, (batch, seq), generator=g)
                cpu_at_batch.append(time.process_time())
                yield {"input_ids": ids, "labels": ids.clone()}

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

        def counters(self):
            return {}

    torch.manual_seed(config.train.seed)
    if args.impl == "ours":
        from models.llama import Llama

        model = Llama(config.model, config.train.run_options())
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        from models.hf import hf_config_dict

        hf = hf_config_dict(
            config.model, tie_word_embeddings=config.model.tie_embeddings, dtype=torch.float32
        )
        model = LlamaForCausalLM(LlamaConfig(**hf, attn_implementation="sdpa"))
    accelerator = build_accelerator(config.train)
    train(model, RandomBatches(), CausalLMObjective(), config=config, accelerator=accelerator)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = records[-1]  # the second window: steps after the warm-up window
    warmup_s = args.steps * batch * seq / records[0]["tokens_per_s"]  # includes compiling with --compile
    peak_rss = peak_rss_bytes() / 2**20
    # CPU time of steps steps+1 .. 2*steps-1 (batch draws bound them; the last step's end has no draw).
    window = cpu_at_batch[2 * args.steps - 1] - cpu_at_batch[args.steps]
    cpu_s_per_1k = window / ((args.steps - 1) * batch * seq) * 1000
    print(
        json.dumps(
            {
                "impl": args.impl,
                "tokens_per_s": timed["tokens_per_s"],
                "peak_rss_mib": peak_rss,
                "cpu_s_per_1k_tokens": cpu_s_per_1k,
                "warmup_window_s": warmup_s,
            }
        )
    )


def run_one(impl: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", impl, "--config", args.config, "--steps", str(args.steps),
        "--threads", str(args.threads), "--vocab-size", str(args.vocab_size),
    ] + (["--compile"] if args.compile else []) + (["--precision", args.precision] if args.precision else [])  # fmt: skip
    env = {"OMP_NUM_THREADS": str(args.threads), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{impl} run failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(REPO / "configs/pretrain/demo.yaml"), help="run config")
    parser.add_argument("--steps", type=int, default=8, help="timed steps (after as many warm-up steps)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each model, alternating")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--vocab-size", type=int, default=8000, help="vocabulary size (the demo tokenizer's)")
    parser.add_argument(
        "--compile", action="store_true", help="train.compile: true for both models (per-block torch.compile)"
    )
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        help="train.precision for both models (default: the config's)",
    )
    parser.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2")
    if args.worker:
        args.impl = args.worker
        worker(args)
        return

    runs: dict[str, list[dict]] = {"ours": [], "hf": []}
    for _ in range(args.rounds):
        for impl in ("ours", "hf"):
            runs[impl].append(run_one(impl, args))
    median = {
        impl: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "impl"}
        for impl, rs in runs.items()
    }
    ours, hf = median["ours"], median["hf"]
    print(
        f"machine: {platform.processor() or platform.machine()}, {args.threads} threads, {args.rounds} rounds, "
        f"vocab {args.vocab_size}, precision {args.precision or 'as configured'}{', compiled' if args.compile else ''}"
    )
    print("| model | tokens/s | CPU s / 1k tokens | peak RSS MiB | warm-up window s |")
    print("|---|---:|---:|---:|---:|")
    for name, r in (("ours (`models/llama.py`)", ours), ("transformers LlamaForCausalLM (sdpa)", hf)):
        print(
            f"| {name} | {r['tokens_per_s']:,.0f} | {r['cpu_s_per_1k_tokens']:.3f} | {r['peak_rss_mib']:,.0f} "
            f"| {r['warmup_window_s']:.1f} |"
        )
    print(
        f"ratio ours/transformers: speed {ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x, "
        f"CPU time per token {hf['cpu_s_per_1k_tokens'] / ours['cpu_s_per_1k_tokens']:.2f}x less, "
        f"memory {ours['peak_rss_mib'] / hf['peak_rss_mib']:.2f}x"
    )
    print("per run:", json.dumps(runs))


if __name__ == "__main__":
    main()
