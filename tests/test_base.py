"""BaseDataSparsifier: registry, configs, masks, step, squash, names, data kinds, ranks, dtypes."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from torch import nn

from pipesparse import BaseDataSparsifier, DataNormSparsifier, NMSparsifier, ThresholdSparsifier
from pipesparse.errors import UnknownDataError

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
]
FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SHAPES = [(), (5,), (3, 4), (2, 3, 4), (2, 2, 3, 4)]


class Recording(BaseDataSparsifier):
    """Records every update_mask call; changes no mask."""

    def __init__(self, data_list=None, **defaults):
        self.calls = []
        super().__init__(data_list, **defaults)

    def update_mask(self, name, data, **config):
        self.calls.append((name, data.clone(), dict(config), torch.is_grad_enabled()))


class ZeroNegativeIndexing(BaseDataSparsifier):
    """Edits by indexing: ``mask[data < 0] = 0``."""

    def update_mask(self, name, data, **config):
        self.get_mask(name)[data < 0] = 0


class ZeroNegativeInPlaceMul(BaseDataSparsifier):
    """Edits by ``mask *= m``."""

    def update_mask(self, name, data, **config):
        mask = self.get_mask(name)
        mask *= (data >= 0).to(mask.dtype)


class ZeroNegativeDataAssign(BaseDataSparsifier):
    """Edits by rebinding the storage: ``mask.data = ...`` (what torch.ao's rules do)."""

    def update_mask(self, name, data, **config):
        mask = self.get_mask(name)
        mask.data = (data >= 0).to(torch.int8)


class ZeroNegativeReplace(BaseDataSparsifier):
    """Replaces the state entry outright."""

    def update_mask(self, name, data, **config):
        self.state[name]["mask"] = (data >= 0).float()


class WrongShape(BaseDataSparsifier):
    def update_mask(self, name, data, **config):
        self.get_mask(name).data = torch.ones(7)


class KeepTrue(BaseDataSparsifier):
    """A rule for bool data: keep the True entries."""

    def update_mask(self, name, data, **config):
        self.get_mask(name).copy_(data)


# -- constructor, defaults, add_data --------------------------------------------------------
def test_constructor_registers_data_list_with_defaults():
    a, b = torch.randn(3, 4), torch.randn(5)
    s = Recording([("a", a), ("b", b)], alpha=1, beta="x")
    assert list(s.data_groups) == ["a", "b"]
    assert s.data_groups["a"] == {"alpha": 1, "beta": "x"} == s.data_groups["b"]
    assert s.get_data("a") is a and s.get_data("b") is b
    assert torch.equal(s.get_mask("a"), torch.ones(3, 4))


def test_add_data_merges_defaults_with_per_data_config():
    s = Recording(alpha=1, beta=2)
    s.add_data("x", torch.randn(2), beta=5, gamma=7)
    assert s.data_groups["x"] == {"alpha": 1, "beta": 5, "gamma": 7}
    assert s.defaults == {"alpha": 1, "beta": 2}  # per-data config does not leak into defaults
    s.add_data("y", torch.randn(2))
    assert s.data_groups["y"] == {"alpha": 1, "beta": 2}


def test_add_data_returns_masked_view():
    s = ThresholdSparsifier(threshold=0.5)
    x = torch.tensor([0.1, -0.7, 0.4, 2.0])
    assert torch.equal(s.add_data("x", x), x)  # a new mask keeps everything
    s.step()
    out = s.add_data("x", x)
    assert torch.equal(out, torch.tensor([0.0, -0.7, 0.0, 2.0]))
    assert out.dtype == x.dtype


def test_configs_written_into_data_groups_are_used_by_the_next_step():
    # what a scheduler does: it writes into data_groups between steps
    s = ThresholdSparsifier([("x", torch.tensor([1.0, 2.0, 3.0]))], threshold=0.0)
    s.data_groups["x"]["threshold"] = 2.5
    s.step()
    assert s.get_mask("x").tolist() == [0.0, 0.0, 1.0]


# -- data kinds, attached not copied ----------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(4, 3),
        lambda: nn.Parameter(torch.randn(4, 3)),
        lambda: nn.Embedding(4, 3),
        lambda: nn.EmbeddingBag(4, 3),
    ],
    ids=["Tensor", "Parameter", "Embedding", "EmbeddingBag"],
)
def test_data_kinds_are_attached_not_copied(make):
    data = make()
    tensor = data.weight if isinstance(data, nn.Module) else data
    s = ThresholdSparsifier(threshold=0.5)
    s.add_data("d", data)
    assert s.get_data("d") is tensor
    with torch.no_grad():
        tensor.fill_(0.25)  # the user's own tensor, changed in place
    assert torch.equal(s.get_data("d"), torch.full((4, 3), 0.25))
    s.step()  # the rule sees the change: everything is now below the threshold
    assert not s.get_mask("d").any()
    assert not s.get_data("d", return_original=False).any()


