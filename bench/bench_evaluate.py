"""evaluate.py against lm-evaluation-harness's HF backend: documents per second, same export and requests.

    python bench/bench_evaluate.py [--model EXPORT] [--tasks arc_easy,piqa] [--limit 200] [--batch-size 16]

Needs lm-eval in this environment (`pip install lm-eval==0.4.13`; the bench installs nothing). OLMo's request
files for the tasks (their `rc_5shot` variants, first `--limit` documents) are written as local lm-eval
multiple-choice tasks (evaluation/harness.py `write_task`: the same contexts and continuations, zero-shot,
the metric that matches each task's normalisation: `acc` for acc_raw, `acc_norm` for acc_per_char). Then, in
the same run, each as a user runs it, from a cold start (imports, model load, scoring):

- ours: `python evaluate.py --model EXPORT --tasks ... --limit N --log-samples ...`;
- theirs: `lm_eval --model hf --model_args pretrained=EXPORT,dtype=float32 --include_path DIR --tasks ...
  --log_samples` (in a temporary folder: our evaluate.py at the repository root would shadow Hugging Face's
  `evaluate` library, which lm-eval imports).

Both log every choice's log-likelihood; the bench prints the largest difference and each task's accuracy
from both, and fails unless they agree (1e-6 relative, equal accuracies). Without --model the export is a random
tiny Llama (dim 128, 4 layers, 2048 positions: OLMo's 5-shot contexts fit, so neither side truncates) with a
4k tokenizer trained on the tasks' own text. Goal: ours >= 2x lm-eval's documents per second. Prints a
markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from evaluation.harness import INSTALL, REPO_ROOT, lm_eval_missing, write_task  # noqa: E402
from evaluation.tasks import load_task, resolve_tasks, task_dir  # noqa: E402


def build_export(tasks, root: Path) -> Path:
    """A random tiny Llama export whose tokenizer (4k) is trained on the tasks' contexts and choices."""
    import torch
    from transformers import AutoTokenizer

    from dataset.train_tokenizer import train_tokenizer
    from models.hf import export_hf
    from models.llama import Llama, ModelConfig
    from tests.helpers.shards import write_shard

    texts = list(
        dict.fromkeys(c.context + c.continuation for task in tasks for d in task.documents for c in d.choices)
    )
    root.mkdir(parents=True, exist_ok=True)
    write_shard(root / "part-tasks-0.jsonl.zst", texts, source="tasks")
    tokdir = train_tokenizer([str(root / "part-tasks-0.jsonl.zst")], 4000, root / "tokenizer")
    vocab = len(AutoTokenizer.from_pretrained(str(tokdir)))
    torch.manual_seed(0)
    config = ModelConfig.from_preset(
        "tiny", vocab_size=vocab, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=2048
    )
    return export_hf(Llama(config), root / "model", tokenizer_dir=tokdir, name="bench-evaluate")


def timed(command: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    run = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        sys.exit(f"{command[:3]} failed:\n{run.stderr[-3000:]}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="", help="an export (Hugging Face Llama folder); default: a tiny one"
    )
    parser.add_argument("--tasks", default="arc_easy,piqa", help="OLMo task names (their default variant)")
    parser.add_argument("--limit", type=int, default=200, help="documents per task (0 = all)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    missing = lm_eval_missing()
    if missing:
        print(f"bench_evaluate.py: lm-eval is not installed: {INSTALL}", file=sys.stderr)
        return 2
    names = args.tasks.split(",")
    paths = resolve_tasks(names, task_dir())
    tasks = [load_task(name, path, args.limit) for name, path in paths.items()]
    documents = sum(len(task.documents) for task in tasks)
    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as tmp:
        root = Path(tmp)
        model = Path(args.model).resolve() if args.model else build_export(tasks, root / "export")
        lm_names = {task.name: write_task(task, root / "lm_tasks") for task in tasks}
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO_ROOT
        )
        ours = [sys.executable, str(REPO / "evaluate.py"), "--model", str(model), "--tasks", args.tasks]
        ours += ["--limit", str(args.limit), "--batch-size", str(args.batch_size), "--device", "cpu"]
        ours += ["--output", str(root / "ours.json"), "--log-samples", str(root / "ours.jsonl")]
        theirs = [sys.executable, "-m", "lm_eval", "--model", "hf"]
        theirs += ["--model_args", f"pretrained={model},dtype=float32", "--device", "cpu"]
        theirs += ["--include_path", str(root / "lm_tasks"), "--tasks", ",".join(lm_names.values())]
        theirs += [
            "--batch_size",
            str(args.batch_size),
            "--output_path",
            str(root / "lm_out"),
            "--log_samples",
        ]
        work = root / "work"
        work.mkdir()
        ours_s = timed(ours, REPO, env)
        theirs_s = timed(theirs, work, env)

        our_results = json.loads((root / "ours.json").read_text())["tasks"]
        our_lls = {}
        for line in (root / "ours.jsonl").read_text().splitlines():
            sample = json.loads(line)
            our_lls[sample["task"], sample["doc_id"]] = [c["loglikelihood"] for c in sample["choices"]]
        worst, agree = 0.0, True
        rows = []
        for task in tasks:
            lm_name = lm_names[task.name]
            results = next((root / "lm_out").rglob("results_*.json"))
            theirs_acc = json.loads(results.read_text())["results"][lm_name]
            metric = next(k for k in theirs_acc if k.startswith("acc") and "stderr" not in k)
            samples = next((root / "lm_out").rglob(f"samples_{lm_name}_*.jsonl"))
            for line in samples.read_text().splitlines():
                sample = json.loads(line)
                doc_id = task.documents[sample["doc_id"]].doc_id
                # The CLI's sample log writes a response as strings: ["-12.5", "False"]
                lls = [float(r[0]) for r in sample["filtered_resps"]]
                # float32 sums over hundreds of tokens: compare relative to the magnitude (-256 -> 2.6e-4)
                worst = max(
                    worst, *(abs(a - b) / max(1, abs(b)) for a, b in zip(lls, our_lls[task.name, doc_id]))
                )
            ours_acc = our_results[task.name]["accuracy"]
            agree &= abs(ours_acc - theirs_acc[metric]) < 1e-12
            rows.append(
                f"{task.name} ({task.metric} = lm-eval {metric.split(',')[0]}): "
                f"ours {ours_acc:.4f}, lm-eval {theirs_acc[metric]:.4f}"
            )
        agree &= worst <= 1e-6
    print("\n".join(rows))
    print(
        f"largest log-likelihood difference, relative to max(1, |ll|): {worst:.2e} ({'agree' if agree else 'DISAGREE'})"
    )
    print(
        f"\n{date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{documents} documents ({args.tasks}, --limit {args.limit}), batch {args.batch_size}\n"
    )
    print("| harness | seconds | documents/s | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| evaluate.py | {ours_s:.1f} | {documents / ours_s:.1f} | {theirs_s / ours_s:.2f}x |")
    print(f"| lm-eval 0.4.13 `--model hf` | {theirs_s:.1f} | {documents / theirs_s:.1f} | 1.00x |")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
