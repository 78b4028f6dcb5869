"""Fused-kernel switches (models/kernels.py): every fast path and fallback agrees with the reference path.

On CPU the switches are checked to fall back with one log line each, and the tests of Liger Kernel's own
kernels (marked `liger`) run on CPU tensors through Triton's interpreter in a child process; the chunked
cross-entropy and compile-per-block run everywhere.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models import kernels
from models.kernels import (
    Kernels,
    chunked_linear_cross_entropy,
    compile_model,
    default_chunk_size,
    liger_unavailable_reason,
    select_kernels,
)
from models.llama import REFERENCE_KERNELS, Llama, ModelConfig, RunOptions
from models.lm_head import linear_cross_entropy, shift_labels
from tests.helpers.model import tiny_model_config
from training.config import OptimConfig
from training.optim import build_optimizer

SWITCHES = {"fused_norm": True, "fused_rope": True, "fused_swiglu": True, "fused_cross_entropy": "liger"}
LIGER_SKIP = liger_unavailable_reason()


def tiny(**overrides) -> ModelConfig:
    """The tiny shape with every embedding option on, so each kernel meets the layers it fuses."""
    return tiny_model_config(max_seq_len=64, stable_embedding=True, tie_embeddings=True, **overrides)


def twin(config: ModelConfig, options: RunOptions | None = None, **switches) -> tuple[Llama, Llama]:
    """A model (run with `options`) and a copy with the same weights run with `switches` on top."""
    torch.manual_seed(0)
    options = options or RunOptions()
    reference = Llama(config, options)
    fast = Llama(config, dataclasses.replace(options, **switches))
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def loss_and_grads(model: Llama, ids: torch.Tensor, labels: torch.Tensor, **kwargs):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=labels, **kwargs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same_training_signal(a: Llama, b: Llama, *, atol: float = 1e-5, **kwargs) -> None:
    g = torch.Generator().manual_seed(1)
    device = next(a.parameters()).device
    ids = torch.randint(0, a.config.vocab_size, (2, 24), generator=g).to(device)
    labels = ids.clone()
    labels[0, :5] = -100  # a masked prompt
    kwargs = {k: v.to(device) for k, v in kwargs.items()}
    loss_a, grads_a = loss_and_grads(a, ids, labels, **kwargs)
    loss_b, grads_b = loss_and_grads(b, ids, labels, **kwargs)
    torch.testing.assert_close(loss_b, loss_a, atol=atol, rtol=atol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=atol, rtol=1e-4, msg=name)


# --------------------------------------------------------------------------------------------------
# Chunked linear + cross-entropy (pure PyTorch)
# --------------------------------------------------------------------------------------------------


def random_problem(n_tokens=53, dim=16, vocab=101, seed=0, ignore=7):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_tokens, dim, generator=g, requires_grad=True)
    weight = (torch.randn(vocab, dim, generator=g) / 4).requires_grad_()
    targets = torch.randint(0, vocab, (n_tokens,), generator=g)
    targets[torch.randperm(n_tokens, generator=g)[:ignore]] = -100
    return hidden, weight, targets


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 53, 1000])
def test_chunked_cross_entropy_matches_plain_loss_and_gradients(chunk_size):
    hidden, weight, targets = random_problem()
    want = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=-100)
    want_grads = torch.autograd.grad(want, (hidden, weight))
    got, logits = chunked_linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size)
    got_grads = torch.autograd.grad(got, (hidden, weight))
    assert logits is None  # never materialised
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def test_chunked_cross_entropy_uniform_logits_is_log_vocab():
    """Zero weights give uniform logits: loss = log(V) exactly, and d loss/d hidden = 0."""
    vocab = 97
    hidden = torch.randn(40, 8, requires_grad=True)
    weight = torch.zeros(vocab, 8, requires_grad=True)
    targets = torch.randint(0, vocab, (40,))
    targets[:3] = -100
    loss, _ = chunked_linear_cross_entropy(hidden, weight, targets, chunk_size=9)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(vocab), rel=1e-6)
    assert hidden.grad.abs().max() == 0
    # d loss/d W[v] = mean over valid tokens of (1/V - [target == v]) * hidden.
    valid = targets != -100
    onehot = F.one_hot(targets[valid], vocab).float()
    want = (1 / vocab - onehot).t() @ hidden.detach()[valid] / valid.sum()
    torch.testing.assert_close(weight.grad, want, atol=1e-6, rtol=1e-5)


def test_chunked_cross_entropy_scales_with_upstream_gradient_and_without_grad():
    hidden, weight, targets = random_problem(seed=3)
    (3.0 * chunked_linear_cross_entropy(hidden, weight, targets, chunk_size=5)[0]).backward()
    scaled = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    chunked_linear_cross_entropy(hidden, weight, targets, chunk_size=5)[0].backward()
    torch.testing.assert_close(scaled[0], 3 * hidden.grad)
    torch.testing.assert_close(scaled[1], 3 * weight.grad)
    with torch.no_grad():  # validation: the loss alone
        no_grad = chunked_linear_cross_entropy(hidden, weight, targets, chunk_size=5)[0]
    torch.testing.assert_close(no_grad, F.cross_entropy(hidden @ weight.t(), targets, ignore_index=-100))


def test_chunked_cross_entropy_under_bf16_autocast_matches_plain_autocast():
    hidden, weight, targets = random_problem(n_tokens=64, dim=32, vocab=300, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, _ = linear_cross_entropy(hidden, weight, targets)
        got, _ = chunked_linear_cross_entropy(hidden, weight, targets, chunk_size=16)
    want_grads = torch.autograd.grad(want, (hidden, weight))
    got_grads = torch.autograd.grad(got, (hidden, weight))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == w.dtype == torch.float32
        torch.testing.assert_close(g, w, atol=2e-3, rtol=2e-2)  # bf16 matmuls, other summation order


def test_default_chunk_size_bounds_transient_logits():
    # 1b preset, 8 x 2048 tokens, 32k vocab: chunks of 1024 tokens (logits of one chunk ~ the hidden states).
    assert default_chunk_size(16384, 2048, 32000) == 1024
    assert default_chunk_size(10, 2048, 32000) == 10  # never more than the tokens there are
    assert default_chunk_size(100_000, 4096, 100_000) >= 512


# --------------------------------------------------------------------------------------------------
# The model with its switches
# --------------------------------------------------------------------------------------------------


def test_model_with_chunked_cross_entropy_trains_like_the_plain_model():
    reference, chunked = twin(tiny(), fused_cross_entropy="chunked")
    assert chunked.kernels.names == {"fused_cross_entropy": "chunked"}
    assert_same_training_signal(reference, chunked)
    assert chunked(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).logits is None
    # Without labels (generation) the logits are there as always.
    torch.testing.assert_close(
        chunked(torch.tensor([[1, 2, 3]])).logits, reference(torch.tensor([[1, 2, 3]])).logits
    )


def test_model_with_chunked_cross_entropy_and_document_masking():
    reference, chunked = twin(tiny(), fused_cross_entropy="chunked")
    position_ids = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, 24)
    assert_same_training_signal(reference, chunked, position_ids=position_ids)


def test_switches_fall_back_on_cpu_with_one_log_line_each(caplog, monkeypatch):
    if LIGER_SKIP is None:
        pytest.skip("Liger Kernel can run here: nothing falls back")
    monkeypatch.setattr(kernels, "_logged_fallbacks", set())
    with caplog.at_level(logging.WARNING, logger="models.kernels"):
        reference, fast = twin(tiny(), **SWITCHES)
        Llama(fast.config)  # a second model in the same process logs nothing new
    lines = [r.getMessage() for r in caplog.records if r.name == "models.kernels"]
    assert len(lines) == 4, lines
    for switch, line in zip(SWITCHES, lines):
        assert line.startswith(f"{switch}: ") and LIGER_SKIP in line
    assert "chunked" in lines[-1]  # liger cross-entropy falls back to the chunked one, not to full logits
    assert fast.kernels.names == {
        "fused_norm": "torch",
        "fused_rope": "torch",
        "fused_swiglu": "torch",
        "fused_cross_entropy": "chunked",
    }
    assert_same_training_signal(reference, fast)


def test_fast_kernels_are_wired_into_every_call_site(monkeypatch):
    """With Liger 'available' (stand-ins that count calls and compute the reference), each fast kernel is
    called where the model normalises, rotates, gates and computes the loss, and training is unchanged."""
    calls: dict[str, int] = {}

    def counting(field, compute):
        def builder():
            def fast(*args):
                calls[field] = calls.get(field, 0) + 1
                return compute(*args)

            return fast

        return builder

    stand_ins = {
        field: counting(field, getattr(REFERENCE_KERNELS, field))
        for field in ("rms_norm", "rotary", "swiglu")
    }
    stand_ins["linear_cross_entropy"] = counting("linear_cross_entropy", chunked_linear_cross_entropy)
    monkeypatch.setattr(kernels, "liger_unavailable_reason", lambda: None)
    monkeypatch.setattr(kernels, "_LIGER_BUILDERS", stand_ins)
    monkeypatch.setattr(kernels, "_cuda_or", lambda fast, reference: fast)
    reference, fast = twin(tiny(n_layers=3), **SWITCHES)
    assert set(fast.kernels.names.values()) == {"liger"}
    assert_same_training_signal(reference, fast)
    # One forward: 2 norms per block + the final norm, one rotary and one SwiGLU per block, one loss.
    assert calls == {"rms_norm": 2 * 3 + 1, "rotary": 3, "swiglu": 3, "linear_cross_entropy": 1}


def test_a_liger_without_one_kernel_falls_back_for_that_switch_only(monkeypatch, caplog):
    def missing():
        raise ImportError("cannot import name 'LigerSiLUMulFunction'")

    monkeypatch.setattr(kernels, "_logged_fallbacks", set())
    monkeypatch.setattr(kernels, "liger_unavailable_reason", lambda: None)
    monkeypatch.setattr(kernels, "_LIGER_BUILDERS", {**kernels._LIGER_BUILDERS, "swiglu": missing})
    monkeypatch.setattr(kernels, "_cuda_or", lambda fast, reference: reference)
    with caplog.at_level(logging.WARNING, logger="models.kernels"):
        chosen = select_kernels(RunOptions(fused_swiglu=True), REFERENCE_KERNELS)
    assert chosen.names == {"fused_swiglu": "torch"} and chosen.swiglu is REFERENCE_KERNELS.swiglu
    assert [r.getMessage() for r in caplog.records] == [
        "fused_swiglu: liger-kernel has no usable kernel for it (cannot import name 'LigerSiLUMulFunction'); "
        "using torch F.silu(gate) * up instead"
    ]


def test_fast_kernels_run_only_on_cuda_tensors():
    calls = []

    def fast(x, *args):
        calls.append("fast")
        return x

    def reference(x, *args):
        calls.append("reference")
        return x

    kernels._cuda_or(fast, reference)(torch.zeros(2), 1.0)
    assert calls == ["reference"]  # a GPU-trained model used on the CPU (export, chat) takes PyTorch


def test_unknown_cross_entropy_is_a_config_error():
    from common.config import ConfigError, parse_config
    from training.config import TrainConfig

    run = dataclasses.make_dataclass(
        "Run", [("train", TrainConfig, dataclasses.field(default_factory=TrainConfig))]
    )
    with pytest.raises(
        ConfigError,
        match=r"'train.fused_cross_entropy' must be Literal\['auto', 'none', 'chunked', 'liger'\]",
    ):
        parse_config(run, ["--train.fused_cross_entropy", "fast"])


def test_run_options_are_not_part_of_the_model_config():
    """Kernels and activation checkpointing are choices of a run: a saved model never carries them."""
    run_fields = {f.name for f in dataclasses.fields(RunOptions)}
    assert not run_fields & {f.name for f in dataclasses.fields(ModelConfig)}
    model = Llama(tiny(), RunOptions(fused_norm=True, fused_cross_entropy="chunked"))
    assert not run_fields & set(model.config.to_dict())


def test_select_kernels_keeps_the_reference_when_nothing_is_switched_on():
    chosen = select_kernels(RunOptions(), REFERENCE_KERNELS)
    assert chosen == REFERENCE_KERNELS and isinstance(chosen, Kernels) and chosen.names == {}


# --------------------------------------------------------------------------------------------------
# compile per block, fused AdamW
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compile_per_block_gives_the_eager_loss_and_gradients():
    torch._dynamo.reset()
    reference, compiled = twin(
        tiny(n_layers=2), RunOptions(activation_checkpointing=True), fused_cross_entropy="chunked"
    )
    names = list(compiled.state_dict())
    compile_model(compiled)
    assert list(compiled.state_dict()) == names  # in place: checkpoints keep their names
    assert all(layer._compiled_call_impl is not None for layer in compiled.model.layers)
    reference.train(), compiled.train()
    assert_same_training_signal(reference, compiled, atol=1e-4)


def test_compile_model_without_blocks_compiles_the_whole_module():
    module = torch.nn.Linear(3, 3)
    compile_model(module, backend="eager")
    assert module._compiled_call_impl is not None
    torch.testing.assert_close(
        module(torch.ones(1, 3)), F.linear(torch.ones(1, 3), module.weight, module.bias)
    )


def test_fused_adamw_is_chosen_for_the_training_device():
    model = Llama(tiny())  # still on the CPU, as when the loop builds the optimizer before prepare()
    assert build_optimizer(model, OptimConfig(), device=torch.device("cuda")).defaults["fused"] is True
    # torch has a fused CPU AdamW kernel too (several times faster than the per-tensor loop)
    assert build_optimizer(model, OptimConfig(), device=torch.device("cpu")).defaults["fused"] is True
    # fused=False is the user's explicit opt-out: torch gets fused=None (its own per-tensor default)
    assert (
        build_optimizer(model, OptimConfig(fused=False), device=torch.device("cpu")).defaults["fused"] is None
    )


# --------------------------------------------------------------------------------------------------
# Liger Kernel's own kernels: on a GPU, or on CPU tensors through Triton's interpreter
# --------------------------------------------------------------------------------------------------
# With TRITON_INTERPRET=1 Triton runs a kernel's Python source on CPU tensors instead of compiling it for a
# GPU, so the tests marked `liger` check the same Liger code on a CPU machine. Triton reads the variable
# when a kernel is defined, and conftest.py patches two gaps of its interpreter, so on a machine without
# CUDA they run in a child pytest (test_liger_kernels_run_by_tritons_interpreter) that has the variable set.

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# At the default init (std 0.02) attention is nearly uniform, so a wrong rotation changes the loss and
# gradients by less than the tolerance; larger weights make attention, and so positions, matter.
SHARP = tiny(init_std=0.3)
# The interpreter multiplies two bf16 values wrongly (it holds bf16 as raw 16-bit integers: bf16 2 x 2
# gives 0). SwiGLU's inputs are the bf16 outputs of the gate and up projections; the norm, RoPE and loss
# kernels get float32 activations under autocast (the residual stream stays float32) or load bf16 values
# into float32 before computing, so they run correctly there.
NO_BF16_SWIGLU = "Triton's interpreter multiplies bf16 values wrongly; SwiGLU in bf16 is checked on CUDA"


@pytest.fixture
def liger_device(monkeypatch) -> str:
    """Where the Liger tests run: "cuda", or "cpu" under Triton's interpreter; skipped elsewhere."""
    if INTERPRETING:  # let models/kernels.py choose Liger without CUDA and call it on CPU tensors
        monkeypatch.setattr(kernels, "liger_unavailable_reason", lambda: None)
        monkeypatch.setattr(kernels, "_cuda_or", lambda fast, reference: fast)
        return "cpu"
    if LIGER_SKIP is not None:
        pytest.skip(
            f"Liger Kernel paths: {LIGER_SKIP} (test_liger_kernels_run_by_tritons_interpreter runs them)"
        )
    return "cuda"


