"""What the training tests run: a tiny pretraining config on real text launched as the real stage script,
and an in-process run on a synthetic learnable stream (also imported by the multi-process driver scripts)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from models.llama import ModelConfig
from tests.helpers.model import tiny_model_config
from training.config import LoggingConfig, OptimConfig, TrainConfig
from training.objectives import CausalLMObjective, ObjectiveOutput

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def run_config(real_data, out: Path, **sections) -> Path:
    """A tiny fp32 pretraining config for `real_data`, with section overrides; returns its YAML path."""
    config = {
        "model": {
            "preset": "tiny",
            "vocab_size": 0,
            "dim": 64,
            "n_layers": 2,
            "n_heads": 4,
            "n_kv_heads": 2,
            "max_seq_len": 64,
        },
        "data": {
            "shards": [str(real_data["shards"] / "*.jsonl.zst")],
            "tokenizer": str(real_data["tokenizer"]),
            "seq_len": 64,
            "batch_size": 8,
            "num_workers": 0,
            "unit_docs": 16,
            "validation_fraction": 0.05,
        },
        "optim": {"lr": 3e-3, "warmup_steps": 10},
        "train": {
            "output_dir": str(out),
            "max_steps": 60,
            "precision": "fp32",
            "checkpoint_every": 10,
            "keep_last": 2,
            "eval_every": 30,
            "eval_batches": 2,
        },
        "logging": {"log_every": 1, "progress_bar": False, "sample_every": 0},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    return path


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def pretrain(config: Path, *args: str, launcher: list[str] | None = None, **env_extra: str):
    cmd = [*(launcher or [PYTHON]), str(REPO / "pretrain_llama.py"), "--config", str(config), *args]
    return subprocess.run(cmd, cwd=REPO, env=env(**env_extra), capture_output=True, text=True, timeout=600)


@dataclasses.dataclass
class TinyRun:
    model: ModelConfig
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)


class RowStream:
    """Deterministic batches (rows are shifted ranges mod V); rank r takes rows r::world of each batch."""

    def __init__(self, rank: int = 0, world: int = 1, batch: int = 4, seq: int = 32, vocab: int = 128):
        self.index, self.rank, self.world, self.batch, self.seq, self.vocab = (
            0,
            rank,
            world,
            batch,
            seq,
            vocab,
        )

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(self.index)
            start = torch.randint(0, self.vocab, (self.batch, 1), generator=g)
            ids = ((start + torch.arange(self.seq)) % self.vocab)[self.rank :: self.world]
            labels = ids.clone()
            labels[:, : self.index % 5] = -100  # uneven token counts across rows and ranks
            self.index += 1
            yield {"input_ids": ids, "labels": labels}

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = state["index"]

    def counters(self):
        return {"rows_read": {"all": self.index * len(range(self.rank, self.batch, self.world))}}


def tiny_run(out: Path, **train) -> TinyRun:
    return TinyRun(
        model=tiny_model_config(vocab_size=128, dim=32, n_heads=2, max_seq_len=32),
        optim=OptimConfig(lr=3e-3, warmup_steps=100),  # warmup only: the lr does not depend on max_steps
        train=TrainConfig(
            **{"output_dir": str(out), "precision": "fp32", "checkpoint_every": 0, "eval_every": 0, **train}
        ),
        logging=LoggingConfig(progress_bar=False, log_every=1, plot=False),
    )


class AgreementWithReference(CausalLMObjective):
    """The LM loss plus how far the policy's next-token log-probabilities drift from a frozen reference's
    (a metric over the same target tokens): an objective that needs a second, frozen model."""

    def __call__(self, model, batch, frozen):
        reference = frozen["reference"]
        assert not getattr(reference, "module", reference).training  # (DeepSpeed wraps it in an engine)
        assert not any(p.requires_grad for p in reference.parameters())
        model_out = model(**batch)
        with torch.no_grad():
            ref_logits = reference(batch["input_ids"]).logits
        targets = batch["labels"][:, 1:]
        mask = targets != -100
        ref_logp = torch.log_softmax(ref_logits[:, :-1].float(), -1).gather(
            -1, targets.clamp(min=0)[..., None]
        )
        drift = -ref_logp[..., 0][mask].mean() - model_out.loss.detach()
        return ObjectiveOutput(model_out.loss, {"drift_from_reference": drift})


REPORT_SECTIONS = (
    "## Data",
    "## Tokenizer",
    "## Training",
    "## Validation",
    "## Downstream scores",
    "## Samples",
    "## Environment",
    "## Provenance",
)


def front_matter(card: str) -> dict:
    """The YAML front matter of a model card (README.md)."""
    assert card.startswith("---\n"), card[:200]
    return yaml.safe_load(card[4 : card.index("\n---", 4)])


def check_report_and_card(out: Path, *, name: str, base_model: str | None = None) -> dict:
    """A finished run's report.md holds every section with the figures of its metrics.jsonl, and its export's
    model card has the Hub's front matter (base_model for a tuned model) and the same figures; returns the
    front matter."""
    import json

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    report = (out / "report.md").read_text()
    assert report.startswith(f"# {name}: ")
    positions = [report.index(section) for section in REPORT_SECTIONS]
    assert positions == sorted(positions), report
    last = records[-1]
    validated = [r for r in records if r.get("val_loss") is not None][-1]
    card = (out / "hf" / "README.md").read_text()
    for text in (report, card):
        assert f"- steps: {last['step']:,} of" in text
        assert f"- tokens: {last['tokens_seen']:,}" in text
        assert f"- loss: {validated['val_loss']:.4f}" in text
        assert f"At step {validated['step']}:" in text
    assert "- git commit: " in report and "- torch: " in report and "- tokenizer `" in report
    meta = front_matter(card)
    assert meta["model_name"] == name and f"# {name}\n" in card
    assert meta["pipeline_tag"] == "text-generation" and meta["library_name"] == "transformers"
    assert meta["license"] and meta["language"] and "llama" in meta["tags"]
    assert meta.get("base_model") == base_model
    assert json.loads((out / "hf" / "config.json").read_text())["open_llama_model_name"] == name
    return meta