def test_unsupported_data_type_is_a_type_error_naming_it():
    s = ThresholdSparsifier()
    for bad in ([1.0, 2.0], 3.0, nn.Linear(2, 2)):
        with pytest.raises(TypeError, match=r"'w'.*unsupported type.*accepted: torch\.Tensor"):
            s.add_data("w", bad)
    assert not s.data_groups


# -- replacing data under an existing name ------------------------------------------------------
def test_replacing_keeps_config_updated_by_new_config():
    s = DataNormSparsifier(sparsity_level=0.5)
    s.add_data("x", torch.randn(4, 4), sparsity_level=0.25, zeros_per_block=2)
    s.add_data("x", torch.randn(4, 4), sparse_block_shape=(2, 2))
    assert s.data_groups["x"] == {
        "sparsity_level": 0.25,
        "sparse_block_shape": (2, 2),
        "zeros_per_block": 2,
    }


def test_replacing_with_reuse_mask_keeps_the_mask():
    s = ThresholdSparsifier(threshold=0.5)
    s.add_data("x", torch.tensor([1.0, 0.1, 1.0]))
    s.step()
    mask = s.get_mask("x")
    out = s.add_data("x", torch.tensor([5.0, 5.0, 5.0]))
    assert s.get_mask("x") is mask
    assert torch.equal(out, torch.tensor([5.0, 0.0, 5.0]))
    # a config change on the same shape keeps the mask too
    s.add_data("x", torch.tensor([5.0, 5.0, 5.0]), threshold=0.2)
    assert s.get_mask("x").tolist() == [1.0, 0.0, 1.0]


def test_replacing_with_reuse_mask_and_other_shape_is_a_clear_error(unchanged):
    s = ThresholdSparsifier([("x", torch.randn(3, 4))])
    s.step()
    with unchanged(s), pytest.raises(ValueError, match=r"'x'.*\(3, 4\).*\(4, 3\)"):
        s.add_data("x", torch.randn(4, 3))


def test_replacing_with_another_dtype_keeps_the_mask_and_returns_the_new_dtype():
    s = ThresholdSparsifier([("x", torch.tensor([1.0, 0.01]))], threshold=0.5)
    s.step()
    out = s.add_data("x", torch.tensor([3.0, 3.0], dtype=torch.float16))
    assert out.dtype == torch.float16 and out.tolist() == [3.0, 0.0]


def test_replacing_without_reuse_mask_starts_all_ones():
    s = ThresholdSparsifier(threshold=0.5)
    s.add_data("x", torch.tensor([1.0, 0.1]))
    s.step()
    out = s.add_data("x", torch.tensor([0.1, 0.1, 0.1]), reuse_mask=False)
    assert torch.equal(s.get_mask("x"), torch.ones(3))
    assert torch.equal(out, torch.tensor([0.1, 0.1, 0.1]))


