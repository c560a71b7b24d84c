"""post_training_sparse_quantize: both orders, nested and selected embeddings, exact zeros."""
# torch warns once that quantized tensor creation is deprecated (the reference hits it too).

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.ao.nn import quantized as nnq
from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier as RefNorm
from torch.ao.pruning._experimental.data_sparsifier.quantization_utils import (
    post_training_sparse_quantize as ref_post_training_sparse_quantize,
)

from pipesparse import DataNormSparsifier, NMSparsifier, post_training_sparse_quantize
from pipesparse.quantization import QuantizedEmbeddingBag, quantize_zero_exact

pytestmark = pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
CONFIG = {"sparsity_level": 0.8, "sparse_block_shape": (1, 1)}


class Model(nn.Module):
    """The reference test's model: embeddings at the top and nested in a Sequential."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb1 = nn.Embedding(100, 3)
        self.embbag1 = nn.EmbeddingBag(200, 32)
        self.emb_seq = nn.Sequential(nn.Embedding(150, 3), nn.EmbeddingBag(100, 3))
        self.linear1 = nn.Linear(32, 32)
        self.linear2 = nn.Linear(16, 16)


def _zero_fraction(qmodule) -> float:
    return (qmodule.weight().dequantize() == 0).float().mean().item()


def test_sparsify_first_selected_embeddings_only():
    model = Model()
    linear_before = copy.deepcopy(model.linear1.state_dict())
    returned = post_training_sparse_quantize(
        model,
        DataNormSparsifier,
        sparsify_first=True,
        select_embeddings=[model.embbag1, model.emb1],
        **CONFIG,
    )
    assert returned is model
    assert type(model.emb1) is nnq.Embedding
    assert type(model.embbag1) is QuantizedEmbeddingBag  # a mode="mean" bag
    assert type(model.emb_seq[0]) is nn.Embedding
    assert type(model.emb_seq[1]) is nn.EmbeddingBag
    assert type(model.linear1) is nn.Linear and type(model.linear2) is nn.Linear
    assert all(torch.equal(v, model.linear1.state_dict()[k]) for k, v in linear_before.items())
    for module in (model.emb1, model.embbag1):
        assert 0.8 <= _zero_fraction(module) <= 0.85  # exact zeros (plus a few rounded to 0)


def test_quantize_first_converts_nested_embeddings():
    model = Model()
    post_training_sparse_quantize(model, DataNormSparsifier, sparsify_first=False, **CONFIG)
    assert type(model.emb1) is nnq.Embedding and type(model.emb_seq[0]) is nnq.Embedding
    assert isinstance(model.embbag1, nnq.EmbeddingBag)
    assert isinstance(model.emb_seq[1], nnq.EmbeddingBag)
    assert type(model.linear1) is nn.Linear
    for module in (model.emb1, model.embbag1, model.emb_seq[0], model.emb_seq[1]):
        assert 0.8 <= _zero_fraction(module) <= 0.85


@pytest.mark.parametrize("sparsify_first", [True, False])
def test_same_module_types_as_the_reference(sparsify_first):
    ours, ref = Model(), Model()
    post_training_sparse_quantize(ours, DataNormSparsifier, sparsify_first, **CONFIG)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's eager-mode quantization deprecation
        ref_post_training_sparse_quantize(ref, RefNorm, sparsify_first, **CONFIG)
    for (name, a), (_, b) in zip(ours.named_modules(), ref.named_modules(), strict=True):
        assert isinstance(a, type(b)), name  # a mean bag is a subclass that really averages
        if isinstance(a, nnq.Embedding):
            qa, qb = a.weight(), b.weight()
            assert (qa.dtype, qa.qscheme()) == (qb.dtype, qb.qscheme()), name


def test_sparsity_survives_quantization_where_the_reference_loses_it():
    """The reference stores a pruned 0.0 with a float zero point and gets it back as a small
    non-zero: of 50 % pruned entries only about 9 % dequantize to 0.0 (torch 2.x)."""
    config = {"sparsity_level": 0.5, "sparse_block_shape": (1, 4)}
    ours, ref = Model(seed=1), Model(seed=1)
    post_training_sparse_quantize(ours, DataNormSparsifier, sparsify_first=True, **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_post_training_sparse_quantize(ref, RefNorm, sparsify_first=True, **config)
    ours_zeros = _zero_fraction(ours.embbag1)
    ref_zeros = _zero_fraction(ref.embbag1)
    assert ours_zeros >= 0.5
    assert ref_zeros < 0.25, "the reference's loss of zeros documented here is gone"


@pytest.mark.parametrize("sparsify_first", [True, False])
def test_pruned_entries_are_exact_zeros_in_weights_and_outputs(sparsify_first):
    model = Model(seed=2)
    float_weight = model.embbag1.weight.detach().clone()
    post_training_sparse_quantize(
        model,
        DataNormSparsifier,
        sparsify_first,
        select_embeddings=[model.embbag1],
        sparsity_level=0.5,
        sparse_block_shape=(1, 4),
    )
    qweight = model.embbag1.weight()
    source = float_weight if sparsify_first else quantize_zero_exact(float_weight).dequantize()
    reference = RefNorm(sparsity_level=0.5, sparse_block_shape=(1, 4))
    reference.add_data("w", source.clone())
    reference.step()
    pruned = reference.get_mask("w") == 0
    assert pruned.float().mean() == 0.5
    assert (qweight.dequantize()[pruned] == 0).all()
    rows = torch.arange(200)
    out = model.embbag1(rows, torch.arange(200))  # one row per bag: the packed kernel's values
    assert (out[pruned] == 0).all()


@pytest.mark.parametrize("sparsify_first", [True, False])
def test_outputs_stay_close_to_the_float_model(sparsify_first):
    model = Model(seed=3)
    floats = {"emb1": model.emb1, "embbag1": model.embbag1}
    expected_dense = {k: m.weight.detach().clone() for k, m in floats.items()}
    post_training_sparse_quantize(model, DataNormSparsifier, sparsify_first, **CONFIG)
    idx = torch.randint(0, 100, (64,), generator=torch.Generator().manual_seed(0))
    offsets = torch.arange(0, 64, 4)
    for key, qmodule in (("emb1", model.emb1), ("embbag1", model.embbag1)):
        qweight = qmodule.weight()
        step = qweight.q_per_channel_scales().max().item()
        kept = qweight.dequantize() != 0
        if sparsify_first:  # the original float module holds the pruned float weights
            float_module = floats[key]
        else:
            float_module = copy.deepcopy(floats[key])
            with torch.no_grad():
                float_module.weight.mul_(kept)
        bag = 4 if key == "embbag1" else 1
        args = (idx, offsets) if key == "embbag1" else (idx,)
        torch.testing.assert_close(
            qmodule(*args), float_module(*args), atol=bag * step / 2 + 1e-6, rtol=0
        )
        # the kept entries are the large ones: pruning removed the smallest 80 %
        dense = expected_dense[key]
        assert dense[kept].abs().mean() > 2 * dense[~kept].abs().mean()


def test_nm_sparsifier_gives_two_four_quantized_weights():
    model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 2))
    post_training_sparse_quantize(model, NMSparsifier, n=2, m=4)
    nonzero = model[0].weight().dequantize() != 0
    assert (nonzero.reshape(-1, 4).sum(dim=1) <= 2).all()


def test_zero_exact_quantization_bounds():
    weight = torch.randn(20, 7)
    weight[3] = 0.0  # an all-zero row
    weight[4] = weight[4].abs() + 1  # all positive: the range still includes 0
    weight[weight.abs() < 0.3] = 0.0
    qweight = quantize_zero_exact(weight)
    scales = qweight.q_per_channel_scales().float()
    error = (qweight.dequantize() - weight).abs()
    assert (error <= scales[:, None] / 2 + 1e-6).all()
    assert (qweight.dequantize()[weight == 0] == 0).all()
    assert torch.equal(
        qweight.q_per_channel_zero_points().round(), qweight.q_per_channel_zero_points()
    )


def test_zero_exact_quantization_of_rows_of_tiny_values():
    """A row whose largest magnitude is ~1e-37 had a subnormal scale whose inverse overflows
    float32: every entry came back as the row's minimum (zeros lost, signs flipped)."""
    weight = torch.tensor([[1e-37, -5e-38, 0.0, 3e-38], [1e-38, 0.0, -1e-38, 0.0], [1.0, 0, -1, 0]])
    qweight = quantize_zero_exact(weight)
    scales = qweight.q_per_channel_scales().float()
    assert (qweight.dequantize()[weight == 0] == 0).all()
    assert ((qweight.dequantize() - weight).abs() <= scales[:, None] / 2).all()
    module = nnq.Embedding(3, 4)
    module.set_weight(qweight)
    assert (module(torch.arange(3))[weight == 0] == 0).all()


