"""DataNormSparsifier's mask in one compiled CPU kernel (numba): two passes over the batch.

The tensor-op path spends ~17 ops per batch (|x|, strided adds, sampling, comparisons,
counts, nonzero, kthvalue, the mask write) where the bound spends one multiply. Fused here:

1. one pass over the data: each block's mean (added in avg_pool2d's order and divided as it
   divides, so the norms are bit-identical) becomes an integer sort key. The same pass counts
   the keys below a bracket around the previous matrix's threshold and gathers those inside
   it (a percent or two, in index order);
2. exact selection of the k-th smallest key among the gathered ones by radix digits (count a
   digit, keep the keys with the one holding it, next digit) until one key value is left;
   ties at it go to the lower index. When the bracket misses (the first matrix of a shape, a
   shift in the data), the keys are counted by their top digit and gathered from the digit
   that holds the k-th: exact either way, only slower;
3. one pass writing the mask block by block.

A non-negative float's bits sort as integers; NaN takes +inf's key (it ranks as +inf and ties
with it, as in the tensor-op path). The loops over a block's entries are compiled unrolled for
1x2 and 1x4 blocks (other widths take a generic loop). It runs without the GIL in the calling
thread. Splitting a large matrix's passes over a second thread made the kernel alone ~1.6x
faster but a SparsifyTransform slower on the 2-core benchmark machine (torch's OpenMP threads
still spin after the masked multiply and take the second core), so it was left out.
"""

from __future__ import annotations

import math
import threading
from typing import Any, NamedTuple

import numba
import numpy as np
import torch

from pipesparse.sparsifiers._scratch import scratch

__all__ = ["supports", "write_mask"]

_DIGIT_BITS = 12
# signed keys holding the bits without the sign: numba turns uint64 mixed with int64 into float
_KEY_TYPES = {torch.float32: (torch.int32, 31, 23), torch.float64: (torch.int64, 63, 52)}
# masks the kernel writes directly: its data's float dtype, or one byte per entry (as uint8);
# others go through a byte buffer. Each (data, mask) dtype pair is one compile (cached on disk)
_BYTE_MASKS = (torch.bool, torch.uint8, torch.int8)
_CACHE = threading.local()
_CACHE_MAX = 16  # matrix shapes whose buffers a thread keeps
_SORTED_MAX = 512  # up to this many keys, a stable sort selects the k-th (no digit counts)
_MAX_RANKED_BLOCK = 16  # entries ranked one by one in a dropped block when zeros < its size
# bracket around the last threshold, in key units (ulps): from about +-1% of the value, halved
# while it gathers more than 2% of the keys, widened 4x when it misses
_BRACKET_START_BITS = 7  # half the width = 2 ** (mantissa bits - this)
_BRACKET_MAX_SHARE = 0.02
_jit = numba.njit(cache=True, nogil=True, boundscheck=False)
_inline = numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")


@_inline
def _norm(value, l2):
    return value * value if l2 else abs(value)


@_inline
def _add_row(row, sums, block_w, full, l2):
    """Add one matrix row's entries into the sums of its blocks, left to right."""
    for c in range(full):
        total = sums[c]
        base = c * block_w
        for j in range(block_w):
            total += _norm(row[base + j], l2)
        sums[c] = total
    if full < sums.shape[0]:  # the partial block at the right edge
        total = sums[full]
        for j in range(full * block_w, row.shape[0]):
            total += _norm(row[j], l2)
        sums[full] = total


@_inline
def _add_row_any(row, sums, block_w, full, l2):
    """:func:`_add_row` with the width a compile-time constant for 1x2 and 1x4 blocks (the loop
    unrolls and vectorises; every width compiled in costs seconds of first-use compile)."""
    if l2:
        if block_w == 2:
            _add_row(row, sums, 2, full, True)
        elif block_w == 4:
            _add_row(row, sums, 4, full, True)
        else:
            _add_row(row, sums, block_w, full, True)
    elif block_w == 2:
        _add_row(row, sums, 2, full, False)
    elif block_w == 4:
        _add_row(row, sums, 4, full, False)
    else:
        _add_row(row, sums, block_w, full, False)


@_inline
def _divide(sums, start, stop, count):
    """sums / count, rounded as a float division in the sums' dtype rounds it (exactly what
    avg_pool2d does). A power of two is a multiplication in float64: the same real number."""
    if start >= stop:
        return
    if count & (count - 1) == 0:
        scale = 1.0 / count
        for c in range(start, stop):
            sums[c] = sums[c] * scale
    else:
        for c in range(start, stop):
            sums[c] = sums[c] / count