def test_re_adding_the_same_name_every_batch_warns_nothing_and_keeps_mask_and_config():
    s = ThresholdSparsifier(threshold=0.5)
    s.add_data("batch", torch.randn(8, 4))
    s.step()
    mask, config = s.get_mask("batch"), s.data_groups["batch"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            s.add_data("batch", torch.randn(8, 4))
    assert s.get_mask("batch") is mask and s.data_groups["batch"] is config


# -- step --------------------------------------------------------------------------------------
def test_step_calls_update_mask_for_every_name_with_unmasked_data_under_no_grad():
    a = nn.Parameter(torch.randn(3))
    b = torch.randn(2, 2)
    s = Recording([("a", a)], alpha=1)
    s.add_data("b", b, alpha=2)
    s.get_mask("a").zero_()  # the rule must still see the original values
    s.step()
    assert [c[0] for c in s.calls] == ["a", "b"]
    assert torch.equal(s.calls[0][1], a.detach()) and torch.equal(s.calls[1][1], b)
    assert s.calls[0][2] == {"alpha": 1} and s.calls[1][2] == {"alpha": 2}
    assert not s.calls[0][3] and not s.calls[1][3]  # grad disabled inside the rule
    assert s._step_count == 1


class Failing(BaseDataSparsifier):
    def update_mask(self, name, data, **config):
        raise RuntimeError("rule failed")


def test_step_gives_back_the_grad_mode_it_found_also_when_the_rule_raises():
    s = Recording([("a", torch.randn(3))])
    s.step()
    assert torch.is_grad_enabled()
    with torch.no_grad():
        s.step()
        assert not torch.is_grad_enabled()
    failing = Failing([("a", torch.randn(3))])
    with pytest.raises(RuntimeError, match="rule failed"):
        failing.step()
    assert torch.is_grad_enabled()


def test_a_config_edited_into_an_invalid_one_fails_the_step_before_any_mask_changes(unchanged):
    s = DataNormSparsifier(sparsity_level=0.5)
    s.add_data("a", torch.randn(4, 8))
    s.add_data("b", torch.randn(4, 8))
    s.data_groups["b"]["zeros_per_block"] = 5  # a 1x4 block has 4 entries
    with unchanged(s), pytest.raises(ValueError, match="'b'.*zeros_per_block=5"):
        s.step()
    assert s._step_count == 0


@pytest.mark.parametrize("rule", [ZeroNegativeIndexing, DataNormSparsifier, ThresholdSparsifier])
@pytest.mark.parametrize(
    "resize", [lambda x: setattr(x, "data", torch.randn(5, 8)), lambda x: x.resize_(2, 8)]
)
def test_data_resized_after_add_data_is_a_clear_error_before_any_mask_changes(
    rule, resize, unchanged
):
    """Data is attached: a tensor resized since add_data (``x.data = bigger``, ``resize_``) no
    longer fits its mask. step() raised torch's RuntimeError after the names before it had
    their new masks; get_data and squash_mask a RuntimeError of broadcasting."""
    x = torch.randn(4, 8)
    s = rule([("a", torch.randn(4, 8)), ("x", x)])
    resize(x)
    shapes = rf"'x'.*shape {re.escape(str(tuple(x.shape)))}.*mask has shape \(4, 8\).*reuse_mask"
    with unchanged(s):
        with pytest.raises(ValueError, match=shapes):
            s.step()
        with pytest.raises(ValueError, match=shapes):
            s.step(masked_out={"x": x})
        with pytest.raises(ValueError, match=shapes):
            s.squash_mask()
        with pytest.raises(ValueError, match=shapes):
            s.get_data("x", return_original=False)
    s.add_data("x", x, reuse_mask=False)  # the way out the message names
    s.step()
    assert s.get_mask("x").shape == x.shape


def test_step_does_nothing_when_mask_update_is_disabled():
    s = Recording([("a", torch.randn(3))])
    s.enable_mask_update = False
    s.step()
    assert s.calls == []


@pytest.mark.parametrize(
    "rule",
    [ZeroNegativeIndexing, ZeroNegativeInPlaceMul, ZeroNegativeDataAssign, ZeroNegativeReplace],
)
def test_every_way_of_editing_the_mask_takes_effect(rule):
    x = torch.tensor([[1.0, -2.0], [-3.0, 4.0]])
    s = rule([("x", x)])
    mask = s.get_mask("x")
    ptr = mask.data_ptr()
    s.step()
    expected = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.equal(s.get_mask("x").float(), expected)
    assert torch.equal(s.get_data("x", return_original=False), x * expected)
    # the mask the user holds is the live one, on its original storage (shared memory stays shared)
    assert s.get_mask("x") is mask and mask.data_ptr() == ptr
    assert torch.equal(s.add_data("x", x), x * expected)


class NotATensor(BaseDataSparsifier):
    def update_mask(self, name, data, **config):
        self.state[name]["mask"] = (data > 0).tolist()


def test_rule_that_stores_a_mask_that_is_not_a_tensor_is_an_error_and_keeps_the_mask():
    """An AttributeError ('list' object has no attribute 'shape') left the list in the state,
    so every later state_dict() failed too."""
    s = NotATensor([("x", torch.randn(2, 3))])
    mask = s.get_mask("x")
    with pytest.raises(TypeError, match=r"update_mask for 'x' stored a list.*tensor"):
        s.step()
    assert s.get_mask("x") is mask and torch.equal(mask, torch.ones(2, 3))
    assert torch.equal(s.state_dict()["state"]["x"]["mask"], torch.ones(2, 3, dtype=torch.bool))


def test_rule_that_changes_the_mask_shape_is_an_error_and_keeps_the_mask():
    s = WrongShape([("x", torch.randn(2, 3))])
    mask = s.get_mask("x")
    with pytest.raises(ValueError, match=r"'x'.*\(7,\).*\(2, 3\)"):
        s.step()
    assert s.get_mask("x") is mask and torch.equal(mask, torch.ones(2, 3))


# -- step(masked_out=...) ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rule",
    [ZeroNegativeIndexing, ZeroNegativeInPlaceMul, ZeroNegativeDataAssign, ZeroNegativeReplace],
)
@pytest.mark.parametrize("in_place", [False, True])
def test_step_writes_the_masked_data_into_masked_out_for_any_rule(rule, in_place):
    x = torch.tensor([[1.0, -2.0], [-3.0, 4.0]])
    data = x.clone()
    s = rule([("x", data)])
    out = data if in_place else torch.full_like(x, 7.0)
    s.step(masked_out={"x": out})
    expected = x * s.get_mask("x")
    assert torch.equal(out, expected)
    assert torch.equal(data, expected if in_place else x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.int64])
