"""The Llama model: presets and parameter counts, initialisation, parity with transformers' LlamaForCausalLM,
activation checkpointing, torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from models.llama import Llama, ModelConfig, RunOptions, llama_intermediate_size


def hf_twin(model: Llama) -> LlamaForCausalLM:
    """transformers' LlamaForCausalLM with the same shape and weights (for models without stable embedding)."""
    c = model.config
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.dim,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.n_layers,
            num_attention_heads=c.n_heads,
            num_key_value_heads=c.n_kv_heads,
            max_position_embeddings=c.max_seq_len,
            rms_norm_eps=c.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
            tie_word_embeddings=c.tie_embeddings,
        )
    )
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return hf.eval()


def test_7b_preset_has_open_llamas_published_parameter_count():
    with torch.device("meta"):
        model = Llama(ModelConfig.from_preset("7b"))
    c = model.config
    assert (c.vocab_size, c.dim, c.n_heads, c.n_layers, c.intermediate_size) == (100000, 4096, 32, 32, 11008)
    assert c.stable_embedding and c.tie_embeddings
    assert model.num_parameters() == 6_885_879_808


def test_presets_build_with_plausible_sizes():
    expected_millions = {"125m": (100, 150), "350m": (300, 400), "1b": (900, 1200)}
    for name, (low, high) in expected_millions.items():
        with torch.device("meta"):
            model = Llama(ModelConfig.from_preset(name))
        assert low <= model.num_parameters() / 1e6 <= high, name
    tiny = ModelConfig.from_preset("tiny", vocab_size=5000)
    assert (tiny.dim, tiny.n_layers, tiny.n_heads, tiny.n_kv_heads, tiny.vocab_size) == (256, 4, 4, 2, 5000)


def test_intermediate_size_is_derived_like_llama():
    assert llama_intermediate_size(4096) == 11008  # LLaMA-7B
    assert llama_intermediate_size(5120) == 13824  # LLaMA-13B
    assert ModelConfig(dim=256, n_heads=4).intermediate_size == 768


def test_config_round_trips_and_rejects_unknown_keys():
    config = ModelConfig.from_preset("tiny", vocab_size=123, rope_scaling=None)
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="valid keys"):
        ModelConfig.from_dict({"dimm": 3})
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.from_preset("13b")


def test_num_parameters_and_flops_per_token_closed_form(tiny_model_config):
    c = tiny_model_config(tie_embeddings=True)
    model = Llama(c)
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * c.intermediate_size + 2 * 64
    assert model.num_parameters() == 211 * 64 + c.n_layers * per_layer + 64
    assert model.num_parameters(exclude_embeddings=True) == c.n_layers * per_layer + 64
    n_matmul = c.n_layers * per_layer + 64 + 211 * 64  # the tied head is a matmul
    assert model.flops_per_token(100) == 6 * n_matmul + 12 * c.n_layers * c.n_heads * c.head_dim * 100


def test_initialisation_scales(tiny_model_config):
    torch.manual_seed(0)
    c = tiny_model_config(
        dim=256, n_layers=8, n_heads=4, vocab_size=4000, stable_embedding=True, tie_embeddings=True
    )
    model = Llama(c)
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert layer.self_attn.o_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    xavier_std = math.sqrt(2 / (4000 + 256))
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(xavier_std, rel=0.05)
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("tie", [False, True])
def test_logits_and_loss_match_transformers(tiny_model_config, tie):
    torch.manual_seed(0)
    model = Llama(tiny_model_config(tie_embeddings=tie)).eval()
    hf = hf_twin(model)
    ids = torch.randint(0, 211, (3, 33))
    labels = ids.clone()
    labels[0, :5] = -100  # ignored prompt tokens
    with torch.no_grad():
        ours, theirs = model(ids, labels=labels), hf(ids, labels=labels)
    assert (ours.logits - theirs.logits).abs().max() <= 1e-4
    assert ours.loss.item() == pytest.approx(theirs.loss.item(), abs=1e-5)
    # And against the closed-form definition: mean cross-entropy of token t+1 given tokens <= t.
    manual = F.cross_entropy(
        ours.logits[:, :-1].reshape(-1, 211), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert ours.loss.item() == pytest.approx(manual.item(), abs=1e-6)


def test_gradients_match_transformers(tiny_model_config):
    torch.manual_seed(1)
    model = Llama(tiny_model_config()).train()
    hf = hf_twin(model).train()
    ids = torch.randint(0, 211, (2, 24))
    model(ids, labels=ids).loss.backward()
    hf(ids, labels=ids).loss.backward()
    hf_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, hf_params[name].grad, atol=1e-5), name


