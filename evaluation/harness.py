"""`evaluate.py --harness lm-eval`: lm-evaluation-harness on a model, reported in our results' shape.

lm-eval runs in a subprocess (`run_lm_eval`), for two reasons: it is optional (not installed by `make
setup`; `lm_eval_missing()` gives the one line that says how to install it), and our `evaluate.py` at the
repository root would shadow Hugging Face's `evaluate` library, which lm-eval imports. The subprocess runs
in a temporary folder (`python -c`, whose `sys.path[0]` is its working folder) with the repository root
taken out of `PYTHONPATH`, so `import evaluate` finds the library.

BOS handling (docs/export.md, "lm-evaluation-harness"): lm-eval's HF backend (`HFLM`) lets the tokenizer put
`<s>` first, right for multiple-choice and generation requests; for rolling log-likelihoods (perplexity
tasks) it prefixes `<s>` itself, so the tokenizer must not, or the model reads `<s> <s> text`. One model,
one run: `HFLM.loglikelihood_rolling` is run with `add_bos_token=False` (what `--model_args
add_bos_token=False` sets for a whole run), every other request type with the tokenizer's default.

`to_results` turns lm-eval's results into ours: {"tasks": {name: {"accuracy", "n", "metric", "bpb"}}};
`write_task` writes one of OLMo's request files as a local lm-eval task (YAML + JSON lines), the same
requests for both harnesses (bench/bench_evaluate.py, tests/test_harness.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from evaluation.tasks import Task

LM_EVAL_VERSION = "0.4.13"
INSTALL = f"pip install lm-eval=={LM_EVAL_VERSION}"
REPO_ROOT = Path(__file__).resolve().parent.parent
# Which lm-eval metric is a task's accuracy, in order of preference; `bits_per_byte` fills our `bpb`.
ACCURACY_METRICS = ("acc_norm", "acc", "exact_match", "acc_bytes", "f1", "mcc")
# lm-eval's multiple-choice metrics for OLMo's normalisations: `acc` argmaxes the summed log-likelihoods,
# `acc_norm` divides them by len(choice) in characters (the choice as written, with its leading space, as
# OLMo's `acc_per_char`), `acc_bytes` by its UTF-8 bytes. OLMo's per-token and unconditional ones have none.
LM_EVAL_METRIC = {"acc_raw": "acc", "acc_per_char": "acc_norm"}

DRIVER = r"""
import json, sys
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable

class HFLMOneBos(HFLM):
    # Rolling windows get <s> from lm-eval (prefix_token_id): the tokenizer must not add another.
    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        saved, self.add_bos_token = self.add_bos_token, False
        try:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        finally:
            self.add_bos_token = saved

args = json.loads(sys.argv[1])
lm = HFLMOneBos(pretrained=args["model"], device=args["device"], dtype=args["dtype"],
                batch_size=args["batch_size"])
out = simple_evaluate(model=lm, tasks=args["tasks"], limit=args["limit"], log_samples=args["log_samples"],
                      task_manager=TaskManager(include_path=args["include_path"]))
keep = {k: out.get(k) for k in ("results", "n-samples", "group_subtasks", "configs", "samples")}
with open(args["output"], "w") as f:
    json.dump(keep, f, default=handle_non_serializable)