def test_masked_out_keeps_the_datas_dtype_as_get_data_does(dtype):
    x = torch.tensor([[1, -2], [-3, 4]], dtype=dtype)
    s = ZeroNegativeIndexing([("x", x)])
    out = torch.empty_like(x)
    s.step(masked_out={"x": out})
    assert out.dtype == dtype and torch.equal(out, s.get_data("x", return_original=False))


@pytest.mark.parametrize("shape", [(4, 16), (3, 5, 8), (7, 13), (64, 1000), (300,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("block,zeros", [((1, 4), None), ((2, 3), None), ((1, 4), 2)])
@pytest.mark.parametrize("in_place", [False, True])
def test_data_norm_masked_out_is_the_masked_data_bit_for_bit(
    shape, dtype, block, zeros, in_place, same_bits
):
    """The CPU kernel writes the product in its mask pass (whole blocks, float32/64): the same
    bits as ``data * mask``, -0.0 and NaN included; other cases take the base's multiply."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))).to(dtype)
    x.view(-1)[:4] = torch.tensor([math.nan, -0.0, -math.inf, -1e-3], dtype=dtype)
    data = x.clone()
    s = DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=block, zeros_per_block=zeros)
    s.add_data("x", data)
    out = data if in_place else torch.empty_like(x)
    s.step(masked_out={"x": out})
    assert same_bits(out, x * s.get_mask("x"))
    assert same_bits(data, out if in_place else x)


def test_data_norm_masked_out_that_is_not_contiguous_or_is_a_view_of_other_data():
    x = torch.randn(32, 64)
    s = DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4))
    s.add_data("x", x)
    wide = torch.zeros(32, 128)
    out = wide[:, ::2]  # not contiguous: the base's multiply writes it
    s.step(masked_out={"x": out})
    assert torch.equal(out, x * s.get_mask("x")) and torch.equal(wide[:, 1::2], torch.zeros(32, 64))
    transposed = torch.randn(64, 32).t()  # data not contiguous, out contiguous
    s.add_data("x", transposed)
    out = torch.empty(32, 64)
    s.step(masked_out={"x": out})
    assert torch.equal(out, transposed * s.get_mask("x"))


def test_a_data_norm_subclass_with_its_own_rule_is_not_bypassed_by_masked_out():
    class KeepAll(DataNormSparsifier):
        def update_mask(self, name, data, **config):
            self.get_mask(name).fill_(1)

    x = torch.randn(8, 16)
    s = KeepAll(sparsity_level=0.5)
    s.add_data("x", x)
    out = torch.empty_like(x)
    s.step(masked_out={"x": out})
    assert torch.equal(s.get_mask("x"), torch.ones(8, 16)) and torch.equal(out, x)


def test_a_float_mask_of_another_dtype_masks_in_the_datas_dtype(same_bits):
    """A float64 mask (``fit`` leaves one over features) on float32 data: no promotion, the
    same values as the float64 product, -0.0 and NaN included."""
    from pipesparse.base import apply_mask, mask_like

    x = torch.tensor([[1.5, -2.0, math.nan, -math.inf]])
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    got = apply_mask(x, mask)
    assert got.dtype == torch.float32 and mask_like(x, mask).dtype == torch.float32
    assert same_bits(got, (x.double() * mask).float())
    assert mask_like(x.long(), mask).dtype == torch.int64  # 0 and 1: exact, and no promotion
    soft = torch.tensor([0.5, 1.0])  # a user rule's soft mask: the product is cast back
    assert mask_like(torch.tensor([5, 4]), soft) is soft
    assert apply_mask(torch.tensor([5, 4]), soft).tolist() == [2, 4]
    assert mask_like(x, mask.bool()).dtype == torch.bool


def test_masked_out_with_mask_updates_disabled_holds_the_data_under_the_current_mask():
    x = torch.tensor([1.0, -2.0, 3.0])
    s = Recording([("x", x)])
    s.get_mask("x")[1] = 0
    s.enable_mask_update = False
    out = torch.empty(3)
    s.step(masked_out={"x": out})
    assert s.calls == [] and torch.equal(out, torch.tensor([1.0, 0.0, 3.0]))


@pytest.mark.parametrize(
    "masked_out,error,match",
    [
        ({"y": torch.empty(2, 2)}, UnknownDataError, r"'y'.*registered names: 'x'"),
        ({"x": torch.empty(3)}, ValueError, r"masked_out\['x'\].*\(2, 2\).*\(3,\)"),
        ({"x": [[0.0, 0.0]]}, ValueError, r"masked_out\['x'\].*list"),
    ],
)
def test_bad_masked_out_is_a_clear_error_before_any_mask_changes(masked_out, error, match):
    x = torch.tensor([[1.0, -2.0], [-3.0, 4.0]])
    s = ZeroNegativeIndexing([("x", x)])
    with pytest.raises(error, match=match):
        s.step(masked_out=masked_out)
    assert torch.equal(s.get_mask("x"), torch.ones(2, 2))


@pytest.mark.parametrize("rule", [ZeroNegativeIndexing, DataNormSparsifier])
@pytest.mark.parametrize(
    "make_out,match",
    [
        (lambda data: data, r"masked_out\['x'\].*share memory"),  # in place, data expanded
        (lambda data: torch.empty(4, 1).expand(4, 8), r"masked_out\['x'\].*share memory"),
        (lambda data: torch.empty(4, 8, device="meta"), r"masked_out\['x'\].*device meta"),
    ],
)
def test_masked_out_that_cannot_be_written_is_a_clear_error_before_any_mask_changes(
    rule, make_out, match, unchanged
):
    """An ``out`` whose entries share memory (an expand(), also the expanded data itself) or
    that lives on another device: torch's RuntimeError came after the first names' masks."""
    data = torch.randn(1, 8).expand(4, 8)
    s = rule([("a", torch.randn(4, 8)), ("x", data)])
    with unchanged(s), pytest.raises(ValueError, match=match):
        s.step(masked_out={"x": make_out(data)})


def test_masked_out_naming_a_squashed_name_is_a_clear_error():
    s = ZeroNegativeIndexing([("x", torch.randn(2, 2)), ("z", torch.randn(2))])
    s.squash_mask(names=["z"])
    with pytest.raises(ValueError, match=r"'z'.*squashed"):
        s.step(masked_out={"z": torch.empty(2)})


# -- get_mask / get_data -------------------------------------------------------------------------
def test_get_mask_is_live_and_get_data_returns_original_or_masked():
    x = torch.tensor([1.0, 2.0, 3.0])
    s = Recording([("x", x)])
    s.get_mask("x")[1] = 0
    assert s.get_data("x") is x
    assert torch.equal(s.get_data("x", return_original=False), torch.tensor([1.0, 0.0, 3.0]))


def test_unknown_name_is_unknown_data_error():
    s = Recording([("x", torch.randn(2))])
    for call in (s.get_mask, s.get_data, lambda n: s.squash_mask(names=[n])):
        with pytest.raises(UnknownDataError, match=r"'y'.*registered names: 'x'"):
            call("y")


# -- squash_mask ----------------------------------------------------------------------------------
def test_squash_mask_leave_parametrized_writes_mask_into_the_users_embedding():
    emb = nn.Embedding(6, 4)
    s = DataNormSparsifier([("emb", emb)], sparsity_level=0.5, sparse_block_shape=(1, 4))
    s.step()
    masked = s.get_data("emb", return_original=False).detach().clone()
    s.squash_mask()
    assert torch.equal(emb.weight.detach(), masked)
    assert int((emb.weight == 0).all(dim=1).sum()) == 3  # half of the rows are now zero
    assert torch.equal(s.get_data("emb", return_original=False), emb.weight)
    with pytest.raises(ValueError, match="squashed"):
        s.get_data("emb", return_original=True)


def test_squash_mask_without_leaving_parametrized_leaves_user_data_untouched():
    x = torch.tensor([1.0, -2.0])
    s = ZeroNegativeIndexing([("x", x)])
    s.step()
    s.squash_mask(leave_parametrized=False)
    assert x.tolist() == [1.0, -2.0]
    assert torch.equal(s.get_data("x", return_original=False), x)  # no longer masked
    with pytest.raises(ValueError, match="squashed"):
        s.get_data("x")


def test_squash_a_subset_of_names_and_step_skips_them():
    xs = {n: torch.tensor([1.0, -1.0]) for n in "abc"}
    s = ZeroNegativeIndexing(list(xs.items()))
    s.step()
    s.squash_mask(names=["a", "c"])
    assert xs["a"].tolist() == [1.0, 0.0] == xs["c"].tolist()
    assert xs["b"].tolist() == [1.0, -1.0]
    assert s.is_squashed("a") and not s.is_squashed("b")
    s.get_mask("b").fill_(1)
    xs["b"].fill_(-5.0)
    s.step()  # only b is recomputed
    assert s.get_mask("b").tolist() == [0.0, 0.0]
    s.squash_mask("b")  # a single name works too
    assert xs["b"].tolist() == [0.0, 0.0]


def test_squash_mask_with_an_unknown_name_squashes_nothing(unchanged):
    s = ZeroNegativeIndexing([("a", torch.tensor([-1.0]))])
    s.step()
    with unchanged(s), pytest.raises(UnknownDataError):
        s.squash_mask(names=["a", "nope"])
    assert not s.is_squashed("a")


def test_squashing_data_whose_entries_share_memory_is_a_clear_error_squashing_nothing(unchanged):
    s = DataNormSparsifier()
    s.add_data("a", torch.randn(4, 8))
    s.add_data("b", torch.randn(1, 8).expand(4, 8))
    s.step()
    with unchanged(s), pytest.raises(ValueError, match=r"'b'.*share memory.*expand\(\)"):
        s.squash_mask(names=["a", "b"])
    assert not s.is_squashed("a")
    s.add_data("b", s.get_data("b").contiguous())  # the advised copy keeps the mask
    s.squash_mask(names=["a", "b"])
    assert s.is_squashed("a") and s.is_squashed("b")
    assert torch.equal(s.get_data("b", return_original=False).eq(0), s.get_mask("b").eq(0))


def test_squash_mask_with_a_positional_list_squashes_only_those_names():
    s = ZeroNegativeIndexing([("a", torch.tensor([-1.0])), ("b", torch.tensor([-1.0]))])
    s.squash_mask(["a"])
    assert s.is_squashed("a") and not s.is_squashed("b")


@pytest.mark.parametrize("names", [3, 1.5, torch.tensor(1)])
def test_squash_mask_with_names_that_are_not_names_is_a_clear_type_error(names, unchanged):
    """Was Python's bare "'int' object is not iterable"."""
    s = ZeroNegativeIndexing([("a", torch.tensor([-1.0]))])
    with unchanged(s), pytest.raises(TypeError, match=r"squash_mask.*names.*a str.*got"):
        s.squash_mask(names)


def test_re_adding_a_squashed_name_masks_it_again():
    s = ZeroNegativeIndexing([("a", torch.tensor([1.0, -1.0]))])
    s.squash_mask(leave_parametrized=False)
    y = torch.tensor([-2.0, 2.0])
    s.add_data("a", y, reuse_mask=False)
    s.step()
    assert s.get_data("a") is y
    assert s.get_data("a", return_original=False).tolist() == [0.0, 2.0]


# -- names -----------------------------------------------------------------------------------------
MODULE_ATTR_NAMES = [
    "train",
    "forward",
    "cuda",
    "state_dict",
    "parameters",
    "training",
    "_container",
    "_parameters",
    "to",
    "step",
    "state",
    "data_groups",
    "mask",
    "__init__",
    "名前 with spaces",
]


@pytest.mark.parametrize("name", MODULE_ATTR_NAMES)
def test_any_name_without_a_dot_works(name):
    x = torch.randn(4, 8)
    s = DataNormSparsifier(sparsity_level=0.5)
    s.add_data(name, x)
    s.step()
    assert int((s.get_mask(name) == 0).sum()) == 16
    restored = DataNormSparsifier()
    restored.load_state_dict(s.state_dict())
    assert torch.equal(restored.get_mask(name), s.get_mask(name))
    s.squash_mask(names=[name])
    assert int((x == 0).sum()) == 16


@pytest.mark.parametrize("name", ["train", "forward", "cuda", "state_dict", "parameters"])
def test_reference_fails_on_module_attribute_names(name):
    """Documents the fix: torch.ao stores data as attributes of an nn.Module."""
    from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier as Reference

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(KeyError, match="already exists"):
            Reference().add_data(name, torch.randn(4, 4))


@pytest.mark.parametrize("name", ["", ".", "a.b", "layer.weight"])
def test_empty_or_dotted_name_is_a_value_error(name, unchanged):
    s = ThresholdSparsifier([("ok", torch.randn(2))])
    with unchanged(s), pytest.raises(ValueError, match="without '.'"):
        s.add_data(name, torch.randn(2))


@pytest.mark.parametrize("name", [1, None, ("a",), ["a"], b"a"])
def test_non_str_name_is_a_type_error(name, unchanged):
    s = ThresholdSparsifier([("ok", torch.randn(2))])
    with unchanged(s), pytest.raises(TypeError, match="name must be a str"):
        s.add_data(name, torch.randn(2))


# -- ranks, dtypes, devices -----------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_any_rank_and_float_dtype(shape, dtype):
    x = (torch.arange(max(1, torch.Size(shape).numel())).reshape(shape) - 2.0).to(dtype)
    s = ThresholdSparsifier([("x", x)], threshold=1.5)
    s.step()
    mask = s.get_mask("x")
    assert mask.shape == x.shape and mask.dtype == dtype
    out = s.get_data("x", return_original=False)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, torch.where(x.abs() >= 1.5, x, torch.zeros_like(x)))


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64, torch.uint8])
def test_integer_data_is_masked_without_float_casting(dtype):
    big = 127 if dtype in (torch.int8, torch.uint8) else 2**31 - 1
    if dtype == torch.int64:
        big = 2**62 + 1  # not representable in float32/float64: any float cast would change it
    x = torch.tensor([big, 1, 0, 3], dtype=dtype)
    s = ThresholdSparsifier([("x", x)], threshold=2)
    s.step()
    out = s.get_data("x", return_original=False)
    assert out.dtype == dtype and s.get_mask("x").dtype == dtype
    assert out.tolist() == [big, 0, 0, 3]
    s.squash_mask()
    assert x.tolist() == [big, 0, 0, 3]


