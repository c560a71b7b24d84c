"""The compiled CPU kernel (:mod:`pipesparse.sparsifiers._norm_kernel`) against the tensor-op
path (:func:`norm_keep_mask`) and torch.ao's reference: the masks must agree bit for bit.

The kernel keeps per-thread state (buffers per matrix shape and a bracket around the previous
threshold) that may only change its speed: streams whose values shift, interleaved shapes and
concurrent threads must all give the same masks as the stateless oracle."""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import threading
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from pipesparse.sparsifiers import _norm_kernel, norm
from pipesparse.sparsifiers.norm import DataNormSparsifier, norm_keep_mask

# --------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def kernel_calls():
    """Spy on the kernel entry point the sparsifier calls; yields the list of calls' shapes."""
    calls: list[tuple[int, ...]] = []
    real = _norm_kernel.write_mask

    def spy(data, mask, *args, **kwargs):
        calls.append(tuple(data.shape))
        return real(data, mask, *args, **kwargs)

    with mock.patch.object(norm._norm_kernel, "write_mask", spy):
        yield calls


def kernel_expected(x, level, block, zeros) -> bool:
    """Whether the sparsifier should take the kernel for this (CPU, contiguous-mask) input."""
    k, zeros = norm._blocks_to_drop(x, level, block, zeros)
    return k > 0 and (zeros >= block[0] * block[1] or block[0] * block[1] <= 16)


def step_mask(x, level, block, zeros, rule) -> torch.Tensor:
    """The mask one step of a fresh sparsifier writes for ``x``."""
    sparsifier = DataNormSparsifier(
        sparsity_level=level, sparse_block_shape=block, zeros_per_block=zeros, norm=rule
    )
    sparsifier.add_data("x", x)
    sparsifier.step()
    return sparsifier.get_mask("x")


def masked_step(x, level, block, zeros, rule, in_place):
    """One step of a fresh sparsifier that also writes the masked data (over a copy of ``x``
    when ``in_place``): (mask, masked data)."""
    data = x.clone()
    sparsifier = DataNormSparsifier(
        sparsity_level=level, sparse_block_shape=block, zeros_per_block=zeros, norm=rule
    )
    sparsifier.add_data("x", data)
    out = data if in_place else torch.empty_like(x)
    sparsifier.step(masked_out={"x": out})
    return sparsifier.get_mask("x"), out


@contextlib.contextmanager
def torch_threads(count):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def assert_exact_01(mask: torch.Tensor) -> None:
    """Only 0 and 1, and for float masks the exact bit patterns of +0.0 and 1.0 (no -0.0)."""
    keep = mask.bool()
    assert torch.equal(mask, keep.to(mask.dtype))
    if mask.is_floating_point():
        assert not torch.signbit(mask).any(), "mask holds -0.0"


def bracket(height, width, dtype, block) -> tuple[int, int, int]:
    """(lo, hi, width) of this thread's bracket for a matrix shape (kernel internals)."""
    lo, hi, size = _norm_kernel._buffers(
        *_norm_kernel._joined(height, width, block), dtype, block
    ).bracket
    return int(lo), int(hi), int(size)


# ----------------------------------------------------------- 1. hypothesis differential test

_LEVELS = [0.0, 1e-9, 0.01, 0.25, 0.5, 0.7, 0.999, 1.0, 1.5, -0.5, math.inf]
_SPECIALS = [math.nan, -math.nan, math.inf, -math.inf, -0.0, 0.0, 1e-45, -3e-42, 1e-320]
_MAX_SIDE = {0: 1, 1: 40, 2: 13, 3: 7, 4: 5}


