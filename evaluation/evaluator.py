"""Scoring a model on tasks and held-out text, and the results: a dict, a JSON file, a table, sample logs.

`task_samples(model, encoder, task)` encodes a task's requests (`<s>` + context, then the continuation encoded
on its own, as OLMo's in-loop evaluation does), scores them (evaluation/loglikelihood.py), generates the
answers of a `:generate` task (evaluation/generation.py) and gives one sample record per document;
`sample_figures` turns a task's records into its figures (evaluation/metrics.py), `score_task` does both.
`evaluate(...)` runs a list of tasks and the per-source bits per byte and returns

    {"model": ..., "tasks": {"arc_easy": {"accuracy", "centered", "chance", "bpb", "n", "metric"}, ...},
     "core": mean centered accuracy over CORE (null unless all ten were scored), "core_name": ...,
     "bpb": {source: bits per byte}}

Each task is batched on its own, so its numbers do not depend on which other tasks run with it: the same
model and tasks give the same numbers. Under several processes (`accelerate launch`) each rank scores every
`world`-th document of each task (`score_share`) and every `world`-th text of each source, and the records
are gathered in the task's order (`gather_shares`), so the figures are a single process's: the accuracies
exactly, bits per byte but for float rounding. training/evaluation.py shares the work over ranks the same way.
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
from evaluation.generation import exact_match, final_answer, generate_texts
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
    `gsm8k`: its default variant) or TASK:VARIANT (`arc_easy:mc_5shot`, `gsm8k:generate`: answers generated and
    matched exactly); [] for none (docs/evaluation.md)."""
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
    harness: Literal["", "lm-eval"] = ""
    """Empty = ours; lm-eval = run lm-evaluation-harness (pip install lm-eval) on --model instead, --tasks
    being its task names (--task_dir: a folder of its task YAMLs), reported in the same table and JSON."""


# ---------------------------------------------------------------------------------------------------
# Tasks


def task_requests(encoder: TextEncoder, choices: Sequence[Choice]) -> list[Request]:
    """Token requests for `choices`: <s> (if the tokenizer has one) + context, and the continuation."""
    contexts = list(dict.fromkeys(c.context for c in choices))
    encoded = dict(zip(contexts, encoder.encode(contexts)))
    continuations = encoder.encode([c.continuation for c in choices])
    prefix = () if encoder.bos_id is None else (encoder.bos_id,)
    return [Request(prefix + tuple(encoded[c.context]), tuple(ids)) for c, ids in zip(choices, continuations)]


def task_samples(
    model: Llama, encoder: TextEncoder, task: Task, *, batch_size: int = 16
) -> list[dict[str, Any]]:
    """One sample record per document (--log-samples): each choice's log-likelihood and sizes, the prediction
    and the gold; for a `:generate` task the generation, its extracted answer (`prediction`), the gold answer
    string and whether they match (`correct`), beside the gold continuation's score."""
    if not task.documents:
        return []
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
    if task.generation is not None:
        contexts = [document.choices[0].context for document in task.documents]
        texts = generate_texts(model, encoder, contexts, task.generation, batch_size=batch_size)
        for sample, document, text in zip(samples, task.documents, texts):
            answer = final_answer(text)
            assert document.answer is not None
            correct = exact_match(answer, document.answer, task.generation.regexes_to_ignore)
            sample.update(generation=text, prediction=answer, gold=document.answer, correct=correct)
    return samples


def sample_figures(task: Task, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The task's figures (with its `metric`) from its documents' sample records, in the task's order: those
    of evaluation/metrics.py, and for a `:generate` task the exact-match accuracy beside the gold bits per byte."""
    fields = [f.name for f in dataclasses.fields(ChoiceScore)]
    documents = [
        (
            [ChoiceScore(**{name: choice[name] for name in fields}) for choice in sample["choices"]],
            0 if task.generation is not None else sample["gold"],
        )
        for sample in samples
    ]
    figures = task_figures(documents, task.normalisation)
    if task.generation is not None:
        figures = {"accuracy": sum(sample["correct"] for sample in samples) / len(samples), **figures}
    return {**figures, "metric": task.metric}


def score_task(
    model: Llama, encoder: TextEncoder, task: Task, *, batch_size: int = 16
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The task's figures (with its `metric`) and one sample record per document (--log-samples)."""
    samples = task_samples(model, encoder, task, batch_size=batch_size)
    return sample_figures(task, samples), samples


def score_share(
    model: Llama, encoder: TextEncoder, task: Task, rank: int, world: int, *, batch_size: int = 16
) -> list[tuple[int, dict[str, Any]]]:
    """(index in the task, sample record) of every `world`-th document of the task from the `rank`-th."""
    indices = range(rank, len(task.documents), world)
    share = dataclasses.replace(task, documents=[task.documents[i] for i in indices])
    return list(zip(indices, task_samples(model, encoder, share, batch_size=batch_size)))


def gather_shares(shares: list[tuple[int, dict[str, Any]]], world: int) -> list[dict[str, Any]]:
    """Every rank's (index, record) pairs gathered (all ranks call it), as records in the task's order."""
    if world > 1:
        from accelerate.utils import gather_object

        shares = gather_object(shares)
    return [sample for _, sample in sorted(shares, key=lambda item: item[0])]


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
    rank: int = 0,
    world: int = 1,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The results dict (module docstring) and the sample records of every task. With `world` > 1 every rank
    calls it, scores its share and gets the whole results."""
    model.eval()
    results: dict[str, Any] = {"model": model_name, "tasks": {}}
    samples: list[dict[str, Any]] = []
    for task in tasks:
        start = time.perf_counter()
        scored = gather_shares(score_share(model, encoder, task, rank, world, batch_size=batch_size), world)
        figures = results["tasks"][task.name] = sample_figures(task, scored)
        samples += scored
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
            rank=rank,
            world=world,
        )
        if world > 1:
            from accelerate.utils import gather_object

            shares = gather_object(list(sources.items()))
            sources = {source: SourceBits() for source in sources}
            for source, share in shares:
                total = sources[source]
                total.documents, total.bytes = total.documents + share.documents, total.bytes + share.bytes
                total.bits += share.bits
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
