"""Hugging Face in and out: any HF Llama folder loads into our model with the same logits, and our export
loads in stock transformers (no custom code) with the same logits, for every embedding option."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from models.hf import export_hf, load_hf
from models.llama import Llama

VOCAB = 157


def random_hf_llama(tie: bool, rope_scaling: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if rope_scaling:
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,  # small, so the scaled band matters at these lengths
        }
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_parameters=rope,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-5,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norm gains, so a missed norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def ids(batch: int = 2, length: int = 40) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("rope_scaling", [False, True], ids=["rope", "llama3-rope"])
def test_import_hf_llama_gives_same_logits_and_loss(tmp_path, tie, rope_scaling):
    hf = random_hf_llama(tie, rope_scaling)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path).eval()
    assert ours.config.tie_embeddings == tie and ours.config.n_kv_heads == 2
    assert (ours.config.rope_scaling is not None) == rope_scaling
    x = ids()
    with torch.no_grad():
        want, got = hf(x, labels=x), ours(x, labels=x)
    assert (want.logits - got.logits).abs().max() <= 1e-4
    assert got.loss.item() == pytest.approx(want.loss.item(), abs=1e-5)


def test_import_sharded_safetensors_and_pytorch_bin(tmp_path):
    hf = random_hf_llama(tie=False, rope_scaling=False)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    x = ids()
    with torch.no_grad():
        want = hf(x).logits
        assert (load_hf(tmp_path / "sharded")(x).logits - want).abs().max() <= 1e-4
    # A pytorch_model.bin checkpoint is read with weights_only=True (no arbitrary unpickling).
    (tmp_path / "bin").mkdir()
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    hf.config.to_json_file(tmp_path / "bin" / "config.json")
    with torch.no_grad():
        assert (load_hf(tmp_path / "bin")(x).logits - want).abs().max() <= 1e-4


def test_pytorch_bin_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model.embed_tokens.weight": Evil()}, tmp_path / "pytorch_model.bin")
    random_hf_llama(False, False).config.to_json_file(tmp_path / "config.json")
    with pytest.raises(Exception, match=r"(?i)weights_only|unsupported global"):
        load_hf(tmp_path)


def test_import_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"config.json: model_type is 'gpt2'"):
        load_hf(tmp_path)


@pytest.mark.parametrize(
    ("stable", "tie"),
    [(False, False), (False, True), (True, False), (True, True)],
    ids=["plain", "tied", "stable", "stable+tied"],
)
def test_export_loads_in_stock_transformers_with_same_logits(tiny_model_config, tmp_path, stable, tie):
    torch.manual_seed(0)
    config = tiny_model_config(vocab_size=VOCAB, stable_embedding=stable, tie_embeddings=tie)
    ours = Llama(config).eval()
    if stable:  # a trained LayerNorm is not the identity: make the fold do real work
        with torch.no_grad():
            ours.model.embed_layernorm.weight.uniform_(0.5, 1.5)
            ours.model.embed_layernorm.bias.uniform_(-0.1, 0.1)
    out = export_hf(ours, tmp_path / "export")
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["model_type"] == "llama" and hf_config["architectures"] == ["LlamaForCausalLM"]
    assert hf_config["tie_word_embeddings"] == (tie and not stable)
    assert (out / "generation_config.json").is_file()
    assert "model.embed_layernorm.weight" not in load_file(out / "model.safetensors")

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    x = ids()
    with torch.no_grad():
        want = ours(x, labels=x)
        got = hf(x, labels=x)
        assert (want.logits - got.logits).abs().max() <= 1e-4
        assert got.loss.item() == pytest.approx(want.loss.item(), abs=1e-5)

    # Re-importing our own export restores the exact trainable model, stable embedding included.
    back = load_hf(out)
    assert back.config == config
    assert back.state_dict().keys() == ours.state_dict().keys()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name
    assert (back.lm_head.weight is back.model.embed_tokens.weight) == tie


def test_export_with_llama3_rope_round_trips_through_transformers(tiny_model_config, tmp_path):
    torch.manual_seed(0)
    rope = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    rope["original_max_position_embeddings"] = 16
    ours = Llama(
        tiny_model_config(vocab_size=VOCAB, n_layers=1, n_kv_heads=4, rope_theta=50000.0, rope_scaling=rope)
    )
    hf = AutoModelForCausalLM.from_pretrained(export_hf(ours, tmp_path / "export")).eval()
    x = ids(1, 60)
    with torch.no_grad():
        assert (ours(x).logits - hf(x).logits).abs().max() <= 1e-4


def test_export_sharded_and_bf16(tiny_model_config, tmp_path):
    torch.manual_seed(0)
    ours = Llama(tiny_model_config(vocab_size=VOCAB, n_kv_heads=4, tie_embeddings=True))
    out = export_hf(ours, tmp_path / "export", dtype=torch.bfloat16, max_shard_bytes=50_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    back = load_hf(out)
    assert next(back.parameters()).dtype == torch.float32
    x = ids()
    with torch.no_grad():
        # bf16 rounding of the weights only: the two loaders see the same numbers.
        assert (hf(x).logits - back(x).logits).abs().max() <= 1e-4
        assert (ours(x).logits - back(x).logits).abs().max() <= 5e-2


def test_export_permissions_follow_the_umask(tiny_model_config, tmp_path):
    old = os.umask(0o022)
    try:
        out = export_hf(Llama(tiny_model_config(vocab_size=VOCAB, n_layers=1, n_kv_heads=4)), tmp_path / "hf")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # not mkdtemp's 0700: other users can read the export
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}


def test_export_copies_tokenizer_and_special_ids(tiny_model_config, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{f"w{i}": i + 4 for i in range(VOCAB - 4)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.save_pretrained(tmp_path / "tok")
    ours = Llama(tiny_model_config(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2))
    out = export_hf(ours, tmp_path / "export", tokenizer_dir=tmp_path / "tok")
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 3)
    assert generation["eos_token_id"] == 2
    assert AutoTokenizer.from_pretrained(out)("w5 w7")["input_ids"] == [9, 11]
    # Exporting again over the folder replaces it atomically and leaves no temp folders behind.
    export_hf(ours, out, tokenizer_dir=tmp_path / "tok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "tok"]


def test_hf_generation_equals_ours_after_import(tmp_path):
    from models.generate import generate

    hf = random_hf_llama(tie=True, rope_scaling=True)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path).eval()
    prompt = ids(1, 6)
    want = hf.generate(prompt, max_new_tokens=25, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert generate(ours, prompt[0], max_new_tokens=25) == want[0, 6:].tolist()
