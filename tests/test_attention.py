"""Attention backends agree with the eager reference (forward and backward), and document masking makes a
packed row behave exactly like its documents run one by one."""

from __future__ import annotations

import importlib.util
import itertools
import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import models.kernels as models_kernels
from models.attention import BACKENDS, PackageBackend, get_attention_backend
from models.llama import Llama, RunOptions

HAS_CUDA = torch.cuda.is_available()


def backend_or_skip(name: str):
    """The backend, or a skip that says why it cannot run here."""
    needs = {"xformers": "xformers", "flash_attn": "flash_attn"}
    if name in needs:
        if not HAS_CUDA:
            pytest.skip(f"{name} needs a CUDA GPU")
        if importlib.util.find_spec(needs[name]) is None:
            pytest.skip(f"{name} is not installed (pip install -r requirements-gpu.txt)")
    return get_attention_backend(name)


def device_and_dtype(name: str) -> tuple[str, torch.dtype, float]:
    if name in ("xformers", "flash_attn"):
        return "cuda", torch.bfloat16, 2e-2
    return ("cuda" if HAS_CUDA else "cpu"), torch.float32, 1e-5


def flex_backward_supported(device: str) -> bool:
    # torch's FlexAttention has no CPU backward (NotImplementedError: "does not support backward on CPU").
    return device != "cpu"


def qkv(batch: int, hq: int, hkv: int, t: int, d: int, device: str, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    make = lambda h: torch.randn(batch, h, t, d, generator=gen).to(device, dtype).requires_grad_()  # noqa: E731
    return make(hq), make(hkv), make(hkv)


def packed_documents(batch: int, lengths: list[int], device: str) -> torch.Tensor:
    ids = torch.cat([torch.full((n,), i + 1) for i, n in enumerate(lengths)])
    return ids.expand(batch, -1).to(device)


@pytest.mark.parametrize("name", sorted(set(BACKENDS) - {"eager"}))
@pytest.mark.parametrize("documents", [False, True], ids=["causal", "documents"])
def test_backend_agrees_with_eager_forward_and_backward(name, documents):
    backend = backend_or_skip(name)
    device, dtype, tol = device_and_dtype(name)
    eager = get_attention_backend("eager")
    t = 48
    document_ids = packed_documents(2, [10, 25, 13], device) if documents else None
    q, k, v = qkv(2, 4, 2, t, 16, device, dtype)
    grad_out = torch.randn(2, 4, t, 16, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    reference = eager(q, k, v, eager.prepare(q_len=t, kv_len=t, document_ids=document_ids, device=q.device))
    want_grads = torch.autograd.grad(reference, (q, k, v), grad_out)

    backward = name != "flex" or flex_backward_supported(device)
    if not backward:  # flex refuses inputs that require grad where it has no backward
        q, k, v = (x.detach() for x in (q, k, v))
    out = backend(q, k, v, backend.prepare(q_len=t, kv_len=t, document_ids=document_ids, device=q.device))
    assert (out.float() - reference.float()).abs().max() <= tol
    if not backward:
        pytest.skip("forward agrees; torch's flex_attention has no backward on CPU")
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    for got, want in zip(grads, want_grads):
        assert (got.float() - want.float()).abs().max() <= tol * 10


# --------------------------------------------------------------------------------------------------
# The glue of the GPU-only backends (layouts, GQA, document lengths), run on the CPU against stand-ins
# for the packages that compute what the real kernels are documented to compute. The real kernels run
# in test_backend_agrees_with_eager_forward_and_backward where a GPU and the packages are present.
# --------------------------------------------------------------------------------------------------


def causal_bthd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention in the packages' (B, T, H, D) layout; kv heads shared by groups of query heads."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)


def fake_flash_attn() -> types.ModuleType:
    """flash_attn_func and flash_attn_varlen_func (tokens of all documents flattened, int32 cu_seqlens)."""

    def flash_attn_func(q, k, v, causal):
        assert causal and q.dim() == 4 and k.shape[:2] == q.shape[:2]
        return causal_bthd(q, k, v)

    def flash_attn_varlen_func(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal):
        assert causal and q.dim() == 3 and cu_seqlens_q.dtype == torch.int32
        assert torch.equal(cu_seqlens_q, cu_seqlens_k) and max_seqlen_q == max_seqlen_k
        bounds = cu_seqlens_q.tolist()
        assert bounds[0] == 0 and bounds[-1] == q.shape[0]
        assert max_seqlen_q == max(b - a for a, b in itertools.pairwise(bounds))
        pieces = [causal_bthd(*(x[None, a:b] for x in (q, k, v)))[0] for a, b in itertools.pairwise(bounds)]
        return torch.cat(pieces)

    module = types.ModuleType("flash_attn")
    module.flash_attn_func, module.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    return module


def fake_xformers_ops() -> types.ModuleType:
    """memory_efficient_attention on (B, T, G, H, D) with a causal or block-diagonal causal bias."""

    class LowerTriangularMask:
        pass

    class BlockDiagonalCausalMask:
        @classmethod
        def from_seqlens(cls, seqlens):
            bias = cls()
            bias.seqlens = list(seqlens)
            return bias

    def memory_efficient_attention(q, k, v, attn_bias):
        b, t, g, h, d = q.shape
        assert k.shape == v.shape == q.shape  # kv heads expanded over each group's query heads
        q, k, v = (x.reshape(b, t, g * h, d) for x in (q, k, v))
        if isinstance(attn_bias, LowerTriangularMask):
            return causal_bthd(q, k, v).reshape(b, t, g, h, d)
        assert b == 1 and sum(attn_bias.seqlens) == t  # packed documents: one long row
        bounds = [0, *torch.tensor(attn_bias.seqlens).cumsum(0).tolist()]
        pieces = [causal_bthd(*(x[:, a:c] for x in (q, k, v))) for a, c in itertools.pairwise(bounds)]
        return torch.cat(pieces, dim=1).reshape(b, t, g, h, d)

    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention
    ops.fmha = types.SimpleNamespace(
        attn_bias=types.SimpleNamespace(
            LowerTriangularMask=LowerTriangularMask, BlockDiagonalCausalMask=BlockDiagonalCausalMask
        )
    )
    return ops


@pytest.fixture
def stand_in_packages(monkeypatch):
    monkeypatch.setattr(PackageBackend, "device_types", ("cuda", "cpu"))  # the stand-ins run anywhere
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn())
    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
    monkeypatch.setitem(sys.modules, "xformers.ops", fake_xformers_ops())


@pytest.mark.parametrize("name", ["xformers", "flash_attn"])
@pytest.mark.parametrize("documents", [False, True], ids=["causal", "documents"])
def test_package_backend_glue_agrees_with_eager_on_cpu(name, documents, stand_in_packages):
    backend, eager = get_attention_backend(name), get_attention_backend("eager")
    t = 48
    document_ids = packed_documents(2, [10, 25, 13], "cpu") if documents else None
    q, k, v = qkv(2, 4, 2, t, 16, "cpu", torch.float32)
    grad_out = torch.randn(2, 4, t, 16, generator=torch.Generator().manual_seed(1))
    reference = eager(q, k, v, eager.prepare(q_len=t, kv_len=t, document_ids=document_ids, device=q.device))
    out = backend(q, k, v, backend.prepare(q_len=t, kv_len=t, document_ids=document_ids, device=q.device))
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    for got, want in zip(
        torch.autograd.grad(out, (q, k, v), grad_out), torch.autograd.grad(reference, (q, k, v), grad_out)
    ):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["xformers", "flash_attn"])