@pytest.mark.parametrize("include_last_offset", [False, True])
def test_mean_bags_average_where_the_reference_sums(include_last_offset):
    bags = nn.Sequential(
        nn.EmbeddingBag(10, 4, mode="mean", include_last_offset=include_last_offset)
    )
    ref = copy.deepcopy(bags)
    expected = copy.deepcopy(bags)
    post_training_sparse_quantize(bags, DataNormSparsifier, sparsity_level=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_post_training_sparse_quantize(ref, RefNorm, sparsity_level=0.0)
    indices = torch.tensor([1, 2, 3, 4, 5, 6])
    offsets = torch.tensor([0, 2, 2, 6]) if include_last_offset else torch.tensor([0, 2, 2])
    want = expected[0](indices, offsets)  # bags of 2, 0 and 4 rows
    step = bags[0].weight().q_per_channel_scales().max().item()
    torch.testing.assert_close(bags[0](indices, offsets), want, atol=step, rtol=0)
    assert not torch.allclose(ref[0](indices, offsets), want, atol=step)  # the reference sums
    two_d = torch.tensor([[1, 2, 3], [4, 5, 6]])
    torch.testing.assert_close(bags[0](two_d), expected[0](two_d), atol=step, rtol=0)


@pytest.mark.parametrize("include_last_offset", [False, True])
@pytest.mark.parametrize("mode", ["mean", "sum"])
def test_padding_entries_are_left_out_of_bags(mode, include_last_offset):
    bags = nn.Sequential(
        nn.EmbeddingBag(6, 4, mode=mode, padding_idx=0, include_last_offset=include_last_offset)
    )
    with torch.no_grad():
        bags[0].weight[0] = 3.0  # a padding row that is not zero: still left out
    expected = copy.deepcopy(bags)
    post_training_sparse_quantize(bags, DataNormSparsifier, sparsity_level=0.0)
    assert type(bags[0]) is QuantizedEmbeddingBag and bags[0].padding_idx == 0
    indices = torch.tensor([0, 1, 2, 0, 0, 3, 0])
    offsets = torch.tensor([0, 3, 5, 7]) if include_last_offset else torch.tensor([0, 3, 5])
    want = expected[0](indices, offsets)  # bags of 2, 0 (all padding) and 1 kept rows
    step = bags[0].weight().q_per_channel_scales().max().item()
    torch.testing.assert_close(bags[0](indices, offsets), want, atol=step, rtol=0)
    two_d = torch.tensor([[0, 1, 2], [4, 0, 0]])
    torch.testing.assert_close(bags[0](two_d), expected[0](two_d), atol=step, rtol=0)
    if mode == "sum":
        weights = torch.tensor([0.5, 2.0, -1.0, 1.0, 4.0, 0.25, 3.0])
        torch.testing.assert_close(
            bags[0](indices, offsets, per_sample_weights=weights),
            expected[0](indices, offsets, per_sample_weights=weights),
            atol=4 * step,
            rtol=0,
        )


def test_sum_bags_with_a_last_offset_keep_every_row_of_2d_indices():
    """torch.ao's quantized bag gives rows - 1 bags for 2-D indices when include_last_offset
    is set (the last row is dropped); nn.EmbeddingBag gives one bag per row."""
    bags = nn.Sequential(nn.EmbeddingBag(10, 4, mode="sum", include_last_offset=True))
    expected = copy.deepcopy(bags)
    post_training_sparse_quantize(bags, DataNormSparsifier, sparsity_level=0.0)
    two_d = torch.tensor([[1, 2], [3, 4], [5, 6]])
    step = bags[0].weight().q_per_channel_scales().max().item()
    torch.testing.assert_close(bags[0](two_d), expected[0](two_d), atol=2 * step, rtol=0)
    indices, offsets = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 2, 2, 5])
    torch.testing.assert_close(
        bags[0](indices, offsets), expected[0](indices, offsets), atol=3 * step, rtol=0
    )


