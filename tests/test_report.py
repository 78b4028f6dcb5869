"""The report card (training/report.py) on a run folder made by hand: what each section takes from the
sharder's manifest, metrics.jsonl and the inputs, the evaluation put in later, the model card's front matter.
The stages' own runs check their report.md and model card in test_training, test_sft and test_preference."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from data.shard import shard_inputs
from models.hf import NAME_KEY, export_hf, recorded_model_name
from models.llama import Llama
from tests.helpers.shards import synthetic_texts
from tests.helpers.training import front_matter
from training import report as card
from training.report import add_evaluation, model_card, run_name, write_report

EVALUATION = {
    "model": "runs/demo/sft/hf",
    "tasks": {
        "arc_easy": {"accuracy": 0.5, "centered": 1 / 3, "n": 40, "metric": "acc_per_char"},
        "piqa": {"accuracy": 0.55, "centered": 0.1, "n": 40, "metric": "acc_raw"},
    },
    "core": 0.2166,
    "bpb": {"pile": 2.25, "wudao": 3.5},
}
RECORDS = [
    {"step": 1, "loss": 6.5, "tokens_seen": 512, "elapsed_s": 2.0, "tokens_per_s": 256.0, "mfu": None,
     "memory_gib": 0.5, "bytes_per_token": 3.0, "tokens_per_source": {"pile": 300, "wudao": 212}},
    {"step": 2, "loss": 6.0, "tokens_seen": 1024, "elapsed_s": 4.0, "tokens_per_s": 256.0, "mfu": None,
     "memory_gib": 0.75, "bytes_per_token": 3.5, "tokens_per_source": {"pile": 600, "wudao": 424},
     "val_loss": 5.75, "val_ppl": 314.19, "val_bpb": 2.5, "val_bytes_per_token": 3.25,
     "samples": {"Once upon a": " time"}},
]  # fmt: skip


@pytest.fixture(scope="module")
def run(synthetic_tokdir, tiny_model_config, tmp_path_factory) -> Path:
    """A pretraining run folder under runs/: shards with a manifest (a duplicate and a malformed line
    dropped), its config.yaml and metrics.jsonl, an export."""
    root = tmp_path_factory.mktemp("report")
    inputs = root / "pile.jsonl"
    texts = synthetic_texts(40)
    lines = [json.dumps({"text": t}) for t in texts] + [json.dumps({"text": texts[0]}), "{not json"]
    inputs.write_text("\n".join(lines) + "\n")
    shard_inputs([inputs], root / "shards", source="pile")
    out = root / "runs" / "demo" / "pretrain"
    out.mkdir(parents=True)
    model = tiny_model_config(vocab_size=800)
    config = {
        "model": model.to_dict(),
        "data": {"shards": [str(root / "shards" / "*.jsonl.zst")], "tokenizer": str(synthetic_tokdir), "seq_len": 64,
                 "batch_size": 4},
        "init": "",
        "optim": {"lr": 0.001},
        "train": {"output_dir": str(out), "max_steps": 2, "precision": "fp32", "grad_accum_steps": 1},
        "logging": {"wandb_run_name": None},
    }  # fmt: skip
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    export_hf(Llama(model), out / "hf", synthetic_tokdir, name=run_name(out), card=model_card(out))
    return out


def test_the_run_name_is_the_output_folder_below_runs():
    assert run_name("runs/demo/sft") == "demo-sft"
    assert run_name("/data/x/runs/sft") == "sft"
    assert run_name("/data/experiments/sft") == "experiments-sft"
    assert run_name("runs/demo/sft", "my-model") == "my-model"  # logging.wandb_run_name names the run


def test_the_report_has_every_section_with_the_runs_figures(run):
    from accelerate import Accelerator

    write_report(run, accelerator=Accelerator(cpu=True))
    report = (run / "report.md").read_text()
    assert report.startswith("# demo-pretrain: pretraining report")
    # Data: the manifest's counts, what the stream counted.
    manifest = run.parents[2] / "shards" / "manifest.json"
    assert "| pile | 42 | 40 | 1 | 0 | 0 | 1 | 0 |" in report, report
    assert "- tokens per source (trained): pile 600, wudao 424" in report
    # Training and validation: metrics.jsonl's last records.
    assert "- steps: 2 of 2" in report and "- tokens: 1,024" in report
    assert "tokens/s: 256" in report and "peak memory: 0.75 GiB" in report and "MFU: n/a" in report
    assert "- loss: 6.5000 at the first step, 6.0000 at the last" in report
    assert "At step 2:\n- loss: 5.7500\n- perplexity: 314.1900\n- bits per byte: 2.5000" in report
    assert "- vocabulary: 800 " in report and "- bytes per token, pile: " in report
    assert "- bytes per token, held-out targets: 3.25" in report
    assert "Not evaluated yet: `python evaluate.py --model " in report
    assert "- `Once upon a` → ' time'" in report
    # Environment and provenance.
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=card.REPO, capture_output=True, text=True).stdout
    assert f"- git commit: {head.strip()}" in report and "- device: cpu: " in report
    assert f"manifest.json sha256 {hashlib.sha256(manifest.read_bytes()).hexdigest()}" in report
    tokenizer_model = (
        Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["tokenizer"]) / "tokenizer.model"
    )
    assert f"tokenizer.model sha256 {hashlib.sha256(tokenizer_model.read_bytes()).hexdigest()}" in report
    assert json.loads((run / "report.json").read_text())["training"]["tokens"] == 1024


def test_an_evaluation_goes_into_the_report_and_the_model_card(run):
    write_report(run)
    add_evaluation(run, EVALUATION)
    report = (run / "report.md").read_text()
    assert "| arc_easy | 0.5000 | 0.3333 | 40 | acc_per_char |" in report
    assert "CORE (mean centered accuracy): 0.2166" in report
    assert "Bits per byte by source: pile 2.2500, wudao 3.5000" in report
    text = (run / "hf" / "README.md").read_text()
    meta = front_matter(text)
    assert meta["license"] == "mit" and meta["pipeline_tag"] == "text-generation"
    [entry] = meta["model-index"]
    assert entry["name"] == "demo-pretrain" and "# demo-pretrain\n" in text
    scores = {r["dataset"]["type"]: r["metrics"][0] for r in entry["results"]}
    assert scores["arc_easy"]["type"] == "acc_per_char" and scores["arc_easy"]["value"] == 0.5
    assert scores["pile"]["type"] == "bits_per_byte" and scores["pile"]["value"] == 2.25
    assert "| piqa | 0.5500 | 0.1000 | 40 | acc_raw |" in text


def test_in_loop_scores_appear_without_an_offline_evaluation(run, tmp_path):
    """metrics.jsonl's last `eval/...` record (eval.tasks in the config) fills the downstream section."""
    scored = tmp_path / "runs" / "demo" / "pretrain"
    scored.mkdir(parents=True)
    (scored / "config.yaml").write_text((run / "config.yaml").read_text())
    in_loop = [
        {"step": 1, "eval/arc_easy/accuracy": 0.25, "eval/core": 0.01},
        {"step": 2, "eval/arc_easy/accuracy": 0.5, "eval/arc_easy/centered": 1 / 3, "eval/arc_easy/bpb": 1.75,
         "eval/core": 0.125, "eval/bpb/pile": 2.25},
    ]  # fmt: skip
    (scored / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*RECORDS, *in_loop]))
    write_report(scored)
    report = (scored / "report.md").read_text()
    downstream = report[report.index("## Downstream scores") : report.index("## Samples")]
    assert "Not evaluated yet" in downstream and "at step 2:" in downstream
    assert "| arc_easy | 0.5000 | 0.3333 | 1.7500 |" in downstream
    assert "CORE (mean centered accuracy): 0.1250" in downstream
    assert "Bits per byte by source: pile 2.2500" in downstream
    add_evaluation(scored, EVALUATION)  # the offline result first, the in-loop scores still below it
    downstream = (scored / "report.md").read_text().split("## Downstream scores")[1].split("## Samples")[0]
    assert downstream.index("| acc_per_char |") < downstream.index("at step 2:")


