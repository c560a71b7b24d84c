"""Bit-level operations for numba kernels that numba has no word for: a float's bits as an
integer (without a round trip through an array) and a word's trailing zero bits. Both are
single LLVM instructions, so loops using them still vectorise or stay branch-free.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

__all__ = ["float_bits", "trailing_zeros"]

_BITS_OF = {types.float32: types.int32, types.float64: types.int64}


@intrinsic
def float_bits(typingctx, value, like):
    """The bits of ``value`` rounded to the float dtype of array ``like``, as a signed integer of
    that width (a float's bits sort as integers when it is not negative)."""
    if not isinstance(like, types.Array) or like.dtype not in _BITS_OF:
        return None
    if not isinstance(value, types.Float):
        return None
    bits = _BITS_OF[like.dtype]

    def codegen(context, builder, signature, args):
        rounded = context.cast(builder, args[0], signature.args[0], like.dtype)
        return builder.bitcast(rounded, context.get_value_type(bits))

    return bits(value, like), codegen


@intrinsic
def trailing_zeros(typingctx, word):
    """Index of the lowest set bit of a non-zero unsigned 64-bit ``word``, as an int64."""
    if word != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        count = builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))  # zero input: undefined
        return count  # same width; reinterpreted as signed, it is 0..63

    return types.int64(word), codegen