def test_package_backend_model_packs_and_decodes_on_cpu(tiny_model_config, name, stand_in_packages):
    """Through the whole model: a packed row equals its documents one by one, and cached decoding (which
    falls back to sdpa for the one-query steps) equals the eager model's."""
    from models.generate import generate

    torch.manual_seed(0)
    model = Llama(tiny_model_config(vocab_size=97), RunOptions(attention_backend=name)).eval()
    reference = Llama(tiny_model_config(vocab_size=97), RunOptions(attention_backend="eager")).eval()
    reference.load_state_dict(model.state_dict())
    lengths = [7, 16, 1, 9]
    docs = [torch.randint(0, 97, (1, n)) for n in lengths]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = model(torch.cat(docs, dim=1), position_ids=position_ids).logits
        want = torch.cat([reference(doc).logits for doc in docs], dim=1)
    torch.testing.assert_close(packed, want, atol=1e-5, rtol=1e-5)
    prompt = docs[1][0].tolist()
    assert generate(model, prompt, max_new_tokens=8) == generate(reference, prompt, max_new_tokens=8)


@pytest.mark.parametrize("name", ["sdpa", "eager", "flex"])
def test_decoding_step_masks_agree(name):
    """Queries that are the last rows of a longer key sequence (KV-cache decoding), with documents."""
    backend = backend_or_skip(name)
    eager = get_attention_backend("eager")
    device = "cuda" if HAS_CUDA else "cpu"
    q = qkv(2, 4, 2, 3, 16, device, torch.float32)[0].detach()
    k, v = (x.detach() for x in qkv(2, 4, 2, 20, 16, device, torch.float32)[1:])
    document_ids = packed_documents(2, [5, 15], device)
    with torch.no_grad():
        for docs in (None, document_ids):
            want = eager(q, k, v, eager.prepare(q_len=3, kv_len=20, document_ids=docs, device=q.device))
            got = backend(q, k, v, backend.prepare(q_len=3, kv_len=20, document_ids=docs, device=q.device))
            assert (got - want).abs().max() <= 1e-5


