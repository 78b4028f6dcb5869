"""Instruction tuning end to end: `instruction_tuning.py` in subprocesses on real conversations from
../shared/corpus/sft (skipped without it), on a tiny model, fp32 on CPU so that runs compare bit for bit.

One full fine-tuning run memorises 20 real conversations; from its exported folder, stock transformers
renders our ids and mask and generates the answers, stopping at <|end|>. A LoRA run continues from that
export. Killed runs resume exactly; one batch of 8 equals 8 accumulated batches of 1 and two processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import torch
import yaml
from safetensors.torch import load_file

from dataset.chat_sources import iter_source, parse_sources
from dataset.chat_template import render_chat
from dataset.tokenizer import Tokenizer
from models.hf import export_hf
from models.llama import Llama, ModelConfig
from tests.helpers.chat import MULTI_TURN, train_chat_tokenizer
from tests.helpers.training import check_report_and_card
from training import faults
from training.pretrained import load_initial_model
from training.report import run_name

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
ACCELERATE = [
    str(Path(PYTHON).parent / "accelerate"),
    "launch",
    "--config_file",
    str(REPO / "configs/accelerate/cpu.yaml"),
]
OVERFIT_STEPS = 100


# ---------------------------------------------------------------------------------------------------
# Real conversations, a tokenizer trained on them, a random starting model


def pick_conversations(corpus: Path) -> tuple[list[dict], list[dict], list[dict]]:
    """20 short real conversations (10 alpaca records; 10 ShareGPT ones, one multi-turn, one with a system
    prompt) with distinct prompts, and 4 other ShareGPT conversations to hold out."""
    alpaca = json.loads((corpus / "alpaca_en_zh.json").read_text())
    short_alpaca = [
        r for r in alpaca if len(r["output"]) < 160 and len(r["instruction"]) + len(r["input"]) < 200
    ]
    share = [json.loads(line) for line in (corpus / "sharegpt.jsonl").read_text().splitlines()]
    prompts: set[str] = set()
    unique = []
    for record in share:
        first = next(t["value"] for t in record["conversations"] if t["from"] == "human")
        if first not in prompts:
            prompts.add(first)
            unique.append(record)
    length = lambda r: sum(len(t["value"]) for t in r["conversations"])  # noqa: E731
    single = [r for r in unique if len(r["conversations"]) == 2 and length(r) < 100]
    multi = next(r for r in unique if len(r["conversations"]) >= 4 and length(r) < 200)
    system = next(r for r in unique if r["conversations"][0]["from"] == "system" and length(r) < 60)
    chats = [*single[:8], multi, system]
    return short_alpaca[:10], chats, single[8:12]


@pytest.fixture(scope="module")
def sft_data(shared_corpus, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sft")
    corpus = shared_corpus / "sft"
    texts = [
        " ".join([r["instruction"], r["input"], r["output"]])
        for r in json.loads((corpus / "alpaca_en_zh.json").read_text())
    ]
    texts += [
        "\n".join(t["value"] for t in json.loads(line)["conversations"])
        for line in (corpus / "sharegpt.jsonl").read_text().splitlines()
    ]
    tokdir = train_chat_tokenizer(root / "tok", texts, 2000)
    alpaca, chats, held_out = pick_conversations(corpus)
    files = {"alpaca": root / "alpaca.json", "chat": root / "chat.jsonl", "held_out": root / "held_out.jsonl"}
    files["alpaca"].write_text(json.dumps(alpaca, ensure_ascii=False))
    files["chat"].write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in chats))
    files["held_out"].write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in held_out))
    conversations = [
        r.messages for s in parse_sources([str(files["alpaca"]), str(files["chat"])]) for r in iter_source(s)
    ]
    tokenizer = Tokenizer.load(tokdir)
    torch.manual_seed(0)
    shape = ModelConfig.from_preset(
        "tiny", vocab_size=tokenizer.vocab_size, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256
    )
    init = export_hf(Llama(shape), root / "init", tokenizer_dir=tokdir)
    return {"root": root, "tokenizer": tokdir, "files": files, "conversations": conversations, "init": init}


def sft_config(sft_data: dict, out: Path, **sections) -> Path:
    """A tiny fp32 run on the 20 conversations from the random init (constant lr after warmup, so a shorter
    run is a prefix of a longer one); section overrides update the defaults."""
    config = {
        "init": str(sft_data["init"]),
        "data": {
            "files": [str(sft_data["files"]["alpaca"]), str(sft_data["files"]["chat"])],
            "validation_files": [str(sft_data["files"]["held_out"])],
            "seq_len": 256,
            "batch_size": 4,
            "pack_block": 64,
        },
        "optim": {"lr": 3e-3, "warmup_steps": 5, "min_lr_ratio": 1.0, "weight_decay": 0.0},
        "train": {
            "output_dir": str(out),
            "max_steps": OVERFIT_STEPS,
            "precision": "fp32",
            "checkpoint_every": 10,
            "keep_last": 0,
            "eval_every": 50,
            "eval_batches": 2,
        },
        "logging": {"log_every": 1, "progress_bar": False, "sample_every": 0, "plot": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    return path


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def run(
    config: Path, *args: str, launcher: list[str] | None = None, **env_extra: str
) -> subprocess.CompletedProcess:
    cmd = [*(launcher or [PYTHON]), str(REPO / "instruction_tuning.py"), "--config", str(config), *args]
    return subprocess.run(cmd, cwd=REPO, env=env(**env_extra), capture_output=True, text=True, timeout=600)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(out) if r.get("loss") is not None}


@pytest.fixture(scope="module")
def full_run(sft_data) -> Path:
    out = sft_data["root"] / "full"
    result = run(sft_config(sft_data, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


# ---------------------------------------------------------------------------------------------------
# Full fine-tuning: memorise, export, generate in stock transformers


def test_the_model_memorises_real_conversations_and_answers_them_in_stock_transformers(sft_data, full_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    history = records(full_run)
    assert history[0]["loss"] > 5 and history[-1]["loss"] < 0.05 and history[-1]["token_accuracy"] == 1.0
    hf_tokenizer = AutoTokenizer.from_pretrained(full_run / "hf")
    model = AutoModelForCausalLM.from_pretrained(full_run / "hf").eval()
    tokenizer = Tokenizer.load(sft_data["tokenizer"])
    end = tokenizer.role_ids["end"]
    assert model.generation_config.eos_token_id == [tokenizer.eos_id, end]  # the export stops at <|end|>
    for messages in sft_data["conversations"]:
        prompt = hf_tokenizer.apply_chat_template(
            messages[:-1], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        answer = tokenizer.encode(messages[-1]["content"])
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=len(answer) + 10, do_sample=False)
        new = out[0, prompt["input_ids"].shape[1] :].tolist()
        assert new == [*answer, end], (messages, hf_tokenizer.decode(new))


def test_the_exported_folder_renders_our_ids_and_mask(sft_data, full_run):
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(full_run / "hf")
    tokenizer = Tokenizer.load(full_run / "hf")
    conversations = [MULTI_TURN, *sft_data["conversations"]]
    assert any(m[0]["role"] == "system" and len(m) > 3 for m in conversations)
    for messages in conversations:
        ours = render_chat(tokenizer, messages)
        theirs = hf_tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert theirs["input_ids"] == ours.ids
        assert theirs["assistant_masks"] == [int(t) for t in ours.trained]


def test_the_run_logs_its_metrics_and_saves_what_rebuilds_it(sft_data, full_run):
    history = records(full_run)
    validated = [r for r in history if "val_loss" in r]
    assert [r["step"] for r in validated] == [50, 100]
    assert validated[-1]["val_token_accuracy"] > 0 and validated[-1]["val_ppl"] > 1
    last = history[-1]
    trained = sum(last["trained_tokens_per_source"].values())
    assert set(last["tokens_per_source"]) == {"alpaca", "chat"} and 0 < trained < sum(
        last["tokens_per_source"].values()
    )
    assert sum(last["conversations_per_source"].values()) >= 20 * 5  # several passes over the 20
    saved = yaml.safe_load((full_run / "step-100" / "config.yaml").read_text())
    assert saved["init"] == str(sft_data["init"]) and saved["model"]["dim"] == 128
    assert saved["data"]["tokenizer"] == str(sft_data["init"])  # the init folder's own tokenizer
    assert (full_run / "data" / "report.json").is_file()
    # The report card and the model card: the prepared data's figures, the --init model as base_model.
    meta = check_report_and_card(full_run, name=run_name(full_run), base_model=str(sft_data["init"]))
    assert "tags" in meta and "instruction-tuning" in meta["tags"]
    report = (full_run / "report.md").read_text()
    assert "| alpaca | 10 | 10 |" in report and "- initial model `" in report
    # --init takes the checkpoint, or the run folder (its latest checkpoint): the same model as the export.
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(full_run / "hf").eval()
    ids = torch.tensor([render_chat(Tokenizer.load(full_run / "hf"), sft_data["conversations"][0]).ids])
    for init in (full_run, full_run / "step-100"):
        ours = load_initial_model(init).eval()
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_kill_9_during_a_checkpoint_then_resume_auto_is_exact(sft_data, full_run, tmp_path):
    out = tmp_path / "killed"
    config = sft_config(sft_data, out, train={"max_steps": 30})  # a prefix of the full run (constant lr)
    result = run(config, **{faults.KILL_DURING_CHECKPOINT_ENV: "20"})
    assert result.returncode == -signal.SIGKILL
    assert (out / "latest").read_text().strip() == "step-10"
    result = run(config, "--resume", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(step 10)" in result.stderr
    reference = losses(full_run)
    assert losses(out) == {step: reference[step] for step in range(1, 31)}
    for name, tensor in load_file(full_run / "step-30" / "model.safetensors").items():
        assert torch.equal(tensor, load_file(out / "step-30" / "model.safetensors")[name]), name


def test_the_preview_prints_the_report_and_marks_the_trained_tokens(sft_data, tmp_path):
    config = sft_config(sft_data, tmp_path / "preview")
    cmd = [PYTHON, str(REPO / "dataset" / "chat_preview.py"), "--config", str(config), "--show.samples", "2"]
    result = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "alpaca (" in result.stdout and "10 records, 10 kept" in result.stdout
    assert "held out held_out" in result.stdout and "batch 0:" in result.stdout
    assert result.stdout.count("<|assistant|>⟦") >= 2 and "<|end|>⟧" in result.stdout


# ---------------------------------------------------------------------------------------------------
# LoRA: from the full run's export, adapters only in checkpoints, merged on export, exact resume


@pytest.fixture(scope="module")
def lora_run(sft_data, full_run) -> Path:
    out = sft_data["root"] / "lora"
    config = sft_config(
        sft_data,
        out,
        init=str(full_run / "hf"),
        lora={"rank": 4, "alpha": 8, "dropout": 0.1},
        neftune_alpha=5.0,  # noise and dropout: resume must restore the random generators
        train={"max_steps": 20, "checkpoint_every": 5},
    )
    result = run(config)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_lora_checkpoints_hold_the_adapters_and_the_export_is_merged(sft_data, full_run, lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    saved = load_file(lora_run / "step-20" / "model.safetensors")
    assert saved and all(".lora_A." in n or ".lora_B." in n for n in saved)  # no frozen weight
    assert any(t.abs().sum() > 0 for n, t in saved.items() if ".lora_B." in n)  # B starts at 0: it trained
    merged = AutoModelForCausalLM.from_pretrained(lora_run / "hf").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())  # a plain Llama
    base = AutoModelForCausalLM.from_pretrained(full_run / "hf").eval()
    adapted = PeftModel.from_pretrained(base, lora_run / "adapter").eval()  # the adapter alone, in stock peft
    ids = torch.tensor([render_chat(Tokenizer.load(lora_run / "hf"), sft_data["conversations"][3]).ids])
    with torch.no_grad():
        want = merged(ids).logits
        torch.testing.assert_close(adapted(ids).logits, want, rtol=1e-4, atol=1e-4)
        # --init from the LoRA checkpoint: its adapters merged into the model its own init names.
        torch.testing.assert_close(
            load_initial_model(lora_run).eval()(ids).logits, want, rtol=1e-4, atol=1e-4
        )
    config = yaml.safe_load((lora_run / "config.yaml").read_text())
    assert config["lora"]["rank"] == 4 and config["init"] == str(full_run / "hf")


def test_lora_merged_equals_unmerged(tiny_model_config):
    from training.lora import LoraConfig, add_lora, peft_model_from_state

    torch.manual_seed(0)
    shape = tiny_model_config(vocab_size=97, dim=32, n_kv_heads=4, stable_embedding=True, tie_embeddings=True)
    model = add_lora(Llama(shape), LoraConfig(rank=4, dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.1)
    ids = torch.randint(0, 97, (2, 12))
    model.eval()
    with torch.no_grad():
        unmerged = model(ids).logits
        rebuilt = peft_model_from_state(shape, model.state_dict(), LoraConfig(rank=4, dropout=0.0))
        merged = rebuilt.merge_and_unload().eval()
        assert type(merged) is Llama
        torch.testing.assert_close(merged(ids).logits, unmerged, rtol=1e-5, atol=1e-5)
        with model.disable_adapter():  # the base model, no copy (preference tuning's reference)
            assert not torch.allclose(model(ids).logits, unmerged)


def test_lora_kill_9_then_resume_auto_is_exact(sft_data, full_run, lora_run, tmp_path):
    out = tmp_path / "lora_killed"
    config = sft_config(
        sft_data,
        out,
        init=str(full_run / "hf"),
        lora={"rank": 4, "alpha": 8, "dropout": 0.1},
        neftune_alpha=5.0,
        train={"max_steps": 15, "checkpoint_every": 5},
    )
    result = run(config, **{faults.KILL_DURING_CHECKPOINT_ENV: "10"})
    assert result.returncode == -signal.SIGKILL
    result = run(config, "--resume", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(step 5)" in result.stderr
    reference = losses(lora_run)
    assert losses(out) == {step: reference[step] for step in range(1, 16)}
    want = load_file(lora_run / "step-15" / "model.safetensors")
    got = load_file(out / "step-15" / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want)


# ---------------------------------------------------------------------------------------------------
# The loss is the mean over the global batch's trained tokens, however the batch is split


@pytest.mark.slow
def test_batch_8_equals_accumulation_8_and_two_processes(sft_data, tmp_path):
    """Padded rows of very different lengths: one batch of 8, 8 accumulated batches of 1, and two processes
    with 4 each see the same rows per step and give the same loss."""
    results = {}
    for name, batch, accumulation, launcher in [
        ("one", 8, 1, None),
        ("accumulated", 1, 8, None),
        ("two", 4, 1, [*ACCELERATE, "--num_processes", "2"]),
    ]:
        out = tmp_path / name
        config = sft_config(
            sft_data,
            out,
            data={"packing": "pad", "batch_size": batch},
            train={"max_steps": 4, "grad_accum_steps": accumulation, "eval_every": 0, "export_hf": False},
        )
        result = run(config, launcher=launcher)
        assert result.returncode == 0, result.stderr[-3000:]
        results[name] = losses(out)
    assert "2 process(es)" in result.stdout
    one = results["one"]
    assert len(one) == 4 and one[4] < one[1]
    for other in ("accumulated", "two"):
        assert results[other] == pytest.approx(one, abs=1e-5), (other, results[other], one)


def test_lora_leaves_no_empty_optimizer_group(tiny_model_config):
    """LoRA trains no norm or embedding; an empty group would make DeepSpeed drop it and the schedule fail."""
    from training.config import OptimConfig
    from training.lora import LoraConfig, add_lora
    from training.optim import build_optimizer

    model = add_lora(
        Llama(tiny_model_config(vocab_size=97, dim=32, n_layers=1, n_kv_heads=4)), LoraConfig(rank=2)
    )
    groups = build_optimizer(model, OptimConfig()).param_groups
    assert len(groups) == 1 and all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.slow
def test_deepspeed_zero1_lora_run_and_init_from_its_checkpoint(sft_data, full_run, tmp_path):
    out = tmp_path / "zero1_lora"
    config = sft_config(
        sft_data,
        out,
        init=str(full_run / "hf"),
        lora={"rank": 4},
        data={"batch_size": 2},
        train={"max_steps": 3, "checkpoint_every": 3, "eval_every": 0},
    )
    launcher = [
        str(Path(PYTHON).parent / "accelerate"), "launch", "--num_processes", "2",
        "--config_file", str(REPO / "configs/accelerate/deepspeed_zero1.yaml"),
    ]  # fmt: skip
    result = run(config, launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "step-3" / "pytorch_model").is_dir()  # DeepSpeed's own checkpoint format
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([render_chat(Tokenizer.load(out / "hf"), sft_data["conversations"][0]).ids])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(out / "hf").eval()(ids).logits
        torch.testing.assert_close(load_initial_model(out).eval()(ids).logits, want, rtol=1e-4, atol=1e-4)