@st.composite
def cases(draw):
    ndim = draw(st.integers(0, 4))
    shape = [draw(st.integers(1, _MAX_SIDE[ndim])) for _ in range(ndim)]
    if ndim and draw(st.integers(0, 19)) == 0:
        shape[draw(st.integers(0, ndim - 1))] = 0
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    kind = draw(st.sampled_from(["ties", "normal", "wide"]))
    scales = [1.0, 1e-40, 1e30] + ([1e-310] if dtype == torch.float64 else [])
    scale = draw(st.sampled_from(scales))
    specials = draw(st.lists(st.sampled_from(_SPECIALS), max_size=6))
    seed = draw(st.integers(0, 2**32 - 1))
    block = (draw(st.integers(1, 4)), draw(st.integers(1, 5)))
    zeros = draw(st.one_of(st.none(), st.integers(0, block[0] * block[1])))
    level = draw(st.one_of(st.sampled_from(_LEVELS), st.floats(0, 1)))
    rule = draw(st.sampled_from(["L1", "L2"]))

    generator = torch.Generator().manual_seed(seed)
    if kind == "ties":  # rounded ints: many equal block norms
        x = torch.randint(-3, 4, shape, generator=generator).to(dtype)
    elif kind == "normal":
        x = torch.randn(shape, generator=generator, dtype=dtype)
    else:  # values spread over many decades
        x = torch.randn(shape, generator=generator, dtype=dtype)
        x *= 10.0 ** torch.randint(-6, 7, shape, generator=generator).to(dtype)
    x *= scale
    flat = x.view(-1)
    if flat.numel():
        where = torch.randint(flat.numel(), (len(specials),), generator=generator)
        for i, value in zip(where.tolist(), specials, strict=True):
            flat[i] = value
    return x, level, block, zeros, rule


@settings(max_examples=250)
@given(cases())
def test_kernel_masks_equal_the_tensor_op_path(case):
    x, level, block, zeros, rule = case
    note(f"shape={tuple(x.shape)} dtype={x.dtype} level={level} block={block} zeros={zeros}")
    with kernel_calls() as calls:
        mask = step_mask(x, level, block, zeros, rule)
    assert len(calls) == kernel_expected(x, level, block, zeros)
    assert mask.dtype == x.dtype and mask.shape == x.shape
    assert_exact_01(mask)
    assert torch.equal(mask.bool(), norm_keep_mask(x, level, block, zeros, rule))


@settings(max_examples=150)
@given(cases(), st.booleans())
def test_masked_data_written_with_the_mask_is_data_times_mask_bit_for_bit(
    same_bits, case, in_place
):  # hypothesis fills the rightmost arguments, pytest the fixture
    mask, out = masked_step(*case, in_place)
    assert same_bits(out, case[0] * mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_kernel_writes_the_product_itself_for_whole_blocks_of_float_data(dtype, threads):
    x = torch.randn(256, 1024, dtype=dtype)
    mask, out = torch.empty_like(x), torch.empty_like(x)
    with torch_threads(threads):
        assert _norm_kernel.write_mask(x[None], mask, 32768, (1, 4), 4, "L1", out[None])
        assert torch.equal(out, x * mask)
        assert _norm_kernel.write_mask(x[None], mask, 32768, (1, 4), 4, "L1", x[None])
        assert torch.equal(x, out)
        assert not _norm_kernel.write_mask(x[None], mask, 32768, (1, 4), 2, "L1", out[None])
        assert not _norm_kernel.write_mask(x[None], mask, 32768, (1, 4), 4, "L1", out[None].half())


# ------------------------------------------------------ 2. large matrices against torch.ao


@pytest.mark.parametrize("shape", [(256, 512), (64, 1000)])
@pytest.mark.parametrize("block,zeros", [((1, 4), None), ((2, 2), None), ((1, 3), None),
                                         ((2, 2), 2), ((1, 3), 1)])  # fmt: skip
@pytest.mark.parametrize("rule", ["L1", "L2"])
def test_kernel_masks_equal_torch_ao_on_large_matrices(shape, block, zeros, rule, torch_ao_mask):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(shape[1] + block[1]))
    values = x.abs() if rule == "L1" else x * x
    means = F.avg_pool2d(values[None, None], block, block, ceil_mode=True).flatten()
    means = means.sort().values
    per_block = block[0] * block[1]
    for level in (0.03, 0.5, 0.97):
        k = round(level * means.numel())
        # torch.ao's sort is not stable: only compare where no tie straddles the threshold
        assert means[k - 1] < means[k], "tie at the threshold: pick another seed"
        with kernel_calls() as calls:
            got = step_mask(x, level, block, zeros, rule)
        assert len(calls) == 1
        ref_zeros = per_block if zeros is None else zeros
        assert torch.equal(
            got.bool(),
            torch_ao_mask(
                x, rule, sparsity_level=level, sparse_block_shape=block, zeros_per_block=ref_zeros
            ).bool(),
        )