def test_a_tuned_models_card_names_its_base_by_the_name_its_export_records(run, tmp_path):
    tuned = tmp_path / "runs" / "demo" / "sft"
    tuned.mkdir(parents=True)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config.update(init=str(run / "hf"), lora={"enabled": False})
    config["data"] = {"files": ["chat.jsonl"], "tokenizer": str(run / "hf"), "seq_len": 64, "batch_size": 4,
                      "cache_dir": str(tmp_path / "prepared")}  # fmt: skip
    config["train"]["output_dir"] = str(tuned)
    (tuned / "config.yaml").write_text(yaml.safe_dump(config))
    (tuned / "metrics.jsonl").write_text(json.dumps(RECORDS[0]) + "\n")
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "report.json").write_text(
        json.dumps({"seq_len": 64, "sources": {"chat": {"spec": "chat.jsonl", "records": 7, "kept": 5, "tokens": 99,
                    "malformed": 2, "malformed_examples": []}}, "validation": {"chat": {"kept": 1}}})
    )  # fmt: skip
    assert recorded_model_name(run / "hf") == "demo-pretrain"
    meta = front_matter(model_card(tuned))
    assert meta["base_model"] == "demo-pretrain" and meta["model_name"] == "demo-sft"
    assert meta["language"] == ["en"] and "instruction-tuning" in meta["tags"]
    write_report(tuned)
    report = (tuned / "report.md").read_text()
    assert "| chat | 7 | 5 | 99 | 2 |" in report and "No validation" in report
    assert "- initial model `" in report and "weights sha256 " in report and "sha256 n/a" not in report


def test_the_export_records_its_name_where_transformers_keeps_it(run, tmp_path):
    from transformers import AutoModelForCausalLM

    assert json.loads((run / "hf" / "config.json").read_text())[NAME_KEY] == "demo-pretrain"
    AutoModelForCausalLM.from_pretrained(run / "hf").save_pretrained(tmp_path / "again")
    assert recorded_model_name(tmp_path / "again") == "demo-pretrain"
