"""Forward+backward speed and peak memory of our Llama against transformers' LlamaForCausalLM (sdpa).

Both models get the same shape (the `tiny` preset by default) and the same batches. Every measurement runs in
a fresh subprocess so that peak RSS belongs to one model only; ours and theirs alternate (ours, theirs, ours,
...) so that load from other jobs hits both alike; each run warms up before timing; the figures are medians.

    python bench/bench_model.py                      # tiny preset, batch 8 x 256 tokens, 2 threads
    python bench/bench_model.py --preset 125m --batch-size 2 --seq-len 512 --rounds 3
    python bench/bench_model.py --profile            # torch.profiler table of where our step spends time
    python bench/bench_model.py --compile            # both models' decoder blocks torch.compiled

Ours runs as training runs it: train mode with labels, so the default `fused_cross_entropy: auto` computes
the LM head and loss chunk by chunk without the full logits; transformers runs as it ships (full logits,
then cross-entropy). Besides wall-clock tokens/s it reports CPU seconds per 1k tokens (process CPU time,
all threads), which load from other jobs on a shared machine distorts much less.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python bench/bench_model.py` from a fresh clone, without `pip install -e .`


def build(impl: str, preset: str, vocab_size: int, seq_len: int):
    import torch

    from models.llama import Llama, ModelConfig

    config = ModelConfig.from_preset(preset, vocab_size=vocab_size, max_seq_len=max(seq_len, 512))
    if impl == "ours":
        return Llama(config)
    from transformers import LlamaConfig, LlamaForCausalLM

    # transformers has no embedding LayerNorm: with the stable-embedding presets it does slightly less work.
    hf_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(hf_config)


def worker(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = build(args.worker, args.preset, args.vocab_size, args.seq_len).train()
    ids = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len))

    if args.compile:
        from models.kernels import compile_model

        compile_model(model)  # per decoder block, as train.compile does, for both models

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    warmup_s = time.perf_counter() - start
    times, cpu_times = [], []
    for _ in range(args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "times": times,
                "cpu_times": cpu_times,
                "warmup_s": warmup_s,
                "peak_delta_mib": (peak_kib - baseline_kib) / 1024,
            }
        )
    )


def profile(args: argparse.Namespace) -> None:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(args.threads)
    for impl in ("ours", "hf"):
        model = build(impl, args.preset, args.vocab_size, args.seq_len).train()
        ids = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len))
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                model(input_ids=ids, labels=ids).loss.backward()
        print(f"== {impl}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def run_worker(impl: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl]
    for flag in ("preset", "vocab_size", "batch_size", "seq_len", "threads", "warmup", "steps"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    cmd += ["--compile"] if args.compile else []
    env = {"OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{impl} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per subprocess")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating subprocess pairs (ours, transformers)"
    )
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables instead")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models' decoder blocks")
    parser.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.profile:
        profile(args)
        return

    results: dict[str, dict[str, list[float]]] = {
        impl: {"times": [], "cpu_times": [], "warmup_s": [], "mem": []} for impl in ("ours", "hf")
    }
    for _ in range(args.rounds):
        for impl in ("ours", "hf"):
            r = run_worker(impl, args)
            results[impl]["times"] += r["times"]
            results[impl]["cpu_times"] += r["cpu_times"]
            results[impl]["warmup_s"].append(r["warmup_s"])
            results[impl]["mem"].append(r["peak_delta_mib"])
    tokens = args.batch_size * args.seq_len
    rows = {}
    for impl, r in results.items():
        rows[impl] = {
            "tokens_per_s": tokens / statistics.median(r["times"]),
            "cpu_per_1k": statistics.median(r["cpu_times"]) / tokens * 1000,
            "warmup_s": statistics.median(r["warmup_s"]),
            "mem": statistics.median(r["mem"]),
        }
    ours, hf = rows["ours"], rows["hf"]
    print(
        f"preset {args.preset}, vocab {args.vocab_size}, batch {args.batch_size} x {args.seq_len}, "
        f"{args.threads} threads, {args.rounds} rounds x {args.steps} steps; "
        f"{platform.processor() or platform.machine()}, torch fwd+bwd fp32{', compiled' if args.compile else ''}"
    )
    print(
        f"| model | tokens/s (fwd+bwd) | CPU s / 1k tokens | peak RSS delta (MiB) | {args.warmup} warm-up steps s |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, r in (("Open-Llama `Llama`", ours), ("transformers `LlamaForCausalLM` (sdpa)", hf)):
        print(
            f"| {name} | {r['tokens_per_s']:,.0f} | {r['cpu_per_1k']:.3f} | {r['mem']:,.0f} | {r['warmup_s']:.1f} |"
        )
    print(
        f"| ratio ours / transformers | {ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x "
        f"| {hf['cpu_per_1k'] / ours['cpu_per_1k']:.2f}x less | {ours['mem'] / hf['mem']:.2f}x | |"
    )


if __name__ == "__main__":
    main()