@pytest.mark.parametrize("include_last_offset", [False, True])
def test_2d_indices_of_empty_rows_give_one_empty_bag_per_row(include_last_offset):
    bags = nn.Sequential(
        nn.EmbeddingBag(10, 4, mode="mean", include_last_offset=include_last_offset),
        nn.EmbeddingBag(10, 4, padding_idx=0, include_last_offset=include_last_offset),
    )
    post_training_sparse_quantize(bags, DataNormSparsifier, sparsity_level=0.0)
    for bag in bags:
        assert torch.equal(bag(torch.zeros(3, 0, dtype=torch.int64)), torch.zeros(3, 4))


def test_2d_indices_with_offsets_are_refused_as_by_nn_embedding_bag():
    """2-D indices are one bag per row: offsets given with them would be ignored."""
    bags = nn.Sequential(nn.EmbeddingBag(10, 4, mode="mean"))
    post_training_sparse_quantize(bags, DataNormSparsifier, sparsity_level=0.0)
    with pytest.raises(ValueError, match="offsets must be None"):
        bags[0](torch.tensor([[1, 2], [3, 4]]), torch.tensor([0, 1]))


@pytest.mark.parametrize("sparsify_first", [True, False])
def test_a_weight_tied_to_an_embedding_is_pruned_only_when_sparsifying_first(sparsify_first):
    """As the README says: sparsify_first=True prunes the float weight in place, so a layer
    tied to it (a language model's output layer) is pruned too; False leaves it alone."""
    model = nn.Module()
    model.emb = nn.Embedding(20, 8)
    model.head = nn.Linear(8, 20, bias=False)
    model.head.weight = model.emb.weight
    before = model.head.weight.detach().clone()
    post_training_sparse_quantize(
        model, DataNormSparsifier, sparsify_first, sparsity_level=0.5, sparse_block_shape=(1, 4)
    )
    assert type(model.emb) is nnq.Embedding and type(model.head) is nn.Linear
    if sparsify_first:
        assert (model.head.weight == 0).float().mean() == 0.5
    else:
        assert torch.equal(model.head.weight, before)
    untied = nn.Module()  # the README's way to keep it dense in both orders
    untied.emb = nn.Embedding(20, 8)
    untied.head = nn.Linear(8, 20, bias=False)
    untied.head.weight = nn.Parameter(untied.emb.weight.detach().clone())
    post_training_sparse_quantize(untied, DataNormSparsifier, sparsify_first, sparsity_level=0.5)
    assert (untied.head.weight != 0).all()


