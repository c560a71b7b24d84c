"""Lightning callbacks: post-training and training-aware sparsity of a copy of the model."""

from __future__ import annotations

import copy
import importlib
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from pipesparse import (  # noqa: E402
    BaseDataScheduler,
    CorruptStateError,
    DataNormSparsifier,
    LinearSparsityScheduler,
    NMSparsifier,
)
from pipesparse.lightning import PostTrainingDataSparsity, TrainingAwareDataSparsity  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec"),
    pytest.mark.filterwarnings("ignore:Replacing existing data"),  # the reference's, per epoch
]
SPARSIFIER_ARGS = {"sparsity_level": 0.5, "sparse_block_shape": (1, 4), "zeros_per_block": 4}


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader():
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 8, generator=gen), torch.randn(32, 4, generator=gen))
    return DataLoader(data, batch_size=8)


def _trainer(max_epochs=2, callbacks=(), **kwargs):
    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        **kwargs,
    )


class Snapshot(pl.Callback):
    """The model's weights when training ends (before any on_fit_end callback runs)."""

    def on_train_end(self, trainer, pl_module):
        self.state = copy.deepcopy(pl_module.model.state_dict())


def _assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_post_training_sparsifies_a_copy_and_never_the_model():
    module, snapshot = Tiny(), Snapshot()
    callback = PostTrainingDataSparsity(DataNormSparsifier, SPARSIFIER_ARGS)
    _trainer(callbacks=[snapshot, callback]).fit(module, _loader())

    _assert_state_equal(snapshot.state, module.model.state_dict())  # never mutated
    assert (module.model[0].weight != 0).all()
    assert callback.sparsified is not module.model and not callback.sparsified.training
    for key, value in callback.data_sparsifier.defaults.items():
        assert value == SPARSIFIER_ARGS[key]
    names = {name.replace(".", "_") for name, _ in module.model.named_parameters()}
    assert set(callback.data_sparsifier.data_groups) == names == set(callback.sparsity_levels)
    for name, original in module.model.named_parameters():
        pruned = callback.sparsified.get_parameter(name)
        kept = pruned != 0
        assert torch.equal(pruned[kept], original[kept])
        if original.numel() >= 8:  # a (4,) bias is one block: round(0.5 * 1) = 0 pruned
            assert callback.sparsity_levels[name.replace(".", "_")] == pytest.approx(0.5)
            assert (~kept).float().mean() == pytest.approx(0.5)


def test_post_training_hook_alone_leaves_weights_equal():
    module = Tiny()
    before = copy.deepcopy(module.model.state_dict())
    callback = PostTrainingDataSparsity(NMSparsifier, {"n": 2, "m": 4})
    callback.on_fit_end(None, module)
    _assert_state_equal(before, module.model.state_dict())
    weight = callback.sparsified[0].weight
    assert ((weight != 0).reshape(-1, 4).sum(dim=1) == 2).all()


def test_parameter_filter_selects_what_is_sparsified():
    callback = PostTrainingDataSparsity(
        DataNormSparsifier, SPARSIFIER_ARGS, parameters=lambda name, p: p.dim() == 2
    )
    callback.on_fit_end(None, Tiny())
    assert set(callback.data_sparsifier.data_groups) == {"0_weight", "2_weight"}
    assert (callback.sparsified[0].bias != 0).all()


def test_training_aware_follows_the_schedule_and_keeps_the_model():
    module, snapshot = Tiny(), Snapshot()
    callback = TrainingAwareDataSparsity(
        DataNormSparsifier,
        SPARSIFIER_ARGS,
        LinearSparsityScheduler,
        {"init_level": 0.25, "final_level": 0.75, "total_steps": 2},
    )
    _trainer(max_epochs=2, callbacks=[snapshot, callback]).fit(module, _loader())

    _assert_state_equal(snapshot.state, module.model.state_dict())
    assert (module.model[0].weight != 0).all()
    # epoch 0 masked at 0.25, epoch 1 at 0.5; the scheduler then moved on to 0.75
    assert callback.data_scheduler.last_epoch == 2
    assert set(callback.data_scheduler.get_last_param().values()) == {0.75}
    assert callback.sparsity_levels["0_weight"] == pytest.approx(0.5)
    assert (callback.sparsified[0].weight == 0).float().mean() == pytest.approx(0.5)  # squashed
    assert callback.data_sparsifier.is_squashed("0_weight")


