"""What the three stage scripts share through training/runner.py, tried on each: a mistake in the config or the
set-up is one line `SCRIPT: error: ...` and exit status 2, before any training step.

Pretraining runs on the real text of the real_data fixture (skipped without ../shared/corpus); the tuning
stages start from a tiny random model exported with the generated chat tokenizer (no corpus needed).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import orjson
import pytest
import torch
import yaml

from dataset.tokenizer import Tokenizer
from models.hf import export_hf
from models.llama import Llama, ModelConfig
from tests.helpers.training import PYTHON, REPO, env, run_config

SCRIPTS = {"pretrain": "pretrain_llama.py", "sft": "instruction_tuning.py", "dpo": "preference_tuning.py"}


@pytest.fixture(scope="module")
def tuning_inputs(tokdir, tmp_path_factory) -> dict[str, Path]:
    """A random model of width 128, 2 layers and 256 positions exported to `.../init`, a few conversations
    and a few preference pairs."""
    root = tmp_path_factory.mktemp("stages")
    torch.manual_seed(0)
    shape = ModelConfig.from_preset(
        "tiny",
        vocab_size=Tokenizer.load(tokdir).vocab_size,
        dim=128,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=256,
    )
    init = export_hf(Llama(shape), root / "init", tokenizer_dir=tokdir)
    questions = [f"What is {a} plus {a}?" for a in range(8)]
    chat = lambda q: [{"role": "user", "content": q}, {"role": "assistant", "content": "It is."}]  # noqa: E731
    return {
        "init": init,
        "sft": jsonl(root / "chats.jsonl", [{"messages": chat(q)} for q in questions]),
        "dpo": jsonl(
            root / "pairs.jsonl", [{"prompt": q, "chosen": "It is.", "rejected": "No."} for q in questions]
        ),
    }


def jsonl(path: Path, records: list[dict]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


def stage_config(request: pytest.FixtureRequest, stage: str, out: Path) -> Path:
    """A small fp32 run config of `stage`; each mistake below changes one thing of it."""
    if stage == "pretrain":
        return run_config(request.getfixturevalue("real_data"), out)
    inputs = request.getfixturevalue("tuning_inputs")
    config = {
        "init": str(inputs["init"]),
        "data": {"files": [str(inputs[stage])], "seq_len": 256, "batch_size": 2},
        "train": {"output_dir": str(out), "max_steps": 2, "precision": "fp32"},
        "logging": {"progress_bar": False},
    }
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    return path


MISTAKES = [
    # stage, id, arguments, a part of the message
    ("pretrain", "missing-shards", ["--data.shards", "['/nonexistent/*.jsonl.zst']"],
     "no shard files match '/nonexistent/*.jsonl.zst'"),
    ("pretrain", "precision", ["--train.precision", "fp8"],
     "'train.precision' must be Literal['fp32', 'bf16', 'fp16', 'auto']"),
    ("pretrain", "unwritable-output", ["--train.output_dir", "/dev/null/run"], "Not a directory: '/dev/null/run'"),
    ("pretrain", "mixture-typo", ["--data.mixture", "{pile: 1, piel: 1}"], "mixture source(s) ['piel'] match no shard"),
    ("sft", "no-model", ["--init", ""], "no model: pass --init DIR"),
    ("sft", "missing-data", ["--data.files", "/nonexistent/*.jsonl"],
     "no instruction data matches '/nonexistent/*.jsonl'"),
    ("sft", "too-long", ["--data.seq_len", "512"], "data.seq_len 512 is longer than the model's 256"),
    ("sft", "typo", ["--lora.rnak", "4"], "unknown option --lora.rnak (did you mean 'rank'?)"),
    ("sft", "model-keys-differ", ["--model.n_layers", "3", "--model.dim", "128"], "/init: n_layers 3 vs 2\n"),
    ("sft", "preset-differs", ["--model.preset", "tiny"], "does not describe --init"),
    ("dpo", "no-model", ["--init", ""], "no model: pass --init DIR"),
    ("dpo", "adapter-without-lora", ["--reference.mode", "adapter"], "reference.mode adapter needs LoRA"),
    ("dpo", "too-long", ["--data.seq_len", "512"], "data.seq_len 512 is longer than the model's 256"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("stage", "args", "expected"),
    [pytest.param(stage, args, expected, id=f"{stage}-{name}") for stage, name, args, expected in MISTAKES],
)
def test_setup_mistakes_are_one_line_errors(request, tmp_path, stage, args, expected):
    config = stage_config(request, stage, tmp_path / "out")
    cmd = [PYTHON, str(REPO / SCRIPTS[stage]), "--config", str(config), *args]
    result = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"{SCRIPTS[stage]}: error: " in result.stderr and expected in result.stderr
    assert "Traceback" not in result.stderr
