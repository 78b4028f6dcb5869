"""Shared pytest set-up: where the real corpus lives and how tests skip without it; Triton's interpreter."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_CORPUS = Path(os.environ.get("OPEN_LLAMA_SHARED", REPO_ROOT.parent / "shared")) / "corpus"

# Tests run on 2 CPU cores; keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def teach_tritons_interpreter_liger() -> None:
    """Close two gaps between Triton's interpreter and compiled Triton that Liger Kernel's kernels run into
    (the `liger` tests in test_kernels.py run Liger on CPU tensors with TRITON_INTERPRET=1)."""
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


if os.environ.get("TRITON_INTERPRET") == "1":
    teach_tritons_interpreter_liger()


@pytest.fixture(scope="session")
def shared_corpus() -> Path:
    """The real corpus in ../shared/corpus; tests that need it skip on a fresh clone."""
    if not (SHARED_CORPUS / "raw").is_dir():
        pytest.skip(f"real corpus not found at {SHARED_CORPUS} (present in CI, absent on a fresh clone)")
    return SHARED_CORPUS