# ------------------------------------------------------------- 3. a stream that shifts scale


def _stream(shape, dtype, generator):
    """Batches of one shape whose values jump between scales, constants and NaN; each change
    of scale is followed by a shuffle of the same values (the same threshold,
    so the bracket must hit) before the next jump."""
    base = torch.randn(shape, generator=generator, dtype=dtype)

    def shuffled(x):
        return x.view(-1)[torch.randperm(x.numel(), generator=generator)].view(shape)

    batches = []
    for factor in (1.0, 1000.0, 1e-3, 1.0, 1e6, 1e-40, 1.0):
        x = base * factor
        batches += [x, shuffled(x), shuffled(x) * (1 + 1e-6)]
    ints = torch.randint(-2, 3, shape, generator=generator).to(dtype)
    # tiny values with whole blocks of exact zeros (e.g. ReLU outputs): the bracket around a
    # tiny threshold starts at key 0, so the zero blocks sit on its lower edge
    tiny_sparse = base * 1e-40
    tiny_sparse[: shape[0] // 3] = 0
    with_nan = base.clone()
    with_nan.view(-1)[::7] = math.nan
    batches += [
        base * 1e-40,
        tiny_sparse,
        shuffled(tiny_sparse),
        torch.full(shape, 3.5, dtype=dtype),  # all equal: every block ties
        torch.zeros(shape, dtype=dtype),
        -torch.zeros(shape, dtype=dtype),
        torch.full(shape, math.nan, dtype=dtype),
        torch.full(shape, math.inf, dtype=dtype),
        base,
        ints,
        shuffled(ints),
        with_nan,
        shuffled(with_nan),
        base * 1e3,
    ]
    return batches


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape,block,level,rule",
    [
        ((96, 160), (1, 4), 0.5, "L1"),
        ((64, 148), (1, 4), 0.3, "L1"),  # 37 blocks a row: the bracket flags end in a part word
        ((50, 77), (2, 3), 0.1, "L2"),
        ((33, 40), (1, 1), 0.9, "L1"),
    ],
)
@pytest.mark.parametrize("masked", [False, True], ids=["mask", "masked-batch"])
def test_a_stream_whose_values_shift_stays_exact(
    dtype, shape, block, level, rule, masked, same_bits
):
    # the masked batch too, after hits and misses alike
    batches = _stream(shape, dtype, torch.Generator().manual_seed(shape[1]))
    assert len(batches) >= 30
    sparsifier = DataNormSparsifier(sparsity_level=level, sparse_block_shape=block, norm=rule)
    grew = kept = 0
    with kernel_calls() as calls:
        for i, x in enumerate(batches):
            before = bracket(*shape, dtype, block)[2]
            sparsifier.add_data("x", x)
            out = torch.empty_like(x)
            sparsifier.step(masked_out={"x": out} if masked else None)
            after = bracket(*shape, dtype, block)[2]
            grew += after > before  # a miss widens the bracket, a hit never does
            kept += after <= before
            expected = norm_keep_mask(x, level, block, None, rule)
            assert torch.equal(sparsifier.get_mask("x").bool(), expected), f"batch {i}"
            if masked:
                assert same_bits(out, x * expected.to(dtype)), f"batch {i}"
    assert len(calls) == len(batches)
    assert grew >= 3 and kept >= 3, (grew, kept)  # both the miss and the hit paths ran


# --------------------------------------------- 4. batches of matrices and interleaved shapes


