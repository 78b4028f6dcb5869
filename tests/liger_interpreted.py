"""Liger Kernel's real Triton kernels on CPU tensors, run by Triton's interpreter, against the reference.

Not collected by a plain `pytest` run: `tests/test_kernels.py::test_liger_kernels_run_by_tritons_interpreter`
runs this file in a child pytest process with `TRITON_INTERPRET=1`, because Triton reads that variable when
a kernel is defined (at import) and because two gaps of its interpreter need patching
(`_teach_the_interpreter_liger`), which should not leak into other tests. With the variable, Triton executes
a kernel's Python source on CPU tensors instead of compiling it for a GPU, so the same Liger code that runs
on CUDA runs here, forward and backward, in float32 and (except SwiGLU) under bf16 autocast.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_kernels import SWITCHES, assert_same_training_signal, tiny, twin

from models import kernels
from models.llama import REFERENCE_KERNELS

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run with TRITON_INTERPRET=1 (test_kernels.py does)", allow_module_level=True)


def _teach_the_interpreter_liger() -> None:
    """Close two gaps between Triton's interpreter and compiled Triton that Liger's kernels run into."""
    import numpy as np
    import triton.language as tl
    from liger_kernel.ops import rms_norm as liger_rms_norm
    from triton.runtime import interpreter
    from triton.runtime.jit import mangle_type

    # 1. Compiled Triton passes a Python float argument as an fp32 scalar, on which Liger calls
    #    `.to(tl.float32)`; the interpreter passes the bare float (its own comment: "TODO: wrap everything
    #    in triton tensors"). Wrap floats the way it already wraps ints.
    wrap_scalar = interpreter._implicit_cvt

    def wrap_float_too(arg):
        if isinstance(arg, float):
            fp32 = tl.str_to_ty(mangle_type(arg), None)
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), fp32), fp32)
        return wrap_scalar(arg)

    interpreter._implicit_cvt = wrap_float_too
    # 2. Liger's RMSNorm imports libdevice's `rsqrt` by name; the interpreter replaces only functions reached
    #    through the `tl` modules, so the bare name returns None there. 1/sqrt is the same function.
    liger_rms_norm.rsqrt = lambda x: 1.0 / tl.sqrt(x)


_teach_the_interpreter_liger()


# At the default init (std 0.02) attention is nearly uniform, so a wrong rotation changes the loss and
# gradients by less than the tolerance; larger weights make attention, and so positions, matter.
SHARP = tiny(init_std=0.3)


@pytest.fixture(autouse=True)
def liger_on_cpu_tensors(monkeypatch):
    """Let models/kernels.py choose Liger without CUDA, and call it on CPU tensors."""
    monkeypatch.setattr(kernels, "liger_unavailable_reason", lambda: None)
    monkeypatch.setattr(kernels, "_cuda_or", lambda fast, reference: fast)


@pytest.mark.parametrize("switch", list(SWITCHES))
def test_each_liger_switch_agrees_with_reference(switch):
    reference, fast = twin(SHARP, **{switch: SWITCHES[switch]})
    assert fast.kernels.names == {switch: "liger"}
    assert_same_training_signal(reference, fast, atol=1e-4)


def test_all_liger_switches_agree_with_reference_on_packed_documents():
    """Every Liger kernel at once, with position ids that restart per document (a cos/sin per row)."""
    reference, fast = twin(SHARP, **SWITCHES)
    assert set(fast.kernels.names.values()) == {"liger"}
    positions = torch.cat((torch.arange(10), torch.arange(14))).expand(2, 24).contiguous()
    positions[1] = torch.arange(24)
    assert_same_training_signal(reference, fast, atol=1e-4, position_ids=positions)


def test_liger_rotary_takes_transformers_layout_with_grouped_keys():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 8, 16, 32, generator=g), torch.randn(2, 2, 16, 32, generator=g)
    angle = torch.arange(16)[:, None] * torch.rand(2, 1, 16, generator=g)  # a different angle per row
    emb = torch.cat((angle, angle), dim=-1)
    want = REFERENCE_KERNELS.rotary(q.clone(), k.clone(), emb.cos(), emb.sin())
    got = kernels.select_kernels(tiny(fused_rope=True), REFERENCE_KERNELS).rotary(
        q.clone(), k.clone(), emb.cos(), emb.sin()
    )
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# Not fused_swiglu: its inputs are the bf16 outputs of the gate and up projections, and this interpreter
# multiplies two bf16 values wrongly (it holds bf16 as raw 16-bit integers: bf16 2 x 2 gives 0). The norm,
# RoPE and loss kernels get float32 activations under autocast (the residual stream stays float32) or load
# bf16 values into float32 before computing, so they run correctly here.
@pytest.mark.parametrize("switch", ["fused_norm", "fused_rope", "fused_cross_entropy"])
def test_liger_switch_under_bf16_autocast_is_as_accurate_as_the_reference(switch):
    """Under bf16 both paths round differently (Liger's RoPE, like transformers', rounds cos/sin to bf16),
    and sharp attention amplifies rounding to several percent of a gradient; so each is compared with the
    float32 result, and Liger's error may be at most twice the reference path's (a wrong kernel is off by
    ~100%)."""
    reference, fast = twin(SHARP, **{switch: SWITCHES[switch]})
    _, exact = twin(SHARP)
    ids = torch.randint(0, SHARP.vocab_size, (2, 64), generator=torch.Generator().manual_seed(2))
    exact(ids, labels=ids).loss.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = reference(ids, labels=ids).loss
        got = fast(ids, labels=ids).loss
    want.backward(), got.backward()
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    for (name, truth), p, q in zip(exact.named_parameters(), reference.parameters(), fast.parameters()):
        reference_error = (p.grad - truth.grad).norm() / truth.grad.norm()
        liger_error = (q.grad - truth.grad).norm() / truth.grad.norm()
        assert liger_error <= 2 * reference_error + 1e-3, (name, liger_error.item(), reference_error.item())
