"""Atomic operations on int64 array entries for numba kernels that share work across threads.

numba has no atomics of its own; these emit LLVM's (``atomicrmw``, ``cmpxchg``, atomic loads
and stores), so two threads running compiled code can hand out work and wait on each other
without the GIL or a lock.
"""

from __future__ import annotations

from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["atomic_add", "atomic_cas", "atomic_load", "atomic_store"]


def _is_int64_array(array) -> bool:
    return isinstance(array, types.Array) and array.dtype == types.int64


def _pointer(context, builder, array_type, array, index):
    ary = context.make_array(array_type)(context, builder, array)
    return cgutils.get_item_pointer(context, builder, array_type, ary, [index], wraparound=False)


@intrinsic
def atomic_add(typingctx, array, index, value):
    """``array[index] += value`` as one atomic step; returns the value before."""
    if not _is_int64_array(array):
        return None

    def codegen(context, builder, signature, args):
        ptr = _pointer(context, builder, signature.args[0], args[0], args[1])
        amount = context.cast(builder, args[2], signature.args[2], types.int64)
        return builder.atomic_rmw("add", ptr, amount, "seq_cst")

    return types.int64(array, index, value), codegen


@intrinsic
def atomic_load(typingctx, array, index):
    """``array[index]``, read with acquire order (sees what was written before the store)."""
    if not _is_int64_array(array):
        return None

    def codegen(context, builder, signature, args):
        ptr = _pointer(context, builder, signature.args[0], args[0], args[1])
        return builder.load_atomic(ptr, "acquire", 8)

    return types.int64(array, index), codegen


@intrinsic
def atomic_store(typingctx, array, index, value):
    """``array[index] = value`` with release order (publishes every write before it)."""
    if not _is_int64_array(array):
        return None

    def codegen(context, builder, signature, args):
        ptr = _pointer(context, builder, signature.args[0], args[0], args[1])
        value = context.cast(builder, args[2], signature.args[2], types.int64)
        builder.store_atomic(value, ptr, "release", 8)
        return context.get_dummy_value()

    return types.void(array, index, value), codegen


@intrinsic
def atomic_cas(typingctx, array, index, expected, new):
    """Set ``array[index]`` to ``new`` if it holds ``expected``, atomically; True if it did."""
    if not _is_int64_array(array):
        return None

    def codegen(context, builder, signature, args):
        ptr = _pointer(context, builder, signature.args[0], args[0], args[1])
        old = context.cast(builder, args[2], signature.args[2], types.int64)
        value = context.cast(builder, args[3], signature.args[3], types.int64)
        return builder.extract_value(builder.cmpxchg(ptr, old, value, "seq_cst", "seq_cst"), 1)

    return types.boolean(array, index, expected, new), codegen