@pytest.mark.parametrize("zeros", [None, 3])
def test_each_matrix_of_a_batch_is_masked_on_its_own(zeros):
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, 20, 30, generator=generator)
    # every matrix its own scale: the bracket carried from matrix to matrix misses and recovers
    x *= 10.0 ** torch.randint(-4, 5, (3, 4, 1, 1), generator=generator)
    x[1, 2] = 1.0  # one matrix of ties
    x[2, 0, :3] = math.nan
    with kernel_calls() as calls:
        mask = step_mask(x, 0.4, (2, 4), zeros, "L2")
    assert calls == [(3, 4, 20, 30)]  # one call for the whole batch
    expected = norm_keep_mask(x, 0.4, (2, 4), zeros, "L2")
    assert torch.equal(mask.bool(), expected)
    for i in range(3):  # and the batch is just its matrices, one by one
        for j in range(4):
            alone = norm_keep_mask(x[i, j], 0.4, (2, 4), zeros, "L2")
            assert torch.equal(mask[i, j].bool(), alone)


def test_interleaved_shapes_in_one_sparsifier_stay_exact():
    # more shapes than the kernel keeps buffers for (16 per thread), some sharing a matrix shape
    # with another name's batch or dtype, all stepped together for several batches
    generator = torch.Generator().manual_seed(5)
    shapes = {
        "batch": ((4, 24, 36), torch.float32),
        "same_matrix": ((24, 36), torch.float32),
        "same_matrix_f64": ((24, 36), torch.float64),
        "row": ((101,), torch.float32),
        "scalar": ((), torch.float64),
        **{f"w{w}": ((9, w), torch.float32) for w in range(5, 23)},
    }
    sparsifier = DataNormSparsifier(sparsity_level=0.3, sparse_block_shape=(2, 3), norm="L1")
    with kernel_calls() as calls:
        for step in range(4):
            data = {}
            for name, (shape, dtype) in shapes.items():
                x = torch.randn(shape, generator=generator, dtype=dtype) * 10.0 ** (3 * step - 4)
                data[name] = x
                sparsifier.add_data(name, x)
            sparsifier.step()
            for name, x in data.items():
                expected = norm_keep_mask(x, 0.3, (2, 3), None, "L1")
                assert torch.equal(sparsifier.get_mask(name).bool(), expected), (step, name)
    expected_calls = sum(kernel_expected(x, 0.3, (2, 3), None) for x in data.values())
    assert expected_calls == len(shapes) - 1  # all but the scalar (round(0.3 * 1) = 0 blocks)
    assert len(calls) == 4 * expected_calls


# ------------------------------------------------------------- 5. data and mask dtypes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int8, torch.int64])
@pytest.mark.parametrize("zeros", [None, 1])
def test_low_precision_and_integer_data(dtype, zeros):
    generator = torch.Generator().manual_seed(6)
    if dtype.is_floating_point:
        x = (torch.randn(5, 30, 41, generator=generator) * 4).to(dtype)
        x[0, 0, :7] = math.nan
        x[1, 3, :5] = math.inf
    else:
        info = torch.iinfo(dtype)
        low, high = (info.min, info.max) if dtype == torch.int8 else (-(10**6), 10**6)
        x = torch.randint(low, high, (5, 30, 41), generator=generator, dtype=dtype)
        x[2] = torch.randint(-2, 3, (30, 41), generator=generator, dtype=dtype)  # ties
    for level in (0.2, 0.5, 0.9):
        for rule in ("L1", "L2"):
            with kernel_calls() as calls:
                mask = step_mask(x, level, (2, 2), zeros, rule)
            assert len(calls) == 1
            assert mask.dtype == dtype
            assert_exact_01(mask)
            assert torch.equal(mask.bool(), norm_keep_mask(x, level, (2, 2), zeros, rule))