def test_training_aware_resumes_the_schedule_from_a_checkpoint(tmp_path):
    def callback():
        return TrainingAwareDataSparsity(
            DataNormSparsifier,
            SPARSIFIER_ARGS,
            LinearSparsityScheduler,
            {"init_level": 0.0, "final_level": 0.75, "total_steps": 3},
        )

    straight = callback()
    _trainer(max_epochs=3, callbacks=[straight]).fit(Tiny(), _loader())

    first = callback()
    trainer = _trainer(max_epochs=2, callbacks=[first], default_root_dir=tmp_path)
    trainer.fit(Tiny(), _loader())
    path = tmp_path / "two_epochs.ckpt"
    trainer.save_checkpoint(path)
    resumed = callback()
    _trainer(max_epochs=3, callbacks=[resumed], default_root_dir=tmp_path).fit(
        Tiny(), _loader(), ckpt_path=path
    )
    assert resumed.data_scheduler.last_epoch == straight.data_scheduler.last_epoch == 3
    assert resumed.sparsity_levels == pytest.approx(straight.sparsity_levels)
    assert resumed.sparsity_levels["0_weight"] == pytest.approx(0.5)


def test_two_named_training_aware_callbacks_resume_each_its_own_schedule(tmp_path):
    def callbacks():
        return [
            TrainingAwareDataSparsity(
                DataNormSparsifier,
                SPARSIFIER_ARGS,
                LinearSparsityScheduler,
                {"init_level": 0.0, "final_level": final, "total_steps": 3},
                parameters=lambda name, p, layer=layer: name.startswith(layer),
                name=layer,
            )
            for layer, final in (("0.", 0.75), ("2.", 0.375))
        ]

    first = callbacks()
    trainer = _trainer(max_epochs=2, callbacks=first, default_root_dir=tmp_path)
    trainer.fit(Tiny(), _loader())
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    resumed = callbacks()
    _trainer(max_epochs=3, callbacks=resumed, default_root_dir=tmp_path).fit(
        Tiny(), _loader(), ckpt_path=tmp_path / "two.ckpt"
    )
    assert set(resumed[0].data_sparsifier.data_groups) == {"0_weight", "0_bias"}
    assert set(resumed[1].data_sparsifier.data_groups) == {"2_weight", "2_bias"}
    assert resumed[0].sparsity_levels["0_weight"] == pytest.approx(0.5)  # 2/3 of 0.75
    assert resumed[1].sparsity_levels["2_weight"] == pytest.approx(0.25)  # 2/3 of 0.375
    with pytest.raises(RuntimeError, match="state_key"):  # unnamed: Lightning refuses the pair
        _trainer(callbacks=[TrainingAwareDataSparsity(*cb_args()) for _ in range(2)])


def cb_args():
    return (DataNormSparsifier, SPARSIFIER_ARGS, LinearSparsityScheduler, {"total_steps": 2})


@pytest.mark.parametrize(
    "state",
    [
        [1],
        {"data_sparsifier": {}},
        {"data_sparsifier": {}, "data_scheduler": None},
        {"data_sparsifier": {}, "data_scheduler": {}, "extra": 1},
    ],
)
def test_training_aware_refuses_a_corrupt_checkpoint_state(state):
    callback = TrainingAwareDataSparsity(*cb_args())
    with pytest.raises(CorruptStateError, match="TrainingAwareDataSparsity"):
        callback.load_state_dict(state)
    callback.on_train_start(None, Tiny())  # nothing was kept: a fresh start
    assert callback.data_scheduler.last_epoch == 0


def test_parameters_whose_names_collide_are_all_sparsified():
    model = nn.Module()
    model.a = nn.ModuleDict({"b_c": nn.Linear(8, 8, bias=False)})
    model.a_b = nn.ModuleDict({"c": nn.Linear(8, 8, bias=False)})
    callback = PostTrainingDataSparsity(DataNormSparsifier, SPARSIFIER_ARGS)
    callback.on_fit_end(None, SimpleNamespace(model=model))
    assert set(callback.data_sparsifier.data_groups) == {"a_b_c_weight", "a_b_c_weight_1"}
    for _, weight in callback.sparsified.named_parameters():
        assert (weight == 0).float().mean() == pytest.approx(0.5)


class StepLevel(BaseDataScheduler):
    """The reference test's StepSLScheduler shape: multiply the level by gamma every step."""

    def __init__(self, data_sparsifier, schedule_param="sparsity_level", gamma=1.2):
        self.gamma = gamma
        super().__init__(data_sparsifier, schedule_param)

    def get_schedule_param(self):
        groups = self.data_sparsifier.data_groups
        factor = 1 if self.last_epoch == 0 else self.gamma
        return {name: config[self.schedule_param] * factor for name, config in groups.items()}


