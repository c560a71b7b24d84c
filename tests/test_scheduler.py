"""BaseDataScheduler (torch.ao parity) and the linear / cubic sparsity ramps."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.ao.pruning._experimental.data_scheduler import BaseDataScheduler as RefScheduler
from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier as RefNorm
from torch.utils.data import DataLoader, TensorDataset

from pipesparse import (
    BaseDataScheduler,
    CorruptStateError,
    CubicSparsityScheduler,
    DataNormSparsifier,
    LinearSparsityScheduler,
    NMSparsifier,
    UnknownDataError,
)
from pipesparse.transforms import SparsifyCollate, SparsifyTransform

DEFAULTS = {"sparsity_level": 0.7, "sparse_block_shape": (1, 4), "zeros_per_block": 2}


def _halving(self):
    """The reference test's schedule: halve sparsity_level on every step after the first."""
    if self.last_epoch > 0:
        return {
            name: config["sparsity_level"] * 0.5
            for name, config in self.data_sparsifier.data_groups.items()
        }
    return self.base_param


class Halving(BaseDataScheduler):
    get_schedule_param = _halving


class RefHalving(RefScheduler):
    get_schedule_param = _halving


def _data(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [
        ("tensor1", torch.randn(5, 5, generator=gen)),
        ("param1", nn.Parameter(torch.randn(10, 10, generator=gen))),
        ("emb1", torch.randn(50, 8, generator=gen)),
    ]


def _sparsifier(cls=DataNormSparsifier, seed: int = 0):
    sparsifier = cls(_data(seed), **DEFAULTS)
    tensor2 = torch.randn(4, 4, generator=torch.Generator().manual_seed(seed + 1))
    sparsifier.add_data("tensor2", tensor2, sparsity_level=0.3)
    return sparsifier


def test_constructor_makes_the_initial_step():
    sparsifier = _sparsifier()
    scheduler = Halving(sparsifier, "sparsity_level")
    assert scheduler.data_sparsifier is sparsifier
    assert scheduler._step_count == 1
    assert scheduler.last_epoch == 0
    assert scheduler.base_param == {"tensor1": 0.7, "param1": 0.7, "emb1": 0.7, "tensor2": 0.3}
    assert scheduler.get_last_param() == scheduler.base_param


def test_scheduler_step_before_sparsifier_step_warns():
    sparsifier = _sparsifier()
    scheduler = Halving(sparsifier, "sparsity_level")
    with pytest.warns(UserWarning, match="before `data_sparsifier.step\\(\\)`"):
        scheduler.step()


def test_right_order_does_not_warn_even_if_sparsifier_stepped_before():
    sparsifier = _sparsifier()
    sparsifier.step()
    scheduler = Halving(sparsifier, "sparsity_level")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsifier.step()
        scheduler.step()
        sparsifier.step()
        scheduler.step()


def test_step_updates_config_and_counts():
    sparsifier = _sparsifier()
    scheduler = Halving(sparsifier, "sparsity_level")
    sparsifier.step()
    scheduler.step()
    assert {n: c["sparsity_level"] for n, c in sparsifier.data_groups.items()} == {
        "tensor1": 0.35,
        "param1": 0.35,
        "emb1": 0.35,
        "tensor2": 0.15,
    }
    for _ in range(5):
        sparsifier.step()
        scheduler.step()
    assert scheduler._step_count == 7  # 5 + the step above + the constructor's
    assert scheduler.last_epoch == 6


def test_differential_against_torch_ao():
    """Same schedule on both sides: same parameter sequence, same masks, same counters."""
    ours, ref = _sparsifier(), _sparsifier(RefNorm)
    sched, ref_sched = Halving(ours, "sparsity_level"), RefHalving(ref, "sparsity_level")
    for _ in range(4):
        ours.step()
        ref.step()
        for name in ours.data_groups:
            assert torch.equal(ours.get_mask(name).bool(), ref.get_mask(name).bool()), name
        sched.step()
        ref_sched.step()
        assert sched.get_last_param() == ref_sched.get_last_param()
        assert sched.last_epoch == ref_sched.last_epoch
        assert sched._step_count == ref_sched._step_count
    assert sched.base_param == ref_sched.base_param


def test_base_get_schedule_param_is_not_implemented():
    with pytest.raises(NotImplementedError, match="get_schedule_param"):
        BaseDataScheduler(_sparsifier(), "sparsity_level")

    class CallsSuper(BaseDataScheduler):
        def get_schedule_param(self):
            return super().get_schedule_param()

    with pytest.raises(NotImplementedError, match="CallsSuper"):
        CallsSuper(_sparsifier(), "sparsity_level")


@pytest.mark.parametrize("bad", [object(), RefNorm(), None])
def test_type_error_when_not_a_pipesparse_sparsifier(bad):
    with pytest.raises(TypeError, match="BaseDataSparsifier"):
        Halving(bad, "sparsity_level")


def test_bad_scheduled_value_changes_nothing():
    sparsifier = _sparsifier()

    class Broken(BaseDataScheduler):
        def get_schedule_param(self):
            if self.last_epoch == 0:
                return dict(self.base_param)
            return {"tensor1": 0.1, "param1": "a lot"}

    scheduler = Broken(sparsifier, "sparsity_level")
    before = {n: dict(c) for n, c in sparsifier.data_groups.items()}
    sparsifier.step()
    with pytest.raises(ValueError, match="sparsity_level='a lot' for 'param1'"):
        scheduler.step()
    assert sparsifier.data_groups == before
    assert (scheduler.last_epoch, scheduler._step_count) == (0, 1)


def test_scheduled_value_the_data_cannot_take_changes_nothing():
    """A value the config check accepts but the name's data does not (m=16 for 8 features)
    is refused by the scheduler step, not left for every later sparsifier.step() to refuse."""

    class Widening(BaseDataScheduler):
        def get_schedule_param(self):
            return dict.fromkeys(self.data_sparsifier.data_groups, 4 * 2**self.last_epoch)

    sparsifier = NMSparsifier(n=2, m=4)
    sparsifier.add_data("x", torch.randn(4, 8))
    scheduler = Widening(sparsifier, "m")
    sparsifier.step()
    scheduler.step()  # m=8 fits 8 features
    assert sparsifier.data_groups["x"]["m"] == 8
    with pytest.raises(ValueError, match="m=16 for 'x'"):
        scheduler.step()
    assert sparsifier.data_groups["x"]["m"] == 8
    assert (scheduler.last_epoch, scheduler._step_count) == (1, 2)
    sparsifier.step()  # still usable


def test_unknown_name_from_schedule():
    class Unknown(BaseDataScheduler):
        def get_schedule_param(self):
            return {"nope": 0.5}

    with pytest.raises(UnknownDataError, match="nope"):
        Unknown(_sparsifier(), "sparsity_level")


def test_state_dict_round_trip_like_the_reference():
    sparsifier = _sparsifier()
    scheduler1 = Halving(sparsifier, "sparsity_level")
    sparsifier.step()
    scheduler1.step()
    scheduler2 = Halving(sparsifier, "sparsity_level")
    for name in sparsifier.data_groups:
        assert scheduler1.base_param[name] != scheduler2.base_param[name]
        assert scheduler1.get_last_param()[name] == scheduler2.base_param[name]
    state = scheduler1.state_dict()
    assert "data_sparsifier" not in state
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    scheduler2.load_state_dict(torch.load(buffer, weights_only=True))
    assert scheduler2.base_param == scheduler1.base_param
    assert scheduler2.get_last_param() == scheduler1.get_last_param()
    assert scheduler2.last_epoch == scheduler1.last_epoch


def test_numpy_scheduled_values_keep_the_state_weights_only_loadable():
    """A schedule computed with numpy (np.cos) returns numpy scalars; the state must still
    load with weights_only=True (as Lightning checkpoints are loaded) and hold plain floats."""
    np = pytest.importorskip("numpy")

    class Cosine(BaseDataScheduler):
        def get_schedule_param(self):
            level = 0.5 * (1 - np.cos(np.pi * min(self.last_epoch, 4) / 4))
            return dict.fromkeys(self.data_sparsifier.data_groups, level)

    sparsifier = _sparsifier()
    sparsifier.data_groups["tensor2"]["sparsity_level"] = np.float64(0.3)  # a user's edit
    scheduler = Cosine(sparsifier, "sparsity_level")
    sparsifier.step()
    scheduler.step()
    assert type(sparsifier.data_groups["tensor1"]["sparsity_level"]) is float
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["_last_param"] == scheduler.get_last_param()
    assert state["base_param"]["tensor2"] == 0.3
    Cosine(_sparsifier(), "sparsity_level").load_state_dict(state)


def test_resumed_ramp_continues_the_same_sequence():
    def run(steps, resume_at=None):
        sparsifier = DataNormSparsifier([("x", torch.randn(4, 8))])
        scheduler = CubicSparsityScheduler(sparsifier, 0.0, 0.9, total_steps=6)
        values = []
        for step in range(steps):
            if step == resume_at:
                state = scheduler.state_dict()
                scheduler = CubicSparsityScheduler(sparsifier, 0.0, 0.9, total_steps=6)
                scheduler.load_state_dict(state)
            sparsifier.step()
            scheduler.step()
            values.append(scheduler.get_last_param()["x"])
        return values

    assert run(8, resume_at=3) == run(8)


@pytest.mark.parametrize(
    "state",
    [[1, 2], {"last_epoch": 3}, {**dict.fromkeys(("last_epoch", "_step_count")), "bogus": 1}],
)
def test_load_corrupt_state_raises(state):
    scheduler = Halving(_sparsifier(), "sparsity_level")
    before = scheduler.state_dict()
    with pytest.raises(CorruptStateError):
        scheduler.load_state_dict(state)
    assert scheduler.state_dict() == before


@pytest.mark.parametrize(
    "change",
    [
        {"last_epoch": "x"},
        {"last_epoch": True},
        {"last_epoch": -2},
        {"_step_count": 1.5},
        {"_last_param": None},
        {"base_param": [0.5]},
        {"schedule_param": 3},
        {"total_steps": 0},
        {"total_steps": 2.0},
        {"init_level": float("nan")},
        {"final_level": "0.5"},
        {"schedule_param": "sparse_block_shape"},  # a value the rule rejects
        {"schedule_param": "threshold"},  # another rule's key: the ramp would stop silently
    ],
)
def test_load_state_with_wrong_values_raises_and_changes_nothing(change):
    sparsifier = DataNormSparsifier([("x", torch.randn(4, 8))])
    scheduler = LinearSparsityScheduler(sparsifier, 0.0, 0.8, total_steps=4)
    sparsifier.step()
    scheduler.step()
    before, defaults = scheduler.state_dict(), dict(sparsifier.defaults)
    with pytest.raises(CorruptStateError):
        scheduler.load_state_dict({**before, **change})
    assert scheduler.state_dict() == before
    assert sparsifier.defaults == defaults
    sparsifier.step()
    scheduler.step()  # still usable
    assert scheduler.get_last_param()["x"] == pytest.approx(0.4)


def test_unknown_schedule_param_raises():
    sparsifier = DataNormSparsifier([("x", torch.randn(4, 8))])
    with pytest.raises(ValueError, match="'sparsity_levl' is not a config key.*sparsity_level"):
        LinearSparsityScheduler(sparsifier, 0.0, 0.8, total_steps=2, schedule_param="sparsity_levl")
    assert sparsifier.data_groups["x"] == {
        "sparsity_level": 0.5,
        "sparse_block_shape": (1, 4),
        "zeros_per_block": None,
    }


def test_load_of_a_state_for_another_config_key_raises_and_changes_nothing():
    """What the constructor refuses, a load refuses too (a custom schedule has no ramp check)."""
    sparsifier = _sparsifier()
    scheduler = Halving(sparsifier, "sparsity_level")
    before, groups = scheduler.state_dict(), sparsifier.state_dict()["data_groups"]
    with pytest.raises(CorruptStateError, match="'threshold' is not a config key"):
        scheduler.load_state_dict({**before, "schedule_param": "threshold"})
    assert scheduler.state_dict() == before
    sparsifier.step()
    scheduler.step()
    assert sparsifier.state_dict()["data_groups"] == {
        name: {**config, "sparsity_level": config["sparsity_level"] * 0.5}
        for name, config in groups.items()
    }


def test_verbose_prints_each_change(capsys):
    sparsifier = DataNormSparsifier([("x", torch.randn(4, 8))])
    LinearSparsityScheduler(sparsifier, 0.2, 0.8, total_steps=3, verbose=True)
    assert "Adjusting sparsity_level for group x to 0.2" in capsys.readouterr().out


def _levels(cls, init, final, total, steps):
    sparsifier = DataNormSparsifier([("x", torch.randn(4, 8))])
    scheduler = cls(sparsifier, init, final, total_steps=total)
    levels = [sparsifier.data_groups["x"]["sparsity_level"]]
    for _ in range(steps):
        sparsifier.step()
        scheduler.step()
        levels.append(sparsifier.data_groups["x"]["sparsity_level"])
    return levels


def test_linear_ramp_values():
    assert _levels(LinearSparsityScheduler, 0.0, 0.8, 4, 6) == pytest.approx(
        [0.0, 0.2, 0.4, 0.6, 0.8, 0.8, 0.8]
    )


def test_cubic_ramp_is_zhu_gupta():
    s_i, s_f, total = 0.1, 0.9, 5
    expected = [s_f + (s_i - s_f) * (1 - min(t, total) / total) ** 3 for t in range(8)]
    assert _levels(CubicSparsityScheduler, s_i, s_f, total, 7) == pytest.approx(expected)


@given(
    init=st.floats(0, 1),
    final=st.floats(0, 1),
    total=st.integers(1, 12),
    cubic=st.booleans(),
)
def test_ramps_are_monotone_and_end_at_final(init, final, total, cubic):
    cls = CubicSparsityScheduler if cubic else LinearSparsityScheduler
    levels = _levels(cls, init, final, total, total + 1)
    assert levels[0] == pytest.approx(init)
    assert levels[-1] == pytest.approx(final) and levels[-2] == pytest.approx(final)
    diffs = [b - a for a, b in zip(levels, levels[1:], strict=False)]
    sign = 1 if final >= init else -1
    assert all(sign * d >= -1e-12 for d in diffs)


def test_cubic_prunes_faster_early_than_linear():
    linear = _levels(LinearSparsityScheduler, 0.0, 0.9, 10, 10)
    cubic = _levels(CubicSparsityScheduler, 0.0, 0.9, 10, 10)
    assert all(c > lin for c, lin in zip(cubic[1:-1], linear[1:-1], strict=True))


@pytest.mark.parametrize(
    "kwargs",
    [{"total_steps": 0}, {"total_steps": 2.5}, {"init_level": float("nan")}, {"final_level": "1"}],
)
def test_ramp_bad_arguments(kwargs):
    sparsifier = DataNormSparsifier([("x", torch.randn(4, 8))])
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        LinearSparsityScheduler(sparsifier, **kwargs)


def test_ramp_takes_numpy_numbers():
    """np.float32 levels and an np.int64 step count (len() of an array, np.ceil(...).astype)
    are numbers; they were refused as "must be a finite number" / "a positive int"."""
    np = pytest.importorskip("numpy")
    sparsifier = DataNormSparsifier([("x", torch.randn(4, 8))])
    scheduler = LinearSparsityScheduler(
        sparsifier, np.float32(0.25), np.float32(0.75), total_steps=np.int64(2)
    )
    assert (scheduler.init_level, scheduler.final_level, scheduler.total_steps) == (0.25, 0.75, 2)
    assert type(scheduler.total_steps) is int and type(scheduler.final_level) is float
    sparsifier.step()
    scheduler.step()
    assert sparsifier.data_groups["x"]["sparsity_level"] == 0.5


@pytest.mark.parametrize("last_epoch", [2.5, -5, "3", None, True])
def test_bad_last_epoch_is_refused_before_anything_changes(last_epoch):
    """2.5 and -5 were taken and gave a state_dict that load_state_dict refuses (a Lightning
    run could not resume); "3" and None raised an operator TypeError from inside step()."""
    sparsifier = DataNormSparsifier([("x", torch.randn(4, 8))], sparsity_level=0.1)
    with pytest.raises(ValueError, match="last_epoch"):
        LinearSparsityScheduler(sparsifier, 0.0, 0.5, total_steps=4, last_epoch=last_epoch)
    with pytest.raises(ValueError, match="last_epoch"):
        Halving(sparsifier, "sparsity_level", last_epoch=last_epoch)
    assert sparsifier.data_groups["x"]["sparsity_level"] == 0.1


def test_a_resumed_scheduler_state_loads_back():
    sparsifier = DataNormSparsifier([("x", torch.randn(4, 8))])
    scheduler = LinearSparsityScheduler(sparsifier, 0.0, 0.5, total_steps=4, last_epoch=2)
    LinearSparsityScheduler(sparsifier, 0.0, 0.5, total_steps=4).load_state_dict(
        scheduler.state_dict()
    )


def test_a_state_saved_with_verbose_1_loads_back(capsys):
    sparsifier = DataNormSparsifier([("x", torch.randn(4, 8))])
    scheduler = LinearSparsityScheduler(sparsifier, 0.0, 0.5, total_steps=4, verbose=1)
    assert "Adjusting sparsity_level" in capsys.readouterr().out
    resumed = LinearSparsityScheduler(sparsifier, 0.0, 0.5, total_steps=4)
    resumed.load_state_dict(scheduler.state_dict())
    assert resumed.verbose is True


def test_ramp_drives_mask_sparsity():
    """The scheduled level reaches the masks: measured sparsity follows the ramp."""
    data = torch.randn(8, 64)
    sparsifier = DataNormSparsifier([("x", data)], sparse_block_shape=(1, 4))
    scheduler = LinearSparsityScheduler(sparsifier, 0.0, 0.75, total_steps=3)
    measured = []
    for _ in range(4):
        sparsifier.step()
        scheduler.step()
        measured.append(1 - sparsifier.get_mask("x").float().mean().item())
    assert measured == pytest.approx([0.0, 0.25, 0.5, 0.75])


def test_ramp_sets_the_level_of_data_registered_later():
    sparsifier = DataNormSparsifier(sparsity_level=0.9)
    scheduler = LinearSparsityScheduler(sparsifier, 0.1, 0.5, total_steps=4)
    assert sparsifier.defaults["sparsity_level"] == pytest.approx(0.1)
    sparsifier.step()
    scheduler.step()
    sparsifier.add_data("late", torch.randn(2, 8))
    assert sparsifier.data_groups["late"]["sparsity_level"] == pytest.approx(0.2)


def test_resumed_ramp_sets_the_level_of_data_registered_later():
    def run():
        sparsifier = DataNormSparsifier()
        scheduler = LinearSparsityScheduler(sparsifier, 0.0, 0.8, total_steps=4)
        for _ in range(3):
            sparsifier.step()
            scheduler.step()
        return sparsifier, scheduler

    sparsifier, scheduler = run()
    resumed = DataNormSparsifier()
    resumed.load_state_dict(sparsifier.state_dict())
    LinearSparsityScheduler(resumed, 0.0, 0.8, total_steps=4).load_state_dict(
        scheduler.state_dict()
    )
    sparsifier.add_data("late", torch.randn(2, 8))
    resumed.add_data("late", torch.randn(2, 8))
    assert resumed.data_groups["late"]["sparsity_level"] == pytest.approx(0.6)
    assert sparsifier.data_groups["late"]["sparsity_level"] == pytest.approx(0.6)


def test_ramp_of_a_param_the_rule_rejects_changes_nothing():
    sparsifier = NMSparsifier()
    with pytest.raises(ValueError, match="n=0.0"):
        LinearSparsityScheduler(sparsifier, 0, 2, total_steps=2, schedule_param="n")
    assert sparsifier.defaults == {"n": 2, "m": 4}


def test_pipeline_sparsity_ramps_over_an_epoch():
    """A scheduler stepped after every batch ramps the sparsity of the emitted batches."""
    sparsifier = DataNormSparsifier(sparse_block_shape=(1, 4))
    transform = SparsifyTransform(sparsifier, update="every_batch")
    scheduler = LinearSparsityScheduler(sparsifier, 0.0, 0.75, total_steps=3)
    data = torch.randn(40, 16, generator=torch.Generator().manual_seed(0)) + 5  # no zeros
    loader = DataLoader(TensorDataset(data), batch_size=8, collate_fn=SparsifyCollate(transform))
    measured = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the transform steps the sparsifier first: no warning
        for (batch,) in loader:
            measured.append((batch == 0).float().mean().item())
            scheduler.step()
    assert measured == pytest.approx([0.0, 0.25, 0.5, 0.75, 0.75])