# numba compiles the kernel once per (data, mask) dtype pair (~15 s each when not cached on
# disk): bool and float64 masks here, float16/bfloat16 masks go through a bool buffer
@pytest.mark.parametrize(
    "mask_dtype", [torch.bool, torch.float64, torch.float16, torch.bfloat16], ids=str
)
@pytest.mark.parametrize("data_dtype", [torch.float32, torch.float16], ids=str)
def test_write_mask_into_a_bool_or_float64_mask(mask_dtype, data_dtype):
    x = torch.randn(2, 17, 26, generator=torch.Generator().manual_seed(7)).to(data_dtype)
    x[1, 4, 5:9] = math.nan
    for level, block, zeros in [(0.5, (1, 4), 4), (0.3, (3, 2), 6), (0.7, (2, 3), 2)]:
        for rule in ("L1", "L2"):
            k, zeros = norm._blocks_to_drop(x, level, block, zeros)
            mask = torch.full(x.shape, 7, dtype=mask_dtype)  # stale values: all overwritten
            _norm_kernel.write_mask(norm._as_matrices(x), mask, k, block, zeros, rule)
            assert mask.dtype == mask_dtype
            assert_exact_01(mask)
            assert torch.equal(mask.bool(), norm_keep_mask(x, level, block, zeros, rule))


# ---------------------------------------------------- 6. storage and exact 0/1 mask values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_mask_keeps_its_storage_and_holds_exact_zeros_and_ones(dtype):
    generator = torch.Generator().manual_seed(8)
    sparsifier = DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4))
    sparsifier.add_data("x", torch.randn(3, 16, 20, generator=generator).to(dtype))
    mask = sparsifier.get_mask("x")
    pointer = mask.data_ptr()
    for step in range(5):
        # negative data: a mask computed as e.g. sign or product could produce -0.0
        x = -torch.randn(3, 16, 20, generator=generator).abs().to(dtype) * 10.0**step
        sparsifier.add_data("x", x)
        sparsifier.step()
        assert sparsifier.get_mask("x") is mask
        assert mask.data_ptr() == pointer
        assert_exact_01(mask)
        assert torch.equal(mask.bool(), norm_keep_mask(x, 0.5, (1, 4), None, "L1"))


# ------------------------------------------------ 7. autograd and non-contiguous data


def test_data_that_requires_grad():
    x = torch.nn.Parameter(torch.randn(12, 30, generator=torch.Generator().manual_seed(9)))
    with kernel_calls() as calls:
        mask = step_mask(x, 0.5, (2, 3), 2, "L2")
    assert len(calls) == 1
    assert not mask.requires_grad
    assert torch.equal(mask.bool(), norm_keep_mask(x.detach(), 0.5, (2, 3), 2, "L2"))
    assert x.grad is None


@pytest.mark.parametrize(
    "view",
    [
        lambda b: b.t(),
        lambda b: b[:, ::3],
        lambda b: b.view(4, 10, 90).permute(2, 0, 1),
        lambda b: b[:1].expand(5, 90),
        lambda b: b[3:, 2:-1],
    ],
    ids=["transposed", "strided", "permuted_3d", "expanded", "sliced"],
)
def test_non_contiguous_data(view):
    base = torch.randn(40, 90, generator=torch.Generator().manual_seed(10))
    base[5, ::4] = math.nan
    x = view(base)
    assert not x.is_contiguous()
    for block, zeros in [((1, 4), None), ((3, 2), 4), ((2, 5), None)]:
        with kernel_calls() as calls:
            mask = step_mask(x, 0.6, block, zeros, "L1")
        assert len(calls) == 1
        assert mask.is_contiguous()
        assert torch.equal(mask.bool(), norm_keep_mask(x.contiguous(), 0.6, block, zeros, "L1"))
        assert torch.equal(mask.bool(), norm_keep_mask(x, 0.6, block, zeros, "L1"))


# ------------------------------------------------------------------------- 8. threads