def test_converted_bags_can_be_scripted_as_the_reference_bags_can():
    """A default (mean) bag becomes a QuantizedEmbeddingBag; torch.jit.script, the usual way to
    deploy quantized embeddings, must take it as it takes torch.ao's quantized bag."""
    model = nn.Sequential(
        nn.EmbeddingBag(10, 4),
        nn.EmbeddingBag(10, 4, mode="sum", padding_idx=0),
        nn.EmbeddingBag(10, 4, mode="mean", padding_idx=1, include_last_offset=True),
        nn.EmbeddingBag(10, 4, mode="sum"),
    )
    post_training_sparse_quantize(model, DataNormSparsifier, sparsity_level=0.5)
    two_d = torch.tensor([[0, 1, 2], [3, 1, 1]])
    indices, offsets = torch.tensor([0, 1, 2, 3, 1, 1]), torch.tensor([0, 2, 2, 6])
    for bag in model:
        scripted = torch.jit.script(bag)
        assert torch.equal(scripted(two_d), bag(two_d))
        cut = offsets if bag.include_last_offset else offsets[:-1]
        assert torch.equal(scripted(indices, cut), bag(indices, cut))
    weights = torch.rand(6)
    scripted = torch.jit.script(model[1])
    assert torch.equal(
        scripted(indices, offsets[:-1], per_sample_weights=weights),
        model[1](indices, offsets[:-1], per_sample_weights=weights),
    )


def test_max_bags_are_refused_before_anything_changes():
    model = nn.Sequential(nn.Embedding(5, 4), nn.EmbeddingBag(5, 4, mode="max"))
    with pytest.raises(ValueError, match="'1' has mode='max'"):
        post_training_sparse_quantize(model, DataNormSparsifier)
    assert type(model[0]) is nn.Embedding


class Colliding(nn.Module):
    def __init__(self):
        super().__init__()
        self.a_b_c_2 = nn.Embedding(8, 4)  # the name a count suffix would give "a_b.c" below
        self.a = nn.ModuleDict({"b_c": nn.Embedding(8, 4)})
        self.a_b = nn.ModuleDict({"c": nn.Embedding(8, 4)})
        self.shared = nn.Embedding(8, 4)
        self.again = self.shared


def test_colliding_names_and_shared_modules():
    model = Colliding()
    post_training_sparse_quantize(model, DataNormSparsifier, sparsity_level=0.5)
    assert type(model.a["b_c"]) is nnq.Embedding and type(model.a_b["c"]) is nnq.Embedding
    assert model.shared is model.again and type(model.shared) is nnq.Embedding
    for module in (model.a_b_c_2, model.a["b_c"], model.a_b["c"], model.shared):
        assert _zero_fraction(module) >= 0.5