@_inline
def _bracket_row(key_row, start, lo, hi, in_bracket, cand_keys, cand_index, found):
    """(keys of one row below ``lo``, candidates now): the row's keys in ``lo .. hi`` appended
    in index order (``start`` = the row's first flat index). One vectorised loop counts the
    keys below and flags those in the bracket (one byte each); a scalar look then goes only
    into the 8-byte words of flags that hold one (1-2% of the keys are in the bracket)."""
    cols = key_row.shape[0]
    below = 0
    for c in range(cols):
        key = key_row[c]
        below += key < lo
        in_bracket[c] = (key >= lo) & (key <= hi)
    words = in_bracket.view(np.uint64)
    for word in range(-(-cols // 8)):
        if words[word]:
            for c in range(word * 8, min(word * 8 + 8, cols)):
                if in_bracket[c]:
                    cand_keys[found] = key_row[c]
                    cand_index[found] = start + c
                    found += 1
    return below, found


@_jit
def _keys(
    x,
    l2,
    block_h,
    block_w,
    sums,
    bits,
    keys,
    magnitude,
    inf,
    bracket,
    in_bracket,
    cand_keys,
    cand_index,
):
    """Sort keys of the block means of one (H, W) matrix: the one pass over the data.
    Returns (keys below the bracket, keys in it), the latter gathered in index order into
    ``cand_keys``/``cand_index``."""
    height, width = x.shape
    rows, cols = keys.shape
    full = width // block_w
    lo, hi = bracket[0], bracket[1]
    below = 0
    found = 0
    for r in range(rows):
        top = r * block_h
        bottom = min(top + block_h, height)
        sums[:] = 0
        for i in range(top, bottom):  # row by row, as avg_pool2d adds up a window
            _add_row_any(x[i], sums, block_w, full, l2)
        _divide(sums, 0, full, (bottom - top) * block_w)
        _divide(sums, full, cols, (bottom - top) * (width - full * block_w))
        key_row = keys[r]
        for c in range(cols):
            key_row[c] = min(bits[c] & magnitude, inf)  # -0.0 -> +0.0's key, NaN -> +inf's
        row_below, found = _bracket_row(
            key_row, r * cols, lo, hi, in_bracket, cand_keys, cand_index, found
        )
        below += row_below
    return below, found


@_jit
def _digit_of_kth(counts, bins, k, below):
    """(digit holding the k-th smallest, keys below that digit)."""
    for digit in range(bins):
        if below + counts[digit] >= k:
            return digit, below
        below += counts[digit]
    return bins - 1, below


@_jit
def _refine(cand_keys, cand_index, found, need, counts, shift, digit_bits):
    """(key, index) of the ``need``-th smallest of the first ``found`` candidates (in index
    order, keys below ``2 ** shift``), ties to the lower index: radix digits from the top, or
    a stable sort when there are few (a digit's counts would outnumber them)."""
    if found <= _SORTED_MAX:
        order = np.argsort(cand_keys[:found], kind="mergesort")
        return cand_keys[order[need - 1]], cand_index[order[need - 1]]
    below = 0
    while shift > 0:
        low = max(shift - digit_bits, 0)
        digit_mask = (1 << (shift - low)) - 1
        counts[: digit_mask + 1] = 0
        for i in range(found):
            counts[(cand_keys[i] >> low) & digit_mask] += 1
        digit, below = _digit_of_kth(counts, digit_mask + 1, need, below)
        kept = 0
        for i in range(found):  # in order: ties stay sorted by index
            key = cand_keys[i]
            cand_keys[kept] = key
            cand_index[kept] = cand_index[i]
            kept += (key >> low) & digit_mask == digit
        found = kept
        shift = low
    return cand_keys[0], cand_index[need - below - 1]


@_jit
def _threshold(keys, k, below, found, cand_keys, cand_index, counts, bracket, key_bits, digit_bits):
    """(threshold key, last dropped flat index among the keys equal to it) for dropping the
    ``k`` smallest ``keys`` (k >= 1), from what :func:`_keys` counted below the bracket and
    gathered in it. Then moves ``bracket`` (lo, hi, width, in the keys' dtype; empty before the
    first threshold) onto the threshold for the next matrix: narrower while it holds over
    ``_BRACKET_MAX_SHARE`` of the keys, 4x wider after a miss."""
    flat = keys.ravel()
    width = bracket[2]
    if flat.shape[0] <= _SORTED_MAX:  # a small matrix: all its keys, sorted
        below = 0
        found = flat.shape[0]
        cand_keys[:found] = flat
        cand_index[:found] = np.arange(found)
    elif below < k <= below + found:
        if found > _BRACKET_MAX_SHARE * flat.shape[0] and width > 2:
            width //= 2
    else:  # missed: gather the keys of the top digit holding the k-th instead
        width = min(width, 1 << (key_bits - 3)) * 4  # at most 2 ** (key_bits - 1): no overflow
        shift = key_bits - digit_bits
        bins = 1 << digit_bits
        counts[:bins] = 0
        for i in range(flat.shape[0]):
            counts[flat[i] >> shift] += 1
        digit, below = _digit_of_kth(counts, bins, k, 0)
        found = 0
        for i in range(flat.shape[0]):
            key = flat[i]
            cand_keys[found] = key  # written always, kept if it matches: no branch to miss
            cand_index[found] = i
            found += key >> shift == digit
    threshold, last_tied = _refine(
        cand_keys, cand_index, found, k - below, counts, key_bits, digit_bits
    )
    largest = ((1 << (key_bits - 1)) - 1) * 2 + 1  # 2 ** key_bits - 1 without overflowing
    bracket[0] = max(threshold - width // 2, 0)
    bracket[1] = threshold + min(width // 2, largest - threshold)
    bracket[2] = width
    return threshold, last_tied


@_inline
def _write_row(key_row, first, threshold, last_tied, mask_row, block_w, full):
    """One matrix row of the mask: each block's entries 0 (dropped) or 1."""
    for c in range(full):
        key = key_row[c]
        dropped = (key < threshold) | ((key == threshold) & (first + c <= last_tied))
        base = c * block_w
        for j in range(block_w):
            mask_row[base + j] = 0 if dropped else 1
    if full < key_row.shape[0]:
        key = key_row[full]
        dropped = (key < threshold) | ((key == threshold) & (first + full <= last_tied))
        for j in range(full * block_w, mask_row.shape[0]):
            mask_row[j] = 0 if dropped else 1


@_inline
def _write_row_any(key_row, first, threshold, last_tied, mask_row, block_w, full):
    """:func:`_write_row` with the width a compile-time constant for 1x2 and 1x4 blocks."""
    if block_w == 2:
        _write_row(key_row, first, threshold, last_tied, mask_row, 2, full)
    elif block_w == 4:
        _write_row(key_row, first, threshold, last_tied, mask_row, 4, full)
    else:
        _write_row(key_row, first, threshold, last_tied, mask_row, block_w, full)


@_jit
def _rank_in_block(x, l2, i, j, top, left, block_h, block_w):
    """Rank of entry (i, j) when torch.sort orders its NaN-padded block: values ascending,
    NaN and padding last, ties by position."""
    height, width = x.shape
    value = _norm(x[i, j], l2)
    own = (i - top) * block_w + (j - left)
    rank = 0
    for a in range(block_h):
        for b in range(block_w):
            pos = a * block_w + b
            if pos == own:
                continue
            if top + a < height and left + b < width:
                other = _norm(x[top + a, left + b], l2)
            else:
                other = np.nan
            if np.isnan(value):
                rank += (not np.isnan(other)) or pos < own
            elif not np.isnan(other):
                rank += other < value or (other == value and pos < own)
    return rank


@_jit
def _keep_in_dropped(x, l2, block_h, block_w, keys, threshold, last_tied, zeros, mask):
    """Put back all but the ``zeros`` smallest entries of each dropped block."""
    height, width = x.shape
    rows, cols = keys.shape
    for r in range(rows):
        top = r * block_h
        for c in range(cols):
            key = keys[r, c]
            if key > threshold or (key == threshold and r * cols + c > last_tied):
                continue
            left = c * block_w
            for i in range(top, min(top + block_h, height)):
                for j in range(left, min(left + block_w, width)):
                    if _rank_in_block(x, l2, i, j, top, left, block_h, block_w) >= zeros:
                        mask[i, j] = 1


@_jit
def _write(block_h, block_w, keys, threshold, last_tied, mask):
    """One matrix's mask: a block is dropped when its key is below ``threshold``, or equal to
    it at a flat index up to ``last_tied``."""
    height, width = mask.shape
    rows, cols = keys.shape
    full = width // block_w
    for r in range(rows):
        for i in range(r * block_h, min(r * block_h + block_h, height)):
            _write_row_any(keys[r], r * cols, threshold, last_tied, mask[i], block_w, full)


@_jit
def _masks(
    x,
    l2,
    block_h,
    block_w,
    k,
    zeros,
    mask,
    sums,
    bits,
    keys,
    in_bracket,
    cand_keys,
    cand_index,
    counts,
    bracket,
    magnitude,
    inf,
    key_bits,
    digit_bits,
):
    """The mask of every matrix of a (B, H, W) batch, in turn."""
    for b in range(x.shape[0]):
        below, found = _keys(
            x[b],
            l2,
            block_h,
            block_w,
            sums,
            bits,
            keys,
            magnitude,
            inf,
            bracket,
            in_bracket,
            cand_keys,
            cand_index,
        )
        threshold, last_tied = _threshold(
            keys, k, below, found, cand_keys, cand_index, counts, bracket, key_bits, digit_bits
        )
        _write(block_h, block_w, keys, threshold, last_tied, mask[b])
        if zeros < block_h * block_w:
            _keep_in_dropped(x[b], l2, block_h, block_w, keys, threshold, last_tied, zeros, mask[b])


def supports(data: torch.Tensor, mask: torch.Tensor, block: tuple[int, int], zeros: int) -> bool:
    """Whether :func:`write_mask` handles this data and mask (else the tensor-op path runs)."""
    return (
        data.device.type == "cpu"
        and mask.device.type == "cpu"
        and mask.is_contiguous()
        and mask.shape == data.shape
        and data.numel() < 2**31  # block indices and counts are int32
        and (zeros >= block[0] * block[1] or block[0] * block[1] <= _MAX_RANKED_BLOCK)
    )


class _Buffers(NamedTuple):
    """A thread's scratch arrays and constants for one matrix shape, in :func:`_masks`'s
    argument order (passed as ``*buffers``; named for the benchmark's per-phase profile)."""

    sums: np.ndarray  # a row of block sums, then means
    bits: np.ndarray  # the same row as integers
    keys: np.ndarray  # (rows, cols) sort keys
    in_bracket: np.ndarray  # 1 where a key of the row is in the bracket
    cand_keys: np.ndarray  # the keys gathered from the bracket
    cand_index: np.ndarray  # and their flat indices
    counts: np.ndarray  # one digit's counts
    bracket: np.ndarray  # (lo, hi, width); carries over from matrix to matrix
    magnitude: Any  # every bit of a key but the sign
    inf: Any  # +inf's key
    key_bits: int
    digit_bits: int


def _buffers(height: int, width: int, dtype: torch.dtype, block: tuple[int, int]) -> _Buffers:
    """The kernel's scratch arrays and constants for one matrix shape, kept by this thread
    (building them costs more than a small matrix's mask), with the bracket that carries over
    from matrix to matrix."""
    cache = getattr(_CACHE, "buffers", None)
    if cache is None:
        cache = _CACHE.buffers = {}
    key = (height, width, dtype, block)
    found = cache.get(key)
    if found is None:
        key_dtype, key_bits, mantissa_bits = _KEY_TYPES[dtype]
        rows, cols = -(-height // block[0]), -(-width // block[1])
        sums = np.empty(cols, dtype=torch.empty(0, dtype=dtype).numpy().dtype)
        key_type = torch.empty(0, dtype=key_dtype).numpy().dtype
        found = _Buffers(
            sums=sums,
            bits=sums.view(key_type),
            keys=np.empty((rows, cols), dtype=key_type),
            in_bracket=np.zeros(-(-cols // 8) * 8, dtype=np.uint8),  # whole 8-byte words
            cand_keys=np.empty(rows * cols, dtype=key_type),
            cand_index=np.empty(rows * cols, dtype=np.int32),
            counts=np.empty(1 << _DIGIT_BITS, dtype=np.int32),
            # about +-1% of the value around the first threshold; empty (lo > hi) before it
            bracket=np.array(
                [1, 0, 2 ** (mantissa_bits - _BRACKET_START_BITS + 1)], dtype=key_type
            ),
            magnitude=key_type.type((1 << key_bits) - 1),
            inf=np.array(math.inf, dtype=sums.dtype).view(key_type)[()],
            key_bits=key_bits,
            digit_bits=_DIGIT_BITS,
        )
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        cache[key] = found
    return found


def write_mask(
    matrices: torch.Tensor,
    mask: torch.Tensor,
    k: int,
    block: tuple[int, int],
    zeros: int,
    norm: str,
) -> None:
    """Write the mask of (B, H, W) ``matrices`` into ``mask`` (same shape, contiguous; see
    :func:`supports`): in each matrix the ``k`` (>= 1) blocks of lowest mean norm are dropped,
    ``zeros`` entries of each (all when ``zeros`` covers the block).

    float16, bfloat16 and integer data are ranked in float32, as the tensor-op path ranks
    them. A mask of another dtype than the (ranked) data's, other than a one-byte one, is
    written through a byte buffer."""
    matrices = matrices.detach()
    if matrices.dtype not in _KEY_TYPES:
        matrices = matrices.float()
    x = matrices.contiguous().numpy()
    _, height, width = x.shape
    if mask.dtype == matrices.dtype or mask.dtype in _BYTE_MASKS:
        target = mask if mask.dtype == matrices.dtype else mask.view(torch.uint8)
    else:
        target = scratch("kernel_mask", tuple(mask.shape), torch.uint8)
    buffers = _buffers(height, width, matrices.dtype, block)
    target_array = target.detach().view(-1, height, width).numpy()
    _masks(x, norm == "L2", *block, k, zeros, target_array, *buffers)
    if target.data_ptr() != mask.data_ptr():
        mask.copy_(target)