def test_bool_data_with_a_custom_rule():
    x = torch.tensor([[True, False], [True, True]])
    s = KeepTrue([("x", x)])
    assert s.get_mask("x").dtype == torch.bool
    s.get_mask("x")[1, 1] = False
    out = s.get_data("x", return_original=False)
    assert out.dtype == torch.bool and out.tolist() == [[True, False], [True, False]]
    s.step()
    assert s.get_mask("x").tolist() == [[True, False], [True, True]]


@pytest.mark.parametrize("device", DEVICES)
def test_masks_live_on_the_datas_device(device):
    x = torch.randn(4, 8, device=device)
    s = DataNormSparsifier([("x", x)], sparsity_level=0.5)
    s.step()
    assert s.get_mask("x").device == x.device
    out = s.get_data("x", return_original=False)
    assert out.device == x.device and int((out == 0).sum()) == 16
    sd = s.state_dict()
    t = DataNormSparsifier()
    t.load_state_dict(sd)
    assert t.get_mask("x").device == x.device


# -- repr -----------------------------------------------------------------------------------------
def test_repr_lists_data_groups():
    s = ThresholdSparsifier([("a", torch.randn(2))], threshold=0.3)
    s.add_data("b", torch.randn(2), threshold=0.7)
    text = repr(s)
    assert text.startswith("ThresholdSparsifier (")
    assert "name: a\n\t    threshold: 0.3" in text
    assert "name: b\n\t    threshold: 0.7" in text
    assert repr(ThresholdSparsifier()) == "ThresholdSparsifier (\n)"


