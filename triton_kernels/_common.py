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


@triton.jit
def mma(a, b, acc, IS_FP32: tl.constexpr):
    """``acc += a @ b``: fp32 operands without tf32 (IEEE FMA), fp16/bf16 -> fp32, fp64 -> fp64."""
    if IS_FP32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)
