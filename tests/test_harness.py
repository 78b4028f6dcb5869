"""`evaluate.py --harness lm-eval` and evaluation/harness.py, checked against lm-evaluation-harness itself.

- on the same export and requests (OLMo-format task files written as a local lm-eval task), our
  per-document log-likelihoods equal lm-eval's (its log_samples) to 1e-4, and the accuracies are equal under
  the matching metrics (acc_raw = lm-eval's acc, acc_per_char = its acc_norm);
- `--harness lm-eval` writes our table and JSON shape;
- without lm-eval, `--harness lm-eval` is one line and exit status 2.

The lm-eval tests skip unless lm-eval is importable here: `.venv/bin/pip install lm-eval==0.4.13`.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import evaluate
from evaluation import harness
from evaluation.encoding import TextEncoder
from evaluation.evaluator import score_task
from evaluation.tasks import load_task, resolve_tasks
from models.hf import load_hf
from tests.helpers.eval_tasks import colour_documents, write_task

needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason=f"lm-eval is not installed ({harness.INSTALL}, e.g. .venv/bin/pip install lm-eval==0.4.13)",
)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """Two OLMo-format tasks (acc_raw, acc_per_char) and the same requests as local lm-eval tasks."""
    root = tmp_path_factory.mktemp("harness")
    loaded, names = [], []
    for name, metric in (("syn_raw", "acc_raw"), ("syn_char", "acc_per_char")):
        write_task(root / "olmo", name, "rc_5shot", colour_documents(10, seed=len(name)), metric)
        task = load_task(name, resolve_tasks([name], root / "olmo")[name])
        loaded.append(task)
        names.append(harness.write_task(task, root / "lm"))
    return loaded, names, root / "lm"


@needs_lm_eval
def test_loglikelihoods_and_accuracies_equal_lm_evals(our_folder, tasks, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    loaded, names, include = tasks
    raw = harness.run_lm_eval(
        str(our_folder), names, include_path=str(include), batch_size=4, log_samples=True
    )
    model = load_hf(our_folder)
    encoder = TextEncoder(our_folder)
    for task, name in zip(loaded, names):
        figures, samples = score_task(model, encoder, task, batch_size=4)
        theirs = raw["samples"][name]
        assert len(theirs) == len(samples) == len(task.documents)
        for sample in theirs:
            ours = samples[sample["doc_id"]]["choices"]
            lls = [float(r[0]) for r in sample["filtered_resps"]]
            assert lls == pytest.approx([c["loglikelihood"] for c in ours], abs=1e-4)
        metric = harness.LM_EVAL_METRIC[task.metric]
        assert figures["accuracy"] == raw["results"][name][f"{metric},none"]


@needs_lm_eval
def test_harness_mode_writes_our_shape(our_folder, tasks, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _, names, include = tasks
    output, log = tmp_path / "scores.json", tmp_path / "samples.jsonl"
    argv = ["--model", str(our_folder), "--harness", "lm-eval", "--tasks", ",".join(names)]
    argv += ["--task-dir", str(include), "--limit", "4", "--output", str(output), "--log-samples", str(log)]
    assert evaluate.main(argv) == 0
    results = json.loads(output.read_text())
    assert results["harness"] == f"lm-eval {harness.LM_EVAL_VERSION}"
    assert set(results["tasks"]) == set(names)
    for name, figures in results["tasks"].items():
        assert figures["n"] == 4
        assert figures["metric"] == ("acc" if "raw" in name else "acc_norm")
        assert 0.0 <= figures["accuracy"] <= 1.0
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 8
    assert all(len(line["choices"]) == 4 for line in lines)
    table = capsys.readouterr().out
    assert all(name in table for name in names)


def test_harness_without_lm_eval_is_one_line(our_folder, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a)
    )
    output = tmp_path / "scores.json"
    argv = [
        "--model",
        str(our_folder),
        "--harness",
        "lm-eval",
        "--tasks",
        "arc_easy",
        "--output",
        str(output),
    ]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "pip install lm-eval==" in err[0]
    assert not output.exists()


def test_write_task_refuses_a_normalisation_lm_eval_lacks(tmp_path):
    write_task(tmp_path / "olmo", "syn_token", "rc_5shot", colour_documents(2), "acc_per_token")
    task = load_task("syn_token", resolve_tasks(["syn_token"], tmp_path / "olmo")["syn_token"])
    with pytest.raises(ValueError, match="no metric"):
        harness.write_task(task, tmp_path / "lm")
    assert not Path(tmp_path / "lm").exists()