def test_add_data_starts_from_the_mask_given_as_torch_ao_does():
    """``add_data(name, data, mask=m)`` was stored as a config entry and ignored: the data
    started unmasked. torch.ao starts from ``m``; so does pipesparse, attaching it."""
    from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier as RefNorm

    data = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    given = torch.zeros(4, 8)
    given[:, :4] = 1
    ref = RefNorm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.add_data("x", data.clone(), mask=given.clone())
    sparsifier = DataNormSparsifier()
    mask = given.clone()
    masked = sparsifier.add_data("x", data, mask=mask)
    assert torch.equal(masked, ref.get_data("x", return_original=False))
    assert sparsifier.get_mask("x") is mask  # attached: the rule edits the user's mask
    assert "mask" not in sparsifier.data_groups["x"]  # state, not config
    sparsifier.step()
    assert torch.equal(mask, sparsifier.get_mask("x"))
    again = torch.ones(4, 8, dtype=torch.bool)  # an existing name takes a given mask too
    sparsifier.add_data("x", data, mask=again)
    assert sparsifier.get_mask("x") is again


@pytest.mark.parametrize(
    ("mask", "error", "message"),
    [
        (torch.ones(4, 4), ValueError, r"shape \(4, 4\), the data has shape \(4, 8\)"),
        ([[1.0] * 8] * 4, TypeError, "must be a tensor, got list"),
        (torch.ones(4, 8, dtype=torch.complex64), TypeError, "dtype torch.complex64"),
    ],
)
def test_a_bad_given_mask_is_refused_before_anything_changes(mask, error, message):
    sparsifier = DataNormSparsifier()
    sparsifier.add_data("kept", torch.ones(2, 4))
    before = sparsifier.state_dict()
    with pytest.raises(error, match=message):
        sparsifier.add_data("x", torch.randn(4, 8), mask=mask)
    with pytest.raises(error, match=message):
        sparsifier.add_data("kept", torch.randn(4, 8), reuse_mask=False, mask=mask)
    assert list(sparsifier.data_groups) == ["kept"]
    after = sparsifier.state_dict()
    assert after["data_groups"] == before["data_groups"]
    assert torch.equal(after["state"]["kept"]["mask"], before["state"]["kept"]["mask"])