@pytest.mark.parametrize("bands", [1, 2])
def test_threads_each_stepping_their_own_sparsifier(bands):
    # with bands: each thread's matrices also split on numba's threads, all at once
    shape, block, steps, workers = (48, 64), (1, 4), 20, 4
    levels = [0.2, 0.45, 0.7, 0.95]
    start = threading.Barrier(workers)

    def run(worker):
        generator = torch.Generator().manual_seed(100 + worker)
        sparsifier = DataNormSparsifier(
            sparsity_level=levels[worker], sparse_block_shape=block, norm="L2"
        )
        start.wait(timeout=60)
        results = []
        for step in range(steps):
            # one matrix shape for all threads (the same cache key), scales that jump per thread
            scale = 10.0 ** (((step + worker) % 5) * (worker - 1.5))
            x = torch.randn(shape, generator=generator) * scale
            sparsifier.add_data("x", x)
            sparsifier.step()
            results.append((x, sparsifier.get_mask("x").clone()))
        return results

    with (
        kernel_calls() as calls,
        mock.patch.object(_norm_kernel, "_bands", lambda height, width: bands),
        ThreadPoolExecutor(workers) as pool,
    ):
        outcomes = list(pool.map(run, range(workers)))
    assert len(calls) == workers * steps
    for worker, results in enumerate(outcomes):
        for step, (x, mask) in enumerate(results):
            expected = norm_keep_mask(x, levels[worker], block, None, "L2")
            assert torch.equal(mask.bool(), expected), (worker, step)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_bracket_widened_to_its_limit_stays_exact(dtype):
    # scales jumping across the whole exponent range keep missing: the bracket grows to its
    # cap (no integer overflow in its bounds) and every mask stays exact
    generator = torch.Generator().manual_seed(0)
    span = 60 if dtype == torch.float32 else 300
    sparsifier = DataNormSparsifier(sparsity_level=0.3)
    for i in range(40):
        scale = 10.0 ** ((i * 37) % span - span // 2)
        x = torch.randn(64, 64, generator=generator, dtype=dtype) * scale
        sparsifier.add_data("x", x)
        sparsifier.step()
        expected = norm_keep_mask(x, 0.3, (1, 4), None, "L1")
        assert torch.equal(sparsifier.get_mask("x").bool(), expected), i
    lo, hi, width = bracket(64, 64, dtype, (1, 4))
    assert 0 <= lo <= hi and width > 2**20


# --------------------------------------------------- 9. bands on numba's threads, joined rows


@settings(max_examples=200)
@given(cases(), st.integers(2, 5), st.booleans(), st.sampled_from(["_bands", "_parts"]))
def test_masks_split_between_threads_equal_the_tensor_op_path(
    same_bits, case, threads, in_place, split
):
    # any batch, each matrix cut in 2-5 bands of block rows, or the batch in 2-5 runs of whole
    # matrices (for real, either needs 65,536 entries a thread)
    x, level, block, zeros, rule = case
    with mock.patch.object(_norm_kernel, split, lambda *shape: threads):
        mask, out = masked_step(x, level, block, zeros, rule, in_place)
    assert torch.equal(mask.bool(), norm_keep_mask(x, level, block, zeros, rule))
    assert same_bits(out, x * mask)


def test_a_large_matrix_is_split_between_torch_threads_on_numba_openmp_threads():
    pytest.importorskip("numba.np.ufunc.omppool", reason="numba without its OpenMP layer")
    x = torch.randn(256, 1024, generator=torch.Generator().manual_seed(3))
    calls = []
    real = _norm_kernel._masks_in_bands

    def spy(*args):
        calls.append(args[-1])
        return real(*args)

    with torch_threads(2), mock.patch.object(_norm_kernel, "_masks_in_bands", spy):
        assert _norm_kernel._bands(256, 1024) == 2
        assert _norm_kernel._bands(64, 1024) == 1  # too small to be worth a second thread
        mask = step_mask(x, 0.5, (1, 4), None, "L1")
    assert calls == [2]
    assert _norm_kernel._THREADS == {"usable": True}
    assert torch.equal(mask.bool(), norm_keep_mask(x, 0.5, (1, 4), None, "L1"))
    assert _norm_kernel._parts(8192, 1, 512) == 2  # a per-row preprocess batch
    assert _norm_kernel._parts(96, 32, 32) == 1
    with torch_threads(1):  # as in a DataLoader worker
        assert _norm_kernel._bands(256, 1024) == 1
    with torch_threads(2), mock.patch.dict(_norm_kernel._THREADS, {"usable": False}):
        assert _norm_kernel._bands(256, 1024) == 1  # another layer, or a forked child


def test_runs_of_a_batch_of_small_matrices_each_keep_their_own_bracket():
    # 2 threads, each with its own buffers and bracket (used from 513 blocks a matrix), over
    # matrices whose scales jump
    generator = torch.Generator().manual_seed(5)
    scales = 10.0 ** torch.randint(-20, 20, (64, 1, 1), generator=generator)
    x = torch.randn(64, 64, 64, generator=generator) * scales  # 1,024 blocks a matrix
    calls = []
    real = _norm_kernel._masks_in_parts

    def spy(*args):
        calls.append(args[7].bracket.shape[0])
        return real(*args)

    with torch_threads(2), mock.patch.object(_norm_kernel, "_masks_in_parts", spy):
        for _ in range(2):
            mask = step_mask(x, 0.3, (1, 4), None, "L2")
            assert torch.equal(mask.bool(), norm_keep_mask(x, 0.3, (1, 4), None, "L2"))
    if _norm_kernel._THREADS.get("usable"):
        assert calls == [2, 2]


def _kernel_mask(x: np.ndarray) -> bytes:
    """The kernel's mask of a 256x1024 matrix, packed, with no torch op on the way (a child
    forked after torch's own OpenMP threads started must not run a parallel torch op)."""
    matrices = torch.from_numpy(x)[None]
    mask = torch.from_numpy(np.empty_like(x))[None]
    _norm_kernel.write_mask(matrices, mask, 32768, (1, 4), 4, "L1")
    return np.packbits(mask.numpy() != 0).tobytes()


def _mask_in_forked_child(x, queue):
    bands = _norm_kernel._bands(*x.shape)
    queue.put((torch.get_num_threads(), bands, _kernel_mask(x), dict(_norm_kernel._THREADS)))


def test_a_child_forked_after_the_threads_started_masks_in_one_thread():
    # GNU OpenMP cannot run in a child forked after it started (numba ends such a process)
    x = np.random.default_rng(3).standard_normal((256, 1024), dtype=np.float32)
    with torch_threads(2):
        expected = _kernel_mask(x)
        if not _norm_kernel._THREADS.get("usable"):
            pytest.skip("numba's threads are not OpenMP ones here: never started")
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_mask_in_forked_child, args=(x, queue))
        child.start()
        try:
            threads, bands, got, state = queue.get(timeout=60)
        finally:
            child.join(timeout=60)
            if child.is_alive():
                child.kill()
    assert child.exitcode == 0
    assert threads == 2 and bands == 1 and state == {"usable": False}
    assert got == expected


@pytest.mark.parametrize(
    "shape,block,seen",
    [((4096, 16), (1, 4), (64, 1024)), ((4095, 16), (1, 4), (65, 1008)),
     ((7, 12), (1, 4), (1, 84)), ((4096, 16), (2, 4), (4096, 16)),
     ((4096, 18), (1, 4), (4096, 18)), ((3, 2048), (1, 4), (3, 2048)),
     ((5, 0), (1, 4), (5, 0)), ((0, 8), (1, 4), (0, 1024))],
)  # fmt: skip
def test_short_rows_of_whole_blocks_are_joined(shape, block, seen):
    assert _norm_kernel._joined(*shape, block) == seen


@pytest.mark.parametrize("shape", [(4096, 16), (1000, 12), (999, 8)])
@pytest.mark.parametrize("rule", ["L1", "L2"])
def test_joined_rows_give_torch_ao_masks(shape, rule, torch_ao_mask):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(shape[1]))
    with kernel_calls() as calls:
        got = step_mask(x, 0.5, (1, 4), None, rule)
    assert calls == [shape]
    expected = torch_ao_mask(x, rule, sparsity_level=0.5, sparse_block_shape=(1, 4))
    assert torch.equal(got.bool(), expected.bool())