"""


def lm_eval_missing() -> str | None:
    """None when lm-eval can be imported by this interpreter, else the one line that says how to get it."""
    if importlib.util.find_spec("lm_eval") is None:
        return f"--harness lm-eval needs lm-evaluation-harness in this environment: {INSTALL}"
    return None


def run_lm_eval(
    model: str,
    tasks: list[str],
    *,
    include_path: str = "",
    limit: int = 0,
    batch_size: int = 16,
    device: str = "cpu",
    dtype: str = "float32",
    log_samples: bool = False,
) -> dict[str, Any]:
    """lm-eval's results (`results`, `n-samples`, `group_subtasks`, `configs`, and `samples` with
    `log_samples`) for `model` on `tasks` (lm-eval task names; `include_path` a folder of task YAMLs).
    A failed run (an unknown task name, a model lm-eval cannot load) is a ValueError with its last line."""
    with tempfile.TemporaryDirectory(prefix="lm-eval-") as work:
        output = Path(work) / "results.json"
        args = {
            "model": str(Path(model).resolve()) if Path(model).exists() else model,
            "tasks": tasks,
            "include_path": str(Path(include_path).resolve()) if include_path else None,
            "limit": limit or None,
            "batch_size": batch_size,
            "device": device,
            "dtype": dtype,
            "log_samples": log_samples,
            "output": str(output),
        }
        env = dict(os.environ)
        paths = [
            p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO_ROOT
        ]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        run = subprocess.run(
            [sys.executable, "-c", DRIVER, json.dumps(args)],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
        )
        if run.returncode != 0:
            lines = (run.stderr or run.stdout).strip().splitlines() or ["(no output)"]
            raise ValueError(f"lm-eval failed (exit status {run.returncode}): {lines[-1]}")
        return json.loads(output.read_text())


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def to_results(raw: dict[str, Any], model_name: str) -> dict[str, Any]:
    """Our results dict (evaluation/evaluator.py) from lm-eval's: per task its accuracy under the first of
    ACCURACY_METRICS it reports (lm-eval's name in `metric`), `n` documents and `bpb` when it has one."""
    counts = {name: int(n["effective"]) for name, n in (raw.get("n-samples") or {}).items()}
    for group, subtasks in (raw.get("group_subtasks") or {}).items():
        counts.setdefault(group, sum(counts.get(task, 0) for task in subtasks))
    tasks: dict[str, Any] = {}
    for name, figures in raw["results"].items():
        values = {key.split(",")[0]: _number(v) for key, v in figures.items() if "_stderr" not in key}
        metric = next((m for m in ACCURACY_METRICS if values.get(m) is not None), None)
        if metric is None:
            metric = next((m for m, v in values.items() if v is not None and m != "bits_per_byte"), "")
        tasks[name] = {
            "accuracy": values.get(metric),
            "n": counts.get(name, 0),
            "metric": metric or "bits_per_byte",
            "bpb": values.get("bits_per_byte"),
        }
    return {
        "model": model_name,
        "harness": f"lm-eval {LM_EVAL_VERSION}",
        "tasks": tasks,
        "core": None,
        "core_name": "",
        "bpb": {},
        "bpb_documents": {},
    }


def to_samples(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """lm-eval's `samples` as --log-samples lines: task, doc_id, each request's arguments and response (for
    multiple choice, each choice's continuation and log-likelihood), the target and the task's metrics."""
    lines = []
    for task, samples in (raw.get("samples") or {}).items():
        for sample in samples:
            line: dict[str, Any] = {"task": task, "doc_id": sample["doc_id"]}
            arguments = sample.get("arguments", [])
            if isinstance(arguments, dict):  # {"gen_args_0": {"arg_0": context, "arg_1": continuation}, ...}
                arguments = [list(a.values()) for a in arguments.values()]
            responses = sample.get("filtered_resps", sample.get("resps", []))
            if all(isinstance(r, list) and len(r) == 2 and isinstance(r[1], bool) for r in responses):
                line["choices"] = [
                    {"continuation": a[1], "loglikelihood": r[0]} for a, r in zip(arguments, responses)
                ]
            else:
                line["arguments"], line["responses"] = arguments, responses
            line["target"] = sample.get("target")
            line.update({k: v for k, v in sample.items() if _number(v) is not None and k != "doc_id"})
            lines.append(line)
    return lines


def write_task(task: Task, folder: Path, name: str = "") -> str:
    """OLMo's requests of `task` as a local lm-eval multiple-choice task `name` in `folder` (its YAML and
    JSON lines): the document's context as the prompt, the continuations as the choices (their leading
    spaces kept, target_delimiter ""), zero-shot (OLMo's requests hold their few-shot examples), the
    metric that matches the task's normalisation (LM_EVAL_METRIC). Returns the task's name."""
    if task.metric not in LM_EVAL_METRIC:
        raise ValueError(f"{task.name}: lm-eval has no metric for {task.metric}")
    name = name or "olmo_" + task.name.replace(":", "_")
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for document in task.documents:
            contexts = {c.context for c in document.choices}
            if len(contexts) != 1:
                raise ValueError(f"{task.name}: document {document.id} has several contexts")
            line = {
                "id": str(document.id),
                "context": document.choices[0].context,
                "choices": [c.continuation for c in document.choices],
                "gold": document.gold,
            }
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": "",
        "num_fewshot": 0,
        "metric_list": [{"metric": LM_EVAL_METRIC[task.metric]}],
    }
    (folder / f"{name}.yaml").write_text(json.dumps(config, indent=1, ensure_ascii=False) + "\n")
    return name
