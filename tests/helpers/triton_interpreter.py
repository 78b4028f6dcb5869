"""Triton's interpreter taught what Liger Kernel's kernels need, for the tests that run Liger on CPU tensors."""

from __future__ import annotations


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