def test_training_aware_hooks_match_the_reference_callback():
    """Drive both callbacks' hooks by hand, as torch's own test does, and compare the masks."""
    pytest.importorskip("pytorch_lightning")
    from torch.ao.pruning._experimental.data_scheduler import BaseDataScheduler as RefScheduler
    from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier as RefNorm
    from torch.ao.pruning._experimental.data_sparsifier.lightning.callbacks.data_sparsity import (
        TrainingAwareDataSparsity as RefCallback,
    )

    class RefStepLevel(RefScheduler):
        def __init__(self, data_sparsifier, schedule_param="sparsity_level", gamma=1.2):
            self.gamma = gamma
            super().__init__(data_sparsifier, schedule_param)

        get_schedule_param = StepLevel.get_schedule_param

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32, bias=False), nn.ReLU(), nn.Linear(32, 8, bias=False))
    pl_module = SimpleNamespace(model=model)
    ours = TrainingAwareDataSparsity(DataNormSparsifier, SPARSIFIER_ARGS, StepLevel, {})
    ref = RefCallback(RefNorm, dict(SPARSIFIER_ARGS), RefStepLevel, {})
    for callback in (ours, ref):
        callback.on_train_start(42, pl_module)
    for _ in range(3):
        for callback in (ours, ref):
            callback.on_train_epoch_start(42, pl_module)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param))
        for callback in (ours, ref):
            callback.on_train_epoch_end(42, pl_module)
        assert ours.data_scheduler.get_last_param() == pytest.approx(
            ref.data_scheduler.get_last_param()
        )
        for name in ref.data_sparsifier.data_groups:
            assert torch.equal(
                ours.data_sparsifier.get_mask(name).bool(),
                ref.data_sparsifier.get_mask(name).bool(),
            ), name


def test_bad_arguments():
    with pytest.raises(TypeError, match="data_sparsifier_class"):
        PostTrainingDataSparsity(DataNormSparsifier(), {})
    with pytest.raises(TypeError, match="data_scheduler_class"):
        TrainingAwareDataSparsity(DataNormSparsifier, {}, object, {})
    with pytest.raises(TypeError, match="name must be a str"):
        TrainingAwareDataSparsity(*cb_args(), name=1)
    callback = PostTrainingDataSparsity(DataNormSparsifier, {})
    with pytest.raises(ValueError, match="pl_module.model"):
        callback.on_fit_end(None, SimpleNamespace(net=nn.Linear(4, 4)))


def test_import_without_lightning_says_which_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.delitem(sys.modules, "pipesparse.lightning")
    with pytest.raises(ImportError, match=r"pip install 'pipesparse\[lightning\]'"):
        importlib.import_module("pipesparse.lightning")


def test_a_second_fit_with_the_same_callback_starts_the_schedule_afresh():
    """A second ``fit`` rebuilds the scheduler from its first level; its first epoch must not
    be masked at the level the first fit's scheduler had reached."""
    levels = []

    class Recording(TrainingAwareDataSparsity):
        def on_train_epoch_end(self, trainer, pl_module):
            levels.append(self.data_sparsifier.data_groups["0_weight"]["sparsity_level"])
            super().on_train_epoch_end(trainer, pl_module)

    callback = Recording(
        DataNormSparsifier,
        SPARSIFIER_ARGS,
        LinearSparsityScheduler,
        {"init_level": 0.0, "final_level": 0.75, "total_steps": 3},
    )
    _trainer(max_epochs=2, callbacks=[callback]).fit(Tiny(), _loader())
    _trainer(max_epochs=2, callbacks=[callback]).fit(Tiny(), _loader())
    assert levels == [0.0, 0.25, 0.0, 0.25]


def test_a_checkpoint_loaded_to_validate_does_not_resume_a_later_fit(tmp_path):
    """validate(ckpt_path=...) hands the callback the checkpoint's state too; a later fit
    without a checkpoint must start the schedule afresh, not from that state."""
    levels = []

    class Recording(TrainingAwareDataSparsity):
        def on_train_epoch_end(self, trainer, pl_module):
            levels.append(self.data_sparsifier.data_groups["0_weight"]["sparsity_level"])
            super().on_train_epoch_end(trainer, pl_module)

    class Validated(Tiny):
        def validation_step(self, batch, batch_idx):
            return None

    def callback():
        return Recording(
            DataNormSparsifier,
            SPARSIFIER_ARGS,
            LinearSparsityScheduler,
            {"init_level": 0.0, "final_level": 0.75, "total_steps": 3},
        )

    trainer = _trainer(max_epochs=3, callbacks=[callback()])
    trainer.fit(Validated(), _loader())
    trainer.save_checkpoint(tmp_path / "done.ckpt")
    fresh = callback()
    _trainer(callbacks=[fresh]).validate(Validated(), _loader(), ckpt_path=tmp_path / "done.ckpt")
    levels.clear()
    _trainer(max_epochs=2, callbacks=[fresh]).fit(Validated(), _loader())
    assert levels == [0.0, 0.25]
