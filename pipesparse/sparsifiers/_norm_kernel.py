"""DataNormSparsifier's mask in one compiled CPU kernel (numba): two passes over the batch.

The tensor-op path spends ~17 ops per batch (|x|, strided adds, sampling, comparisons,
counts, nonzero, kthvalue, the mask write) where the bound spends one multiply. Fused here:

1. one pass over the data: each block's mean (added in avg_pool2d's order and divided as it
   divides, so the norms are bit-identical) becomes an integer sort key. The same pass counts
   the keys below a bracket around the previous matrix's threshold and gathers those inside
   it (a percent or two, in index order, by the set bits of a comparison word per 64 keys);
2. exact selection of the k-th smallest key among the gathered ones by radix digits (count a
   digit, keep the keys with the one holding it, next digit) until one key value is left;
   ties at it go to the lower index. Among at most 512 keys (a small matrix), one in-place
   selection of (key, index) pairs instead. When the bracket misses (the first matrix of a
   shape, a shift in the data), the keys are counted by their top digit and gathered from the
   digit that holds the k-th: exact either way, only slower;
3. one pass writing the mask block by block.

A non-negative float's bits sort as integers; NaN takes +inf's key (it ranks as +inf and ties
with it, as in the tensor-op path). The loops over a block's entries are compiled unrolled for
1x2 and 1x4 blocks (other widths take a generic loop).

It runs without the GIL. The keys pass takes the block rows a group at a time (keyed, then
gathered while their keys are in the core's cache), and the mask pass can write the masked
data as well (``data * mask``, in place or into another tensor): the multiply the caller would
make next, without its second read of the data and the mask. A large matrix is cut into bands
of block rows, one per torch intra-op thread (one in a DataLoader worker), that numba's OpenMP
threads key and write at once; the selection between the passes runs in the caller (a batch
of smaller matrices: runs of whole matrices, one per thread, each with its own buffers). Python
helper threads did worse: they had to take the GIL to start, just when the caller wanted it
back. Short rows of whole 1xN blocks are keyed as if joined into long ones (same flat order of
blocks, same mask)."""

from __future__ import annotations

import functools
import math
import os
import threading
from typing import Any, NamedTuple

import numba
import numpy as np
import torch

from pipesparse.sparsifiers._bits import float_bits, trailing_zeros
from pipesparse.sparsifiers._scratch import scratch

__all__ = ["matrix_shape", "ranked_dtype", "supports", "write_mask"]

_DIGIT_BITS = 12
# signed keys holding the bits without the sign: numba turns uint64 mixed with int64 into float
_KEY_TYPES = {torch.float32: (torch.int32, 31, 23), torch.float64: (torch.int64, 63, 52)}
# masks the kernel writes directly: its data's float dtype, or one byte per entry (as uint8);
# others go through a byte buffer. Each (data, mask) dtype pair is one compile (cached on disk)
_BYTE_MASKS = (torch.bool, torch.uint8, torch.int8)
# integers wider than float32's 24-bit significand: ranked in float64 (exact below 2**53)
_WIDE_INTS = (torch.int32, torch.int64, torch.uint32, torch.uint64)
_CACHE = threading.local()
_CACHE_MAX = 16  # matrix shapes whose buffers a thread keeps
_SORTED_MAX = 512  # up to this many keys, one in-place selection finds the k-th (no digits)
_MAX_RANKED_BLOCK = 16  # entries ranked one by one in a dropped block when zeros < its size
_GROUP_ENTRIES = 16384  # the keys pass keys about this many entries, then gathers them
# a matrix is split into bands of rows, one per thread, from this many entries per band:
# below, starting the threads costs more than they save (64x1024 float32: 35 vs 31 us)
_BAND_ENTRIES = 65536
_JOINED_ROW_ENTRIES = 1024  # rows of a few 1xN blocks are keyed as if joined up to this long
# whether numba's threads may share a matrix: its OpenMP layer, not since this process forked
_THREADS: dict[str, bool] = {}
# bracket around the last threshold, in key units (ulps): from about +-1% of the value, halved
# while it gathers more than 2% of the keys, widened 4x when it misses
_BRACKET_START_BITS = 7  # half the width = 2 ** (mantissa bits - this)
_BRACKET_MAX_SHARE = 0.02
_jit = numba.njit(cache=True, nogil=True, boundscheck=False)
# numba-level inlining only where a constant argument must specialise a loop (block widths):
# it costs seconds of compile per call site. Small helpers are plain _jit; LLVM inlines them
_inline = numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")
_parallel = numba.njit(cache=True, nogil=True, boundscheck=False, parallel=True)