@pytest.mark.liger
@pytest.mark.parametrize("switch", list(SWITCHES))
def test_liger_switch_agrees_with_reference_fp32(switch, liger_device):
    reference, fast = twin(SHARP, **{switch: SWITCHES[switch]})
    assert fast.kernels.names == {switch: "liger"}
    reference.to(liger_device), fast.to(liger_device)
    assert_same_training_signal(reference, fast, atol=1e-4)


@pytest.mark.liger
def test_all_liger_switches_agree_with_reference_on_packed_documents(liger_device):
    """Every Liger kernel at once, with position ids that restart per document (a cos/sin per row)."""
    reference, fast = twin(SHARP, **SWITCHES)
    assert set(fast.kernels.names.values()) == {"liger"}
    reference.to(liger_device), fast.to(liger_device)
    positions = torch.cat((torch.arange(10), torch.arange(14))).expand(2, 24).contiguous()
    positions[1] = torch.arange(24)
    assert_same_training_signal(reference, fast, atol=1e-4, position_ids=positions)


@pytest.mark.liger
def test_all_liger_switches_agree_with_reference_under_bf16_autocast(liger_device):
    if INTERPRETING:
        pytest.skip(NO_BF16_SWIGLU)
    reference, fast = twin(tiny(), **SWITCHES)
    reference.cuda(), fast.cuda()
    ids = torch.randint(0, 211, (2, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = reference(ids, labels=ids).loss
        got = fast(ids, labels=ids).loss
    want.backward(), got.backward()
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    for (name, p), q in zip(reference.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=5e-3, rtol=5e-2, msg=name)


@pytest.mark.liger
@pytest.mark.parametrize("switch", list(SWITCHES))
def test_liger_switch_under_bf16_autocast_is_as_accurate_as_the_reference(switch, liger_device):
    """Under bf16 both paths round differently (Liger's RoPE, like transformers', rounds cos/sin to bf16),
    and sharp attention amplifies rounding to several percent of a gradient; so each is compared with the
    float32 result, and Liger's error may be at most twice the reference path's (a wrong kernel is off by
    ~100%)."""
    if INTERPRETING and switch == "fused_swiglu":
        pytest.skip(NO_BF16_SWIGLU)
    reference, fast = twin(SHARP, **{switch: SWITCHES[switch]})
    _, exact = twin(SHARP)
    for model in (reference, fast, exact):
        model.to(liger_device)
    ids = torch.randint(0, SHARP.vocab_size, (2, 64), generator=torch.Generator().manual_seed(2))
    ids = ids.to(liger_device)
    exact(ids, labels=ids).loss.backward()
    with torch.autocast(liger_device, dtype=torch.bfloat16):
        want = reference(ids, labels=ids).loss
        got = fast(ids, labels=ids).loss
    want.backward(), got.backward()
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    for (name, truth), p, q in zip(exact.named_parameters(), reference.parameters(), fast.parameters()):
        reference_error = (p.grad - truth.grad).norm() / truth.grad.norm()
        liger_error = (q.grad - truth.grad).norm() / truth.grad.norm()
        assert liger_error <= 2 * reference_error + 1e-3, (name, liger_error.item(), reference_error.item())


@pytest.mark.liger
def test_liger_rotary_matches_reference_layout(liger_device):
    """transformers' (B, H, T, D) layout, grouped keys (8 query heads, 2 key heads), a cos/sin per row."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 8, 16, 32, generator=g), torch.randn(2, 2, 16, 32, generator=g)
    angle = torch.arange(16)[:, None] * torch.rand(2, 1, 16, generator=g)  # a different angle per row
    emb = torch.cat((angle, angle), dim=-1)
    q, k, cos, sin = (t.to(liger_device) for t in (q, k, emb.cos(), emb.sin()))
    want = REFERENCE_KERNELS.rotary(q.clone(), k.clone(), cos, sin)
    fast = select_kernels(RunOptions(fused_rope=True), REFERENCE_KERNELS)
    got = fast.rotary(q.clone(), k.clone(), cos, sin)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


MISSING_FOR_INTERPRETER = [
    name for name in ("triton", "liger_kernel") if importlib.util.find_spec(name) is None
]


@pytest.mark.skipif(INTERPRETING, reason="already in Triton's interpreter")
@pytest.mark.skipif(
    bool(MISSING_FOR_INTERPRETER),
    reason=f"{' and '.join(MISSING_FOR_INTERPRETER)} not installed (requirements.txt)",
)
def test_liger_kernels_run_by_tritons_interpreter():
    """The tests marked `liger`, on CPU tensors, in a child pytest with TRITON_INTERPRET=1."""
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "liger", __file__],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-3000:]
    # every check ran except the two bf16 SwiGLU ones (NO_BF16_SWIGLU)
    assert "9 passed, 2 skipped" in child.stdout, child.stdout[-3000:]


def test_shift_labels_drops_the_first_label_and_ignores_the_last_position():
    assert shift_labels(torch.tensor([[5, 6, 7]])).tolist() == [[6, 7, -100]]


def test_flash_and_xformers_backends_get_one_dtype_under_autocast():
    """Under bf16 autocast the rotated q/k are float32 and v is bf16; the kernels autocast skips get one dtype."""
    from models.attention import one_kernel_dtype

    q, k, v = torch.ones(1, 2, 3, 4), torch.ones(1, 1, 3, 4), torch.ones(1, 1, 3, 4, dtype=torch.bfloat16)
    assert {t.dtype for t in one_kernel_dtype(q, k, v)} == {torch.float32, torch.bfloat16}  # no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert {t.dtype for t in one_kernel_dtype(q, k, v)} == {torch.bfloat16}
