"""Triton helpers shared by the kernel families (imports only triton)."""
import triton
import triton.language as tl


@triton.jit
def to_acc(x, IS_FP64: tl.constexpr):
    """``x`` in the accumulation dtype: float64 for float64 inputs, float32 otherwise."""
    if IS_FP64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)