def _inference_ones(*shape):
    with torch.inference_mode():
        return torch.ones(*shape)


@pytest.mark.parametrize(
    "make",
    [lambda: torch.ones(1, 8).expand(4, 8), lambda: _inference_ones(4, 8)],
    ids=["expand", "inference"],
)
def test_a_given_mask_torch_cannot_write_in_place_is_refused_before_anything_changes(make):
    """A given mask whose entries share memory (an expand()) or an inference tensor was
    attached; step() then failed with torch's RuntimeError, and so did a load that overwrote
    it in place, after loading the names before it. Refused now, as the other bad masks."""
    sparsifier = ThresholdSparsifier(threshold=0.5)
    sparsifier.add_data("kept", torch.ones(2, 4))
    before = sparsifier.state_dict()
    with pytest.raises(ValueError, match=r"mask for 'x' cannot be written in place"):
        sparsifier.add_data("x", torch.randn(4, 8), mask=make())
    assert list(sparsifier.data_groups) == ["kept"]
    after = sparsifier.state_dict()
    assert after["data_groups"] == before["data_groups"]
    assert torch.equal(after["state"]["kept"]["mask"], before["state"]["kept"]["mask"])
    sparsifier.add_data("x", torch.randn(4, 8), mask=make().clone())  # the way out it names
    sparsifier.step()