def test_eager_reference_is_softmax_attention():
    """The reference itself against a loop over queries written from the definition."""
    eager = get_attention_backend("eager")
    q, k, v = qkv(1, 2, 1, 6, 8, "cpu", torch.float32)
    docs = packed_documents(1, [2, 4], "cpu")
    out = eager(q, k, v, eager.prepare(q_len=6, kv_len=6, document_ids=docs, device=q.device))
    for h in range(2):
        for i in range(6):
            visible = [j for j in range(i + 1) if docs[0, j] == docs[0, i]]
            scores = torch.stack([q[0, h, i] @ k[0, 0, j] for j in visible]) / 8**0.5
            want = torch.softmax(scores, 0) @ v[0, 0, visible]
            assert torch.allclose(out[0, h, i], want, atol=1e-5)


def test_unknown_backend_has_a_clear_error():
    with pytest.raises(ValueError, match="choose one of"):
        get_attention_backend("fast")


@pytest.mark.parametrize("name", ["xformers", "flash_attn"])
@pytest.mark.parametrize("installed", [False, True], ids=["missing", "installed"])
def test_gpu_backend_falls_back_to_sdpa_with_one_log_line(name, installed, monkeypatch, caplog):
    """A config written for a GPU (attention_backend flash_attn) still runs on a CPU, package or not."""
    if installed:  # the package imports, but the tensors are on the CPU
        monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn())
        monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
        monkeypatch.setitem(sys.modules, "xformers.ops", fake_xformers_ops())
    else:
        for module in ("flash_attn", "xformers", "xformers.ops"):
            monkeypatch.setitem(sys.modules, module, None)  # `import` raises ImportError
    monkeypatch.setattr(models_kernels, "_logged_fallbacks", set())
    backend, sdpa = get_attention_backend(name), get_attention_backend("sdpa")
    q, k, v = (x.detach() for x in qkv(2, 4, 2, 24, 16, "cpu", torch.float32))
    docs = packed_documents(2, [10, 14], "cpu")
    with caplog.at_level(logging.WARNING, logger="models.kernels"):
        for _ in range(2):
            got = backend(q, k, v, backend.prepare(q_len=24, kv_len=24, document_ids=docs, device=q.device))
    want = sdpa(q, k, v, sdpa.prepare(q_len=24, kv_len=24, document_ids=docs, device=q.device))
    torch.testing.assert_close(got, want)
    lines = [r.getMessage() for r in caplog.records if f"attention_backend {name}" in r.getMessage()]
    assert len(lines) == 1 and "using sdpa instead" in lines[0]
    install = get_attention_backend(name).install  # requirements-gpu.txt, or flash-attn's own command
    assert ("pip install" in lines[0] and install in lines[0]) != installed  # missing: how to install it


@pytest.mark.parametrize("name", ["sdpa", "eager", "flex"])
@pytest.mark.parametrize("stable", [False, True])
def test_packed_row_equals_documents_run_one_by_one(tiny_model_config, name, stable):
    torch.manual_seed(0)
    config = tiny_model_config(vocab_size=97, stable_embedding=stable)
    model = Llama(config, RunOptions(attention_backend=name)).eval()
    lengths = [7, 16, 1, 9]
    docs = [torch.randint(0, 97, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed_logits = model(packed, position_ids=position_ids).logits
        one_by_one = torch.cat([model(doc).logits for doc in docs], dim=1)
    assert (packed_logits - one_by_one).abs().max() <= 1e-5


def test_packed_loss_equals_weighted_per_document_loss(tiny_model_config):
    torch.manual_seed(0)
    model = Llama(tiny_model_config(vocab_size=97))
    lengths = [12, 20]
    docs = [torch.randint(0, 97, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    labels = packed.clone()
    labels[0, lengths[0]] = -100  # the first token of a document is not predicted from the previous one
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    packed_loss = model(packed, labels=labels, position_ids=positions).loss
    per_doc = [model(d, labels=d).loss * (d.shape[1] - 1) for d in docs]
    assert packed_loss.item() == pytest.approx((sum(per_doc) / (sum(lengths) - 2)).item(), abs=1e-5)