@_jit
def _norm(value, l2):
    return value * value if l2 else abs(value)


@_inline
def _add_row(row, sums, block_w, l2):
    """Add one matrix row's entries into the sums of its whole blocks, left to right (the
    partial block at the right edge is :func:`_add_edge`'s: in this loop's function it slows
    the loop down)."""
    for c in range(row.shape[0] // block_w):
        total = sums[c]
        base = c * block_w
        for j in range(block_w):
            total += _norm(row[base + j], l2)
        sums[c] = total


@_jit
def _add_edge(row, sums, left, l2):
    """Add the row's entries from ``left`` on into the sum of its partial block at the edge."""
    total = sums[-1]
    for j in range(left, row.shape[0]):
        total += _norm(row[j], l2)
    sums[-1] = total


@_inline
def _add_row_any(row, sums, block_w, l2):
    """:func:`_add_row` with the width a compile-time constant for 1x2 and 1x4 blocks (the loop
    unrolls and vectorises; every width compiled in costs seconds of first-use compile)."""
    if l2:
        if block_w == 2:
            _add_row(row, sums, 2, True)
        elif block_w == 4:
            _add_row(row, sums, 4, True)
        else:
            _add_row(row, sums, block_w, True)
    elif block_w == 2:
        _add_row(row, sums, 2, False)
    elif block_w == 4:
        _add_row(row, sums, 4, False)
    else:
        _add_row(row, sums, block_w, False)


@_jit
def _mean(total, count, like):
    """total / count rounded as avg_pool2d rounds it: a float division in the data's dtype (the
    caller rounds to it). A power of two is a multiplication in ``like``'s dtype: the same real
    number, rounded once, without widening the lanes to float64."""
    if count & (count - 1) == 0:
        return total * like.dtype.type(1.0 / count)
    return total / count


@_jit
def _key(mean, like, magnitude, inf):
    """A block's sort key: its mean rounded to ``like``'s dtype, as an integer (-0.0 takes
    +0.0's key, NaN +inf's)."""
    return min(float_bits(mean, like) & magnitude, inf)


@_inline
def _keys_of_sums(sums, key_row, start, stop, count, lo, magnitude, inf):
    """Keys of the block sums ``start:stop`` of a row of blocks of ``count`` entries each, and
    how many of them fall below ``lo``. One loop, no branch: it vectorises."""
    below = 0
    for c in range(start, stop):
        key = _key(_mean(sums[c], count, sums), sums, magnitude, inf)
        key_row[c] = key
        below += key < lo
    return below


@_inline
def _keys_of_rows(x, l2, block_w, keys, top_row, stop_row, lo, magnitude, inf):
    """:func:`_keys_of_sums` for blocks one matrix row high (rows ``top_row:stop_row``), each
    block summed in the loop that keys it (left to right, as avg_pool2d adds them): no sums
    array between two loops. The partial block at the right edge is :func:`_edge_key`'s:
    inside this loop's function it costs the loop a quarter of its speed."""
    full = x.shape[1] // block_w
    below = 0
    for r in range(top_row, stop_row):
        row, key_row = x[r], keys[r]
        for c in range(full):
            base = c * block_w
            total = _norm(row[base], l2)  # = 0 + it: a norm is never -0.0
            for j in range(1, block_w):  # a constant trip count: unrolled, the loop vectorises
                total += _norm(row[base + j], l2)
            key = _key(_mean(total, block_w, row), row, magnitude, inf)
            key_row[c] = key
            below += key < lo
        if full < key_row.shape[0]:
            below += _edge_key(row, l2, full * block_w, key_row, lo, magnitude, inf)
    return below


@_jit
def _edge_key(row, l2, left, key_row, lo, magnitude, inf):
    """:func:`_keys_of_rows` for the partial block from ``left`` to the end of the row."""
    total = _norm(row[left], l2)
    for j in range(left + 1, row.shape[0]):
        total += _norm(row[j], l2)
    key = _key(_mean(total, row.shape[0] - left, row), row, magnitude, inf)
    key_row[-1] = key
    return key < lo


@_inline
def _keys_of_rows_any(x, l2, block_w, keys, top_row, stop_row, lo, magnitude, inf):
    """:func:`_keys_of_rows` with the width a compile-time constant for 1x2 and 1x4 blocks,
    chosen once per group of rows (chosen per row, the choice slows the pass down)."""
    if l2:
        if block_w == 2:
            return _keys_of_rows(x, True, 2, keys, top_row, stop_row, lo, magnitude, inf)
        if block_w == 4:
            return _keys_of_rows(x, True, 4, keys, top_row, stop_row, lo, magnitude, inf)
        return _keys_of_rows(x, True, block_w, keys, top_row, stop_row, lo, magnitude, inf)
    if block_w == 2:
        return _keys_of_rows(x, False, 2, keys, top_row, stop_row, lo, magnitude, inf)
    if block_w == 4:
        return _keys_of_rows(x, False, 4, keys, top_row, stop_row, lo, magnitude, inf)
    return _keys_of_rows(x, False, block_w, keys, top_row, stop_row, lo, magnitude, inf)


@_inline
def _gather(key_row, lo, hi, start, cand_keys, cand_index, found):
    """Append the keys of one row (``start`` = its first flat index) that are in ``lo .. hi``,
    in index order: each 64 comparisons become one word (a vectorised loop) whose set bits are
    visited lowest first, so the only branch that depends on the data is a loop's end (1-4% of
    the keys are in, scattered: a branch per key mispredicts most of the time). Comparing here
    rather than storing flags in the keys loop saves that loop's stores and this one's loads of
    bytes as words, which stall."""
    cols = key_row.shape[0]
    for group in range(cols // 64):
        flags = np.uint64(0)
        for bit in range(64):
            key = key_row[group * 64 + bit]
            flags |= np.uint64((key >= lo) & (key <= hi)) << np.uint64(bit)
        while flags:
            c = group * 64 + trailing_zeros(flags)
            cand_keys[found] = key_row[c]
            cand_index[found] = start + c
            found += 1
            flags &= flags - np.uint64(1)
    for c in range(cols // 64 * 64, cols):  # the last few: written always, kept when in
        key = key_row[c]
        cand_keys[found] = key
        cand_index[found] = start + c
        found += (key >= lo) & (key <= hi)
    return found


@_inline
def _key_rows(x, l2, block_h, block_w, buffers, top_row, stop_row, sums, found):
    """Sort keys of the block means of block rows ``top_row:stop_row`` of one (H, W) matrix:
    the one pass over their data. Returns (keys below the bracket, keys gathered so far): those
    in it are appended in index order to ``buffers.cand_keys``/``cand_index`` from ``found``."""
    keys, magnitude, inf = buffers.keys, buffers.magnitude, buffers.inf
    lo, hi = buffers.bracket[0], buffers.bracket[1]
    height, width = x.shape
    cols = keys.shape[1]
    full = width // block_w
    if block_h == 1:
        below = _keys_of_rows_any(x, l2, block_w, keys, top_row, stop_row, lo, magnitude, inf)
    else:
        below = 0
        for r in range(top_row, stop_row):
            top = r * block_h
            bottom = min(top + block_h, height)
            sums[:] = 0
            for i in range(top, bottom):  # row by row, as avg_pool2d adds up a window
                _add_row_any(x[i], sums, block_w, l2)
                if full < cols:
                    _add_edge(x[i], sums, full * block_w, l2)
            count = (bottom - top) * block_w
            below += _keys_of_sums(sums, keys[r], 0, full, count, lo, magnitude, inf)
            count = (bottom - top) * (width - full * block_w)  # the partial block at the edge
            below += _keys_of_sums(sums, keys[r], full, cols, count, lo, magnitude, inf)
    for r in range(top_row, stop_row):  # the group's keys are still in this core's cache
        found = _gather(keys[r], lo, hi, r * cols, buffers.cand_keys, buffers.cand_index, found)
    return below, found


@_jit
def _keys_band(x, l2, block_h, block_w, buffers, top_row, stop_row, sums):
    """The keys of block rows ``top_row:stop_row`` of one (H, W) matrix, ``buffers.group_rows``
    at a time, gathering into the band's own part of ``buffers.cand_keys``/``cand_index``
    (from the flat index of its first key): (keys below the bracket, keys gathered)."""
    start = top_row * buffers.keys.shape[1]
    below = 0
    found = start
    for top in range(top_row, stop_row, buffers.group_rows):
        stop = min(top + buffers.group_rows, stop_row)
        more, found = _key_rows(x, l2, block_h, block_w, buffers, top, stop, sums, found)
        below += more
    return below, found - start


@_inline
def _collect(buffers, band_rows, below_of, found_of):
    """Move each band's gathered keys to just after the previous band's (index order stays):
    (keys below the bracket, keys gathered) of the whole matrix."""
    cand_keys, cand_index = buffers.cand_keys, buffers.cand_index
    band_keys = band_rows * buffers.keys.shape[1]
    below, found = below_of[0], found_of[0]
    for band in range(1, below_of.shape[0]):
        start = band * band_keys
        for i in range(found_of[band]):
            cand_keys[found + i] = cand_keys[start + i]
            cand_index[found + i] = cand_index[start + i]
        below += below_of[band]
        found += found_of[band]
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
def _kth_smallest(values, count, kth):
    """The ``kth`` (from 0) smallest of the distinct ``values[:count]``, selected in place: no
    allocation, unlike ``np.partition``. Quickselect with median-of-three pivots, each round
    partitioned without a branch on the values (they come in no order: a branch per value
    would mispredict about half the time)."""
    lo, hi = 0, count - 1
    while lo < hi:
        mid = (lo + hi) >> 1
        a, b, c = values[lo], values[mid], values[hi]
        pick = mid if (a < b) == (b < c) else (lo if (b < a) == (a < c) else hi)
        pivot = values[pick]
        values[pick] = values[hi]
        values[hi] = pivot
        store = lo
        for i in range(lo, hi):  # values < pivot to the front: swap, advance when smaller
            value = values[i]
            values[i] = values[store]
            values[store] = value
            store += value < pivot
        values[hi] = values[store]
        values[store] = pivot
        if kth == store:
            return pivot
        if kth < store:
            hi = store - 1
        else:
            lo = store + 1
    return values[kth]


@_jit
def _refine(cand_keys, cand_index, found, need, counts, packed, key_bits, shift, digit_bits):
    """(key, index) of the ``need``-th smallest of the first ``found`` candidates (in index
    order, keys of ``key_bits`` bits that differ below bit ``shift`` only), ties to the lower
    index: radix digits from bit ``shift`` down, or, when there are few (a digit's counts would
    outnumber them), a selection among (key, index) pairs packed into ``packed`` (a stable sort
    for 63-bit keys)."""
    if found <= _SORTED_MAX:
        if key_bits <= 31:  # key and index fit one int64 that orders by key, then by index
            for i in range(found):
                packed[i] = (np.int64(cand_keys[i]) << 32) | cand_index[i]
            pick = _kth_smallest(packed, found, need - 1)
            return cand_keys.dtype.type(pick >> 32), cand_index.dtype.type(pick & 0xFFFFFFFF)
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
def _bit_length(value):
    """Bits needed for a non-negative integer (0 for 0)."""
    bits = 0
    while value:
        value >>= 1
        bits += 1
    return bits


@_jit
def _threshold(buffers, k, below, found):
    """(threshold key, last dropped flat index among the keys equal to it) for dropping the
    ``k`` smallest ``buffers.keys`` (k >= 1), from what the keys pass counted below the bracket
    and gathered in it. Then moves ``buffers.bracket`` (lo, hi, width, in the keys' dtype;
    empty before the first threshold) onto the threshold for the next matrix: narrower while it
    holds over ``_BRACKET_MAX_SHARE`` of the keys, 4x wider after a miss."""
    cand_keys, cand_index, counts = buffers.cand_keys, buffers.cand_index, buffers.counts
    bracket, key_bits, digit_bits = buffers.bracket, buffers.key_bits, buffers.digit_bits
    flat = buffers.keys.ravel()
    width = bracket[2]
    differ = key_bits  # the candidates' keys may differ below this bit only
    if flat.shape[0] <= _SORTED_MAX:  # a small matrix: all its keys are the candidates
        below = 0
        found = flat.shape[0]
        for i in range(found):
            cand_keys[i] = flat[i]
            cand_index[i] = i
    elif below < k <= below + found:
        if found > _BRACKET_MAX_SHARE * flat.shape[0] and width > 2:
            width //= 2
        differ = _bit_length(bracket[0] ^ bracket[1])  # keys in lo..hi share the bits above
    else:  # missed: gather the keys of the top digit holding the k-th instead
        width = min(width, 1 << (key_bits - 3)) * 4  # at most 2 ** (key_bits - 1): no overflow
        shift = key_bits - digit_bits
        differ = shift
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
        cand_keys,
        cand_index,
        found,
        k - below,
        counts,
        buffers.packed,
        key_bits,
        differ,
        digit_bits,
    )
    largest = ((1 << (key_bits - 1)) - 1) * 2 + 1  # 2 ** key_bits - 1 without overflowing
    bracket[0] = max(threshold - width // 2, 0)
    bracket[1] = threshold + min(width // 2, largest - threshold)
    bracket[2] = width
    return threshold, last_tied


@_inline  # called as a numba function, it made the write loops about 10% slower
def _kept(key, index, threshold, last_tied):
    """Whether the block with this key at this flat index stays: above the threshold, or at it
    after the last tied block dropped (ties go to the lower index). No branch: a comparison."""
    return (key > threshold) | ((key == threshold) & (index > last_tied))


@_inline
def _write_rows(keys, top_row, stop_row, threshold, last_tied, mask, block_h, block_w, x, out):
    """The mask of block rows ``top_row:stop_row``: each block's entries 0 (dropped) or 1,
    stored from a comparison (no branch); with ``out`` (not None) also ``x * mask`` there, in
    the data's dtype (``out`` may be ``x``: each entry is read before it is written). Whole
    blocks here, the partial one at the right edge in :func:`_write_edge` (in this loop's
    function it slows the loop down)."""
    height, width = mask.shape
    cols = keys.shape[1]
    full = width // block_w
    for r in range(top_row, stop_row):
        key_row = keys[r]
        first = r * cols
        for i in range(r * block_h, min(r * block_h + block_h, height)):
            mask_row = mask[i]
            if out is None:
                for c in range(full):
                    kept = _kept(key_row[c], first + c, threshold, last_tied)
                    base = c * block_w
                    for j in range(block_w):
                        mask_row[base + j] = kept
            else:
                x_row, out_row = x[i], out[i]
                for c in range(full):
                    kept = _kept(key_row[c], first + c, threshold, last_tied)
                    factor = x.dtype.type(kept)  # x * 0.0 as torch multiplies: -0.0, NaN stay
                    base = c * block_w
                    for j in range(block_w):
                        mask_row[base + j] = kept
                        out_row[base + j] = x_row[base + j] * factor
            if full < cols:
                kept = _write_edge(key_row, first, threshold, last_tied, mask_row, full * block_w)
                if out is not None:
                    factor = x.dtype.type(kept)
                    for j in range(full * block_w, width):
                        out[i, j] = x[i, j] * factor


@_jit
def _write_edge(key_row, first, threshold, last_tied, mask_row, left):
    """:func:`_write_rows` for the partial block from ``left`` to the end of the row; whether
    it is kept."""
    c = key_row.shape[0] - 1
    kept = _kept(key_row[c], first + c, threshold, last_tied)
    for j in range(left, mask_row.shape[0]):
        mask_row[j] = kept
    return kept


@_inline
def _write_rows_any(keys, top_row, stop_row, threshold, last_tied, mask, block_h, block_w, x, out):
    """:func:`_write_rows` with the width a compile-time constant for 1x2 and 1x4 blocks,
    chosen once per matrix (chosen per row, the choice costs a quarter of the pass)."""
    if block_w == 2:
        _write_rows(keys, top_row, stop_row, threshold, last_tied, mask, block_h, 2, x, out)
    elif block_w == 4:
        _write_rows(keys, top_row, stop_row, threshold, last_tied, mask, block_h, 4, x, out)
    else:
        _write_rows(keys, top_row, stop_row, threshold, last_tied, mask, block_h, block_w, x, out)


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
            if _kept(keys[r, c], r * cols + c, threshold, last_tied):
                continue
            left = c * block_w
            for i in range(top, min(top + block_h, height)):
                for j in range(left, min(left + block_w, width)):
                    if _rank_in_block(x, l2, i, j, top, left, block_h, block_w) >= zeros:
                        mask[i, j] = 1


@_jit
def _write_band(
    block_h, block_w, keys, top_row, stop_row, threshold, last_tied, mask, x, out, in_place
):
    """The mask of block rows ``top_row:stop_row`` of one matrix (and ``x * mask`` into ``out``
    unless it is None; into ``x`` itself when ``in_place``): a block is dropped when its key is
    below ``threshold``, or equal to it at a flat index up to ``last_tied``."""
    if out is None:
        _write_rows_any(
            keys, top_row, stop_row, threshold, last_tied, mask, block_h, block_w, x, None
        )
    elif in_place:  # x twice: the compiler sees one array (as two, it assumes they may
        _write_rows_any(  # overlap in part, and the loop loses its vector code)
            keys, top_row, stop_row, threshold, last_tied, mask, block_h, block_w, x, x
        )
    else:
        _write_rows_any(
            keys, top_row, stop_row, threshold, last_tied, mask, block_h, block_w, x, out
        )


@_inline
def _masks_of(x, l2, block_h, block_w, k, zeros, mask, buffers, out, in_place, bands):
    """The mask of every matrix of a (B, H, W) batch, in turn, with a thread's
    :class:`_Buffers` for the matrix shape, and ``x * mask`` in ``out`` unless it is None (only
    with whole blocks dropped: the entries kept in a dropped block are chosen from ``x`` after
    the write; ``in_place``: ``out`` is ``x``). Both passes over a matrix run in ``bands``
    bands of block rows: at once on numba's threads where this is compiled parallel
    (:func:`_masks_in_bands`), one after the other where it is not (:func:`_masks`)."""
    keys = buffers.keys
    rows, cols = keys.shape
    band_rows = -(-rows // bands)
    sums = np.empty((bands, cols), x.dtype)
    below_of = np.empty(bands, np.int64)
    found_of = np.empty(bands, np.int64)
    for b in range(x.shape[0]):
        matrix = x[b]
        for band in numba.prange(bands):
            top = min(band * band_rows, rows)
            stop = min(top + band_rows, rows)
            below_of[band], found_of[band] = _keys_band(
                matrix, l2, block_h, block_w, buffers, top, stop, sums[band]
            )
        below, found = _collect(buffers, band_rows, below_of, found_of)
        threshold, last_tied = _threshold(buffers, k, below, found)
        kept, product = mask[b], _matrix_of(out, b)
        for band in numba.prange(bands):
            top = min(band * band_rows, rows)
            stop = min(top + band_rows, rows)
            _write_band(
                block_h, block_w, keys, top, stop, threshold, last_tied, kept, matrix, product,
                in_place,
            )  # fmt: skip
        if zeros < block_h * block_w:
            _keep_in_dropped(matrix, l2, block_h, block_w, keys, threshold, last_tied, zeros, kept)


@_jit
def _matrix_of(batch, b):
    """``batch[b]``, or None for None (a function of its own: a conditional expression in the
    parallel function gives numba's array analysis two types to join, which it cannot)."""
    if batch is None:
        return None
    return batch[b]


@_jit
def _masks(x, l2, block_h, block_w, k, zeros, mask, buffers, out, in_place):
    """:func:`_masks_of` in the calling thread alone."""
    _masks_of(x, l2, block_h, block_w, k, zeros, mask, buffers, out, in_place, 1)


@_parallel
def _masks_in_bands(x, l2, block_h, block_w, k, zeros, mask, buffers, out, in_place, bands):
    """:func:`_masks_of` with each pass's bands on numba's threads (the caller takes one)."""
    _masks_of(x, l2, block_h, block_w, k, zeros, mask, buffers, out, in_place, bands)


@_parallel
def _masks_in_parts(x, l2, block_h, block_w, k, zeros, mask, runs, out, in_place):
    """:func:`_masks` for a batch of small matrices cut into runs of whole matrices, one per
    numba thread, each with its own buffers: ``runs`` is a :class:`_Buffers` whose arrays
    have a leading dim, one entry per run."""
    count, parts = x.shape[0], runs.bracket.shape[0]
    per_part = -(-count // parts)
    for part in numba.prange(parts):
        first = min(part * per_part, count)
        stop = min(first + per_part, count)
        _masks(
            x[first:stop], l2, block_h, block_w, k, zeros, mask[first:stop],
            _run_buffers(runs, part), _matrices_of(out, first, stop), in_place,
        )  # fmt: skip


@_jit
def _run_buffers(runs, part):
    """The :class:`_Buffers` of one run of :func:`_masks_in_parts`."""
    return _Buffers(
        runs.keys[part], runs.cand_keys[part], runs.cand_index[part], runs.counts[part],
        runs.packed[part], runs.bracket[part], runs.magnitude, runs.inf, runs.key_bits,
        runs.digit_bits, runs.group_rows,
    )  # fmt: skip


@_jit
def _matrices_of(batch, first, stop):
    """``batch[first:stop]``, or None for None (see :func:`_matrix_of`)."""
    if batch is None:
        return None
    return batch[first:stop]


@_parallel
def _start_threads(count):
    """Starts numba's threading layer (a parallel loop that does nothing to speak of)."""
    total = 0
    for i in numba.prange(count):
        total += i
    return total


def ranked_dtype(dtype: torch.dtype) -> torch.dtype:
    """The float dtype data of ``dtype`` is ranked in: its own for float32/float64, float64 for
    wide integers (in float32, 2**24 + 1 would rank as 2**24), float32 for the rest, which it
    holds exactly (float16, bfloat16, narrower integers; pooling in half precision would lose
    the order of close norms)."""
    if dtype in _KEY_TYPES:
        return dtype
    return torch.float64 if dtype in _WIDE_INTS else torch.float32


def supports(data: torch.Tensor, mask: torch.Tensor, block: tuple[int, int], zeros: int) -> bool:
    """Whether :func:`write_mask` handles this data and mask (else the tensor-op path runs)."""
    return (
        data.is_cpu
        and mask.is_cpu
        and mask.is_contiguous()
        and mask.shape == data.shape
        and data.numel() < 2**31  # block indices and counts are int32
        and (zeros >= block[0] * block[1] or block[0] * block[1] <= _MAX_RANKED_BLOCK)
    )


class _Buffers(NamedTuple):
    """A thread's scratch arrays and constants for one matrix shape; the compiled functions
    take it whole (numba reads a named tuple's fields by name)."""

    keys: np.ndarray  # (rows, cols) sort keys
    cand_keys: np.ndarray  # the keys gathered from the bracket
    cand_index: np.ndarray  # and their flat indices
    counts: np.ndarray  # one digit's counts
    packed: np.ndarray  # (key, index) pairs in int64 for a selection among few
    bracket: np.ndarray  # (lo, hi, width); carries over from matrix to matrix
    magnitude: Any  # every bit of a key but the sign
    inf: Any  # +inf's key
    key_bits: int
    digit_bits: int
    group_rows: int  # block rows the keys pass keys, then gathers


def _buffers(
    height: int, width: int, dtype: torch.dtype, block: tuple[int, int], runs: int = 0
) -> _Buffers:
    """The kernel's scratch arrays and constants for one matrix shape, kept by this thread
    (building them costs more than a small matrix's mask), with the bracket that carries over
    from matrix to matrix. ``runs`` > 0: each array stacked that many times, for
    :func:`_masks_in_parts`."""
    cache = getattr(_CACHE, "buffers", None)
    if cache is None:
        cache = _CACHE.buffers = {}
    key = (height, width, dtype, block, runs)
    found = cache.get(key)
    if found is None:
        key_dtype, key_bits, mantissa_bits = _KEY_TYPES[dtype]
        rows, cols = -(-height // block[0]), -(-width // block[1])
        key_type = torch.empty(0, dtype=key_dtype).numpy().dtype
        value_type = torch.empty(0, dtype=dtype).numpy().dtype
        lead = (runs,) if runs else ()
        # about +-1% of the value around the first threshold; empty (lo > hi) before it
        bracket = [1, 0, 2 ** (mantissa_bits - _BRACKET_START_BITS + 1)]
        found = _Buffers(
            keys=np.empty((*lead, rows, cols), dtype=key_type),
            cand_keys=np.empty((*lead, rows * cols), dtype=key_type),
            cand_index=np.empty((*lead, rows * cols), dtype=np.int32),
            counts=np.empty((*lead, 1 << _DIGIT_BITS), dtype=np.int32),
            packed=np.empty((*lead, _SORTED_MAX), dtype=np.int64),
            bracket=np.array([bracket] * runs if runs else bracket, dtype=key_type),
            magnitude=key_type.type((1 << key_bits) - 1),
            inf=np.array(math.inf, dtype=value_type).view(key_type)[()],
            key_bits=key_bits,
            digit_bits=_DIGIT_BITS,
            group_rows=max(1, _GROUP_ENTRIES // (block[0] * width)),
        )
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        cache[key] = found
    return found


def _threads_usable() -> bool:
    """Whether the kernel may run on numba's threads: only on its OpenMP layer (started by
    this process, whose idle threads wait spinning for the next call: the workqueue layer
    takes about 50 us to start a loop, more than a band saves) and never in a child forked
    after it started (GNU OpenMP cannot run there: numba ends the process)."""
    usable = _THREADS.get("usable")
    if usable is None:
        _start_threads(2)
        usable = _THREADS["usable"] = numba.threading_layer() == "omp"
    return usable


def _forked() -> None:
    """In a forked child: numba's OpenMP threads, if the parent started them, are not usable."""
    if _THREADS:
        _THREADS["usable"] = False


os.register_at_fork(after_in_child=_forked)


def _threads(entries: int) -> int:
    """How many threads share this many entries: torch's intra-op threads (one in a
    DataLoader worker), at most numba's, each with at least ``_BAND_ENTRIES`` entries."""
    threads = min(torch.get_num_threads(), entries // _BAND_ENTRIES)
    if threads < 2 or not _threads_usable():
        return 1
    return min(threads, numba.get_num_threads())


def _bands(height: int, width: int) -> int:
    """How many threads share one matrix, a band of its block rows each."""
    return _threads(height * width)


def _parts(count: int, height: int, width: int) -> int:
    """How many threads share a batch of ``count`` matrices, a run of whole matrices each."""
    return min(count, _threads(count * height * width))


@functools.lru_cache(maxsize=64)
def _joined(height: int, width: int, block: tuple[int, int]) -> tuple[int, int]:
    """The (H, W) the kernel sees a matrix as: rows of whole 1xN blocks joined ``j`` at a time
    into rows up to ``_JOINED_ROW_ENTRIES`` long (H must divide by ``j``). Blocks keep their
    flat order, so the mask is the same; a short row costs each pass more in its loop's
    start than in its blocks (4096x16, 1x4 blocks: 245 us a mask in rows of 16)."""
    if block[0] != 1 or width == 0 or width % block[1]:
        return height, width
    join = max(
        (j for j in range(1, _JOINED_ROW_ENTRIES // width + 1) if height % j == 0), default=1
    )
    return height // join, width * join


def matrix_shape(shape: torch.Size) -> tuple[int, int]:
    """(H, W) of the matrices of data of this shape: its last two dims (1-D: one row, 0-D: one
    entry); leading dims are a batch of them."""
    return ((1, 1) + tuple(shape))[-2:]


def _array(tensor: torch.Tensor) -> np.ndarray:
    """``tensor``'s memory as a C-contiguous numpy array: a view unless it had to be copied.
    No tensor op where none is needed: each costs microseconds in a DataLoader worker."""
    if tensor.requires_grad:
        tensor = tensor.detach()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return tensor.numpy()


def write_mask(
    data: torch.Tensor,
    mask: torch.Tensor,
    k: int,
    block: tuple[int, int],
    zeros: int,
    norm: str,
    out: torch.Tensor | None = None,
) -> bool:
    """Write the mask of ``data`` into ``mask`` (same shape, contiguous; see :func:`supports`):
    the last two dims of ``data`` are a matrix (1-D: one row, 0-D: one entry), leading dims a
    batch of them; in each matrix the ``k`` (>= 1) blocks of lowest mean norm are dropped,
    ``zeros`` entries of each (all when ``zeros`` covers the block).

    With ``out`` (the shape of ``data``), ``data * mask`` is written there in the same pass as
    the mask, when it can be (True; False: nothing was written to ``out``): whole blocks
    dropped, float32 or float64 data, ``out`` contiguous in the data's dtype. ``out`` may be
    ``data`` itself (masked in place) or must not overlap it.

    Data of other dtypes is ranked in :func:`ranked_dtype`, as the tensor-op path ranks it.
    A mask of another dtype than the (ranked) data's, other than a one-byte one, is
    written through a byte buffer."""
    fused = (
        out is not None
        and zeros >= block[0] * block[1]
        and data.dtype in _KEY_TYPES
        and out.dtype == data.dtype
        and out.shape == data.shape
        and out.is_cpu
        and out.is_contiguous()
    )
    in_place = fused and out.data_ptr() == data.data_ptr()
    ranked = data if data.dtype in _KEY_TYPES else data.detach().to(ranked_dtype(data.dtype))
    height, width = _joined(*matrix_shape(data.shape), block)
    x = _array(ranked).reshape(-1, height, width)
    product = x if in_place else _array(out).reshape(x.shape) if fused else None
    if mask.dtype == ranked.dtype or mask.dtype in _BYTE_MASKS:
        target = mask if mask.dtype == ranked.dtype else mask.view(torch.uint8)
    else:
        target = scratch("kernel_mask", tuple(mask.shape), torch.uint8)
    target_array = _array(target).reshape(x.shape)
    l2 = norm == "L2"
    bands = _bands(height, width)
    parts = 1 if bands > 1 else _parts(x.shape[0], height, width)
    if parts > 1:
        runs = _buffers(height, width, ranked.dtype, block, parts)
        _masks_in_parts(x, l2, *block, k, zeros, target_array, runs, product, in_place)
    else:
        buffers = _buffers(height, width, ranked.dtype, block)
        args = (x, l2, *block, k, zeros, target_array, buffers, product, in_place)
        if bands > 1:
            _masks_in_bands(*args, bands)
        else:
            _masks(*args)
    if target is not mask and target.data_ptr() != mask.data_ptr():
        mask.copy_(target)
    return fused