def test_default_loss_is_chunked_in_training_and_full_logits_in_eval(tiny_model_config):
    """fused_cross_entropy "auto": a training-mode call with labels skips the (tokens x vocab) logits, with
    the loss and gradients of transformers' full-logits path (tied head: both gradients meet in one matrix)."""
    torch.manual_seed(2)
    model = Llama(tiny_model_config(tie_embeddings=True))
    assert model.options.fused_cross_entropy == "auto"
    hf = hf_twin(model).train()
    ids = torch.randint(0, 211, (2, 24))
    labels = ids.clone()
    labels[1, :7] = -100
    out = model.train()(ids, labels=labels)
    assert out.logits is None
    want = hf(ids, labels=labels).loss
    assert out.loss.item() == pytest.approx(want.item(), abs=1e-5)
    (2.5 * out.loss).backward()  # a scaled loss, as the training loop's token weighting does
    (2.5 * want).backward()
    hf_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, hf_params[name].grad, atol=1e-5), name
    with torch.no_grad():
        evaluated = model.eval()(ids, labels=labels)
    assert evaluated.logits is not None and evaluated.logits.shape == (2, 24, 211)
    assert evaluated.loss.item() == pytest.approx(want.item(), abs=1e-5)


@pytest.mark.parametrize("training", [False, True])
def test_every_use_of_the_lm_head_weight_is_inside_its_module_call(tiny_model_config, training):
    """What DeepSpeed ZeRO-3 relies on: it gathers a module's weight in a forward pre-hook and frees it after
    the call. Hooks doing the same here (an empty weight outside the call) change no output of any kind."""
    torch.manual_seed(3)
    model = Llama(tiny_model_config()).train(training)
    ids = torch.randint(0, 211, (2, 16))
    labels = ids.clone()
    labels[0, :5] = -100
    calls = {
        "logits": lambda: [model(ids).logits],
        "loss": lambda: [model(ids, labels=labels).loss],
        "accuracy": lambda: list(vars(model(ids, labels=labels, return_token_accuracy=True)).values()),
        "logprobs": lambda: [model(ids, labels=labels, return_token_logprobs=True).token_logprobs],
    }
    with torch.no_grad():
        want = {name: call() for name, call in calls.items()}
    head = model.lm_head
    gathered = head.weight
    head.register_forward_pre_hook(lambda module, args: setattr(module, "weight", gathered))
    head.register_forward_hook(
        lambda module, args, out: setattr(module, "weight", torch.nn.Parameter(torch.empty(0)))
    )
    head.weight = torch.nn.Parameter(torch.empty(0))
    with torch.no_grad():
        for name, call in calls.items():
            for got, expected in zip(call(), want[name], strict=True):
                assert (got is None and expected is None) or torch.equal(got, expected), name
    assert head.weight.numel() == 0


def test_stable_embedding_normalises_embedding_rows(tiny_model_config):
    torch.manual_seed(0)
    model = Llama(tiny_model_config(stable_embedding=True))
    x = model.embed(torch.arange(10)[None])
    assert x.mean(-1).abs().max() < 1e-5 and (x.var(-1, unbiased=False) - 1).abs().max() < 1e-2


def test_activation_checkpointing_gives_identical_gradients(tiny_model_config):
    torch.manual_seed(0)
    plain = Llama(tiny_model_config(stable_embedding=True, tie_embeddings=True)).train()
    ckpt = Llama(
        tiny_model_config(stable_embedding=True, tie_embeddings=True),
        RunOptions(activation_checkpointing=True),
    ).train()
    ckpt.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 211, (2, 32))
    positions = torch.cat([torch.arange(12), torch.arange(20)]).expand(2, 32)
    loss_plain = plain(ids, labels=ids, position_ids=positions).loss
    loss_ckpt = ckpt(ids, labels=ids, position_ids=positions).loss
    loss_plain.backward()
    loss_ckpt.backward()
    assert loss_plain.item() == loss_ckpt.item()
    ckpt_params = dict(ckpt.named_parameters())
    for name, p in plain.named_parameters():
        assert torch.allclose(p.grad, ckpt_params[name].grad, atol=1e-6), name


@pytest.mark.slow  # compiling forward + backward takes ~40 s on 2 cores
def test_works_under_torch_compile(tiny_model_config):
    torch.manual_seed(0)
    model = Llama(tiny_model_config(stable_embedding=True, tie_embeddings=True))
    compiled = torch.compile(model)
    ids = torch.randint(0, 211, (2, 16))
    loss = compiled(ids, labels=ids).loss
    loss.backward()
    grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    eager_loss = model(ids, labels=ids).loss
    eager_loss.backward()
    assert loss.item() == pytest.approx(eager_loss.item(), abs=1e-5)
    assert torch.allclose(grad, model.model.layers[0].self_attn.q_proj.weight.grad, atol=1e-5)