def test_bad_arguments_leave_the_model_alone():
    model = Model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match="Linear"):
        post_training_sparse_quantize(model, DataNormSparsifier, select_embeddings=[model.linear1])
    with pytest.raises(ValueError, match="not a submodule"):
        post_training_sparse_quantize(
            model, DataNormSparsifier, select_embeddings=[nn.Embedding(3, 3)]
        )
    with pytest.raises(TypeError, match="list of embedding modules"):
        post_training_sparse_quantize(model, DataNormSparsifier, select_embeddings=model.emb1)
    with pytest.raises(TypeError, match="BaseDataSparsifier subclass"):
        post_training_sparse_quantize(model, RefNorm)
    with pytest.raises(ValueError, match="sparsity_level"):
        post_training_sparse_quantize(model, DataNormSparsifier, sparsity_level="half")
    with pytest.raises(ValueError, match="multiple of m=4"):  # embedding_dim 3
        post_training_sparse_quantize(model, NMSparsifier)
    assert type(model.emb1) is nn.Embedding
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


FMAX = torch.finfo(torch.float32).max
HUGE_ROWS = [
    [1.7e38, -1.7e38, 0.0, 1.0],
    [1.71e38, -1.71e38, 0.0, 1.0],  # range past the float32 maximum
    [3e38, -1e38, 0.0, 1.0],
    [FMAX, -FMAX, 0.0, 1.0],
    [FMAX, 0.0, 0.0, 1.0],  # a grid rounded up past the maximum
    [-FMAX, 0.0, 0.0, 1.0],
    [1.0, -2.0, 0.0, 0.5],
]


def test_zero_exact_quantization_of_rows_near_the_float32_maximum():
    """A row whose range passed the float32 maximum (values of both signs from about 1.7e38)
    had an infinite scale and came back as NaN (torch.ao's quantization too); a row reaching
    +-3.4e38 came back inf, and its zeros -inf from the embedding kernels."""
    weight = torch.tensor(HUGE_ROWS)
    qweight = quantize_zero_exact(weight)
    scales = qweight.q_per_channel_scales()
    dense = qweight.dequantize()
    assert torch.isfinite(scales).all() and torch.isfinite(dense).all()
    assert (dense[weight == 0] == 0).all()
    error = (dense.double() - weight.double()).abs()
    # about one step (1.002) at most where half a step would leave float32
    assert (error <= 1.01 * scales[:, None]).all()
    assert (error[[0, 2, 6]] <= scales[[0, 2, 6], None] / 2).all()  # half a step elsewhere
    module = nnq.Embedding(len(HUGE_ROWS), 4)
    module.set_weight(qweight)
    out = module(torch.arange(len(HUGE_ROWS)))
    assert torch.equal(out, dense)
    bag = nnq.EmbeddingBag(len(HUGE_ROWS), 4, mode="sum")
    bag.set_weight(qweight)
    assert torch.equal(bag(torch.arange(len(HUGE_ROWS)), torch.arange(len(HUGE_ROWS))), dense)


def test_rows_holding_inf_or_nan_stay_nan_as_in_torch_ao():
    weight = torch.tensor(
        [[float("inf"), 1.0, 0.0], [float("nan"), 1.0, 0.0], [-float("inf"), 0, 1]]
    )
    assert quantize_zero_exact(weight).dequantize().isnan().all()


@pytest.mark.parametrize("sparsify_first", [True, False])
def test_huge_embedding_rows_stay_finite_in_both_orders(sparsify_first):
    model = nn.Sequential(nn.Embedding(len(HUGE_ROWS), 4))
    model[0].weight.data = torch.tensor(HUGE_ROWS)
    post_training_sparse_quantize(
        model, DataNormSparsifier, sparsify_first, sparsity_level=0.25, sparse_block_shape=(1, 1)
    )
    out = model[0](torch.arange(len(HUGE_ROWS)))
    assert torch.isfinite(out).all()
    assert ((out == 0).sum(dim=1) >= 1).all()  # each row's pruned entry is still 0


def test_quantize_zero_exact_makes_no_float64_copy_of_the_weight():
    """The float64 range (for rows past the float32 maximum) was computed on a float64 copy of
    the whole weight: peak memory rose by twice the weight (310 MiB for a 128 MiB table, 49
    before), enough to run a large embedding table out of memory. The extremes of each row
    are exact in float32; only they go to float64."""
    import subprocess
    import sys

    script = """
import resource, warnings
import torch
from pipesparse.quantization import quantize_zero_exact
warnings.simplefilter("ignore")
weight = torch.randn(1 << 18, 128)  # 128 MiB
quantize_zero_exact(weight[:2])  # imports and first-call allocations out of the way
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
quantize_zero_exact(weight)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    growth_mib = float(done.stdout.split()[-1])
    assert growth_mib < 128, growth_mib  # quint8 output: 32 MiB; a float64 copy: 256 MiB