def test_a_mask_reused_for_data_of_another_dtype_keeps_its_dtype_as_the_readme_says():
    s = ThresholdSparsifier(threshold=0.5)
    s.add_data("x", torch.tensor([0.25, 1.0, -2.0]))
    mask = s.get_mask("x")
    assert mask.dtype == torch.float32  # a fresh mask: the data's dtype
    s.add_data("x", torch.tensor([0.25, 1.0, -2.0], dtype=torch.float16))
    s.step()
    assert s.get_mask("x") is mask and mask.dtype == torch.float32
    masked = s.get_data("x", return_original=False)
    assert masked.dtype == torch.float16 and masked.tolist() == [0.0, 1.0, -2.0]


@pytest.mark.parametrize(
    ("sparsifier", "typo"),
    [
        (DataNormSparsifier(), {"sparsity": 0.9}),
        (ThresholdSparsifier(), {"treshold": 0.5}),
        (NMSparsifier(), {"N": 1}),
    ],
)
def test_a_config_key_the_rule_does_not_read_is_refused(sparsifier, typo):
    """``add_data(name, data, sparsity=0.9)`` was kept in data_groups and ignored: the name was
    masked at the default level, silently."""
    sparsifier.add_data("kept", torch.ones(2, 4))
    (key,) = typo
    with pytest.raises(ValueError, match=rf"no config key '{key}' \(for 'x'\); its keys: "):
        sparsifier.add_data("x", torch.randn(4, 8), **typo)
    with pytest.raises(ValueError, match=f"no config key '{key}'"):
        sparsifier.add_data("kept", torch.ones(2, 4), **typo)
    assert list(sparsifier.data_groups) == ["kept"]
    assert key not in sparsifier.data_groups["kept"]
