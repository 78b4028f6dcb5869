"""Bits per byte beside the loss: the closed form, the byte table against the tokenizer, the exact
total-bits-over-total-bytes figure across micro-batches, and val_bpb in a pretraining run's metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch

from common import IGNORE_INDEX
from dataset.tokenizer import Tokenizer, token_byte_lengths
from models.llama import Llama
from tests.helpers.model import tiny_model_config
from tests.helpers.training import pretrain, run_config
from training.config import TrainConfig
from training.distributed import build_accelerator
from training.evaluation import Validator
from training.objectives import CausalLMObjective, bits_per_byte

VOCAB = 64


def small_model(*, uniform: bool) -> Llama:
    torch.manual_seed(0)
    model = Llama(tiny_model_config(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, max_seq_len=32)).eval()
    if uniform:  # all logits 0: every next token has probability 1/V
        torch.nn.init.zeros_(model.lm_head.weight)
    return model


def batch_with_ignored(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 16), generator=generator)
    labels = ids.clone()
    labels[0, : 3 + seed] = IGNORE_INDEX  # uneven target counts across batches
    labels[2, 10:] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def test_uniform_model_is_log2_v_bits_over_the_mean_bytes():
    token_bytes = torch.arange(VOCAB) % 5  # 0 (control-like) to 4 bytes
    objective = CausalLMObjective(token_bytes=token_bytes)
    batch = batch_with_ignored(0)
    out = objective(small_model(uniform=True), batch, {})
    targets = batch["labels"][:, 1:]
    targets = targets[targets != IGNORE_INDEX]
    mean_bytes = token_bytes[targets].double().mean().item()
    assert out.loss.item() == pytest.approx(math.log(VOCAB), rel=1e-6)
    assert out.metrics["bytes_per_token"].item() == pytest.approx(mean_bytes, rel=1e-6)
    figures = objective.report({"loss": out.loss.item(), "bytes_per_token": mean_bytes})
    assert figures["bpb"] == pytest.approx(math.log2(VOCAB) / mean_bytes, rel=1e-6)
    assert bits_per_byte(math.log(2), 1.0) == pytest.approx(1.0)
    assert math.isnan(bits_per_byte(1.0, 0.0))
    assert "bpb" not in objective.report({"loss": 1.0, "bytes_per_token": 0.0})  # only control targets
    assert "bpb" not in CausalLMObjective().report({"loss": 1.0})  # no byte table: no bpb


def test_validation_bpb_is_total_bits_over_total_bytes(tmp_path):
    """Batches with different target counts: the count-weighted means give exactly bits/bytes overall."""
    model = small_model(uniform=False)
    token_bytes = torch.randint(1, 7, (VOCAB,), generator=torch.Generator().manual_seed(1))
    batches = [batch_with_ignored(seed) for seed in range(3)]
    accelerator = build_accelerator(TrainConfig(output_dir=str(tmp_path), precision="fp32"))
    objective = CausalLMObjective(token_bytes=token_bytes)
    val = Validator(batches, every=1, num_batches=3).run(model, objective, {}, accelerator)

    nats = total_bytes = 0.0
    with torch.no_grad():
        for batch in batches:
            logits = model(batch["input_ids"]).logits[:, :-1].double()
            targets = batch["labels"][:, 1:]
            keep = targets != IGNORE_INDEX
            nats += torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            total_bytes += token_bytes[targets[keep]].sum().item()
    assert val["val_bpb"] == pytest.approx(nats / math.log(2) / total_bytes, rel=1e-5)


def test_byte_table_matches_decoding_and_real_text(synthetic_tokdir):
    tokenizer = Tokenizer.load(synthetic_tokdir)
    table = token_byte_lengths(tokenizer)
    assert len(table) == tokenizer.vocab_size
    sp = tokenizer.sp
    for token_id, length in enumerate(table):
        if sp.is_control(token_id) or sp.is_unknown(token_id):
            assert length == 0, tokenizer.id_to_piece(token_id)
        elif sp.is_byte(token_id):  # alone it is not valid UTF-8, so it cannot be decoded to text by itself
            assert length == 1 and tokenizer.id_to_piece(token_id).startswith("<0x")
        else:
            assert length == len(tokenizer.decode([token_id]).encode()), tokenizer.id_to_piece(token_id)
    # The tokenizer adds no space before the text (add_dummy_prefix off, the Hugging Face folder's
    # add_prefix_space false), so the byte lengths of the ids of any text add up to the text's own bytes:
    # leading and repeated spaces, characters outside the vocabulary (byte fallback: an emoji, rare Han
    # characters), a literal U+2581 and control-token strings included.
    assert not sp.decode(sp.encode(" x")).startswith("  ")
    for text in [
        "the cat sat on the mat.",
        "  leading spaces,   runs of them\tand tabs\n\nnew lines ",
        "丁七万 and 龘靐 mixed with English 🙂 and café",
        "a literal \u2581 marker, <s> and <|user|> as text",
    ]:
        ids = tokenizer.encode(text, bos=True, eos=True)  # <s> and </s> stand for no bytes
        assert sum(table[i] for i in ids) == len(text.encode()), text


def test_pretraining_logs_bits_per_byte(real_data, tmp_path):
    out = tmp_path / "run"
    config = run_config(
        real_data, out, train={"max_steps": 4, "eval_every": 2, "eval_batches": 1, "checkpoint_every": 0}
    )
    result = pretrain(config)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [2, 4]
    for r in val:
        assert 1.0 < r["val_bytes_per_token"] < 10.0
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / (math.log(2) * r["val_bytes_per_token"]))
    train_records = [r for r in records if r.get("loss") is not None]
    assert train_records and all(r["bpb"] > 0 and r["bytes_per_token"] > 0 for r in train_records)
