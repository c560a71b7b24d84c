"""Lightning callbacks that sparsify a copy of ``pl_module.model`` (torch.ao's two recipes).

``PostTrainingDataSparsity`` sparsifies a copy once training ends; ``TrainingAwareDataSparsity``
re-sparsifies a fresh copy after every training epoch while a scheduler moves the sparsity
level. The model being trained is never modified: the sparsified copy is ``callback.sparsified``.
Unlike the reference, the training-aware callback saves its sparsifier and scheduler state in
Lightning checkpoints, so a resumed run continues the schedule where it stopped.
Needs the ``lightning`` extra: ``pip install 'pipesparse[lightning]'``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

try:
    import lightning.pytorch as pl
    from lightning.pytorch.trainer.states import TrainerFn
except ImportError as err:  # pragma: no cover - exercised by hiding the module in a test
    raise ImportError(
        "pipesparse.lightning needs Lightning; install the extra: pip install 'pipesparse[lightning]'"
    ) from err

from pipesparse.base import BaseDataSparsifier, data_names
from pipesparse.errors import CorruptStateError
from pipesparse.scheduler import BaseDataScheduler

__all__ = ["PostTrainingDataSparsity", "TrainingAwareDataSparsity"]

logger = logging.getLogger(__name__)

ParameterFilter = Callable[[str, nn.Parameter], bool]


def _model_of(pl_module: Any, hook: str) -> nn.Module:
    model = getattr(pl_module, "model", None)
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"{hook} sparsifies `pl_module.model`; {type(pl_module).__name__} has no nn.Module "
            "attribute named 'model'"
        )
    return model


def _attach(model: nn.Module, sparsifier: BaseDataSparsifier, keep: ParameterFilter | None) -> None:
    """Register every (selected) parameter of ``model`` with ``sparsifier``."""
    chosen = [(n, p) for n, p in model.named_parameters() if keep is None or keep(n, p)]
    for name, (_, parameter) in zip(data_names(n for n, _ in chosen), chosen, strict=True):
        sparsifier.add_data(name, parameter)


def _sparsity_levels(sparsifier: BaseDataSparsifier) -> dict[str, float]:
    """Fraction of zeros in each mask, logged after every step."""
    levels = {
        name: 1.0 - sparsifier.get_mask(name).float().mean().item()
        for name in sparsifier.data_groups
    }
    for name, level in levels.items():
        logger.info("Sparsity in layer %s = %.2f%%", name, 100 * level)
    return levels


def _check_class(value: Any, base: type, what: str) -> None:
    if not (isinstance(value, type) and issubclass(value, base)):
        raise TypeError(
            f"{what} must be a {base.__name__} subclass (the class, not an instance), got {value!r}"
        )


class PostTrainingDataSparsity(pl.Callback):
    """Sparsify a copy of ``pl_module.model`` when ``fit`` ends.

    Args:
        data_sparsifier_class: a :class:`~pipesparse.BaseDataSparsifier` subclass, built when
            fit ends.
        data_sparsifier_args: its constructor arguments (without ``data_list``).
        parameters: ``(name, parameter) -> bool`` choosing the parameters to sparsify; None:
            all of them, as the reference.

    After ``fit``: ``sparsified`` is the pruned copy (eval mode), ``data_sparsifier`` holds its
    masks, ``sparsity_levels`` the fraction of zeros per parameter.
    """

    def __init__(
        self,
        data_sparsifier_class: type[BaseDataSparsifier],
        data_sparsifier_args: Mapping[str, Any],
        parameters: ParameterFilter | None = None,
    ):
        super().__init__()
        _check_class(data_sparsifier_class, BaseDataSparsifier, "data_sparsifier_class")
        self.data_sparsifier_class = data_sparsifier_class
        self.data_sparsifier_args = dict(data_sparsifier_args)
        self.parameters = parameters
        self.data_sparsifier: BaseDataSparsifier | None = None
        self.sparsified: nn.Module | None = None
        self.sparsity_levels: dict[str, float] = {}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sparsified = copy.deepcopy(_model_of(pl_module, "PostTrainingDataSparsity")).eval()
        sparsifier = self.data_sparsifier_class(**self.data_sparsifier_args)
        _attach(sparsified, sparsifier, self.parameters)
        sparsifier.step()
        sparsifier.squash_mask()  # writes the masked values into the copy's parameters
        self.sparsified, self.data_sparsifier = sparsified, sparsifier
        self.sparsity_levels = _sparsity_levels(sparsifier)


class TrainingAwareDataSparsity(pl.Callback):
    """Sparsify a copy of ``pl_module.model`` after every training epoch, on a schedule.

    Each epoch end copies the model, attaches the copy to the sparsifier (configs and masks
    carry over between epochs), steps the sparsifier and then the scheduler; training end
    squashes the masks into the last copy.

    Args:
        data_sparsifier_class: a :class:`~pipesparse.BaseDataSparsifier` subclass.
        data_sparsifier_args: its constructor arguments (without ``data_list``).
        data_scheduler_class: a :class:`~pipesparse.BaseDataScheduler` subclass, e.g.
            :class:`~pipesparse.CubicSparsityScheduler`.
        data_scheduler_args: its constructor arguments (without ``data_sparsifier``).
        parameters: ``(name, parameter) -> bool`` choosing the parameters to sparsify; None:
            all of them, as the reference.
        name: tells several of these callbacks in one Trainer apart (Lightning saves each
            one's state in checkpoints under its own key, and refuses two with the same key).
    """

    def __init__(
        self,
        data_sparsifier_class: type[BaseDataSparsifier],
        data_sparsifier_args: Mapping[str, Any],
        data_scheduler_class: type[BaseDataScheduler],
        data_scheduler_args: Mapping[str, Any],
        parameters: ParameterFilter | None = None,
        name: str | None = None,
    ):
        super().__init__()
        _check_class(data_sparsifier_class, BaseDataSparsifier, "data_sparsifier_class")
        _check_class(data_scheduler_class, BaseDataScheduler, "data_scheduler_class")
        self.data_sparsifier_class = data_sparsifier_class
        self.data_sparsifier_args = dict(data_sparsifier_args)
        self.data_scheduler_class = data_scheduler_class
        self.data_scheduler_args = dict(data_scheduler_args)
        self.parameters = parameters
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {type(name).__name__}")
        self.name = name
        self.data_sparsifier: BaseDataSparsifier | None = None
        self.data_scheduler: BaseDataScheduler | None = None
        self.sparsified: nn.Module | None = None
        self.data_sparsifier_state_dict: dict[str, Any] | None = None
        self.sparsity_levels: dict[str, float] = {}
        self._restored: Mapping[str, Any] | None = None

    @property
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint: the class name, with ``name``."""
        if self.name is None:
            return super().state_key
        return self._generate_state_key(name=self.name)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.data_sparsifier = self.data_sparsifier_class(**self.data_sparsifier_args)
        self.sparsified = copy.deepcopy(_model_of(pl_module, "TrainingAwareDataSparsity"))
        _attach(self.sparsified, self.data_sparsifier, self.parameters)  # the scheduler's base
        args = copy.deepcopy(self.data_scheduler_args)
        args["data_sparsifier"] = self.data_sparsifier
        self.data_scheduler = self.data_scheduler_class(**args)
        if self._restored is not None:  # resuming from a checkpoint
            self.data_sparsifier.load_state_dict(self._restored["data_sparsifier"])
            self.data_scheduler.load_state_dict(self._restored["data_scheduler"])
            self.data_sparsifier_state_dict = self._restored["data_sparsifier"]
            self._restored = None
        else:  # a fresh schedule: an earlier fit's masks and levels must not come back
            self.data_sparsifier_state_dict = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.data_sparsifier_state_dict is not None:
            self.data_sparsifier.load_state_dict(self.data_sparsifier_state_dict)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.sparsified = copy.deepcopy(_model_of(pl_module, "TrainingAwareDataSparsity"))
        _attach(self.sparsified, self.data_sparsifier, self.parameters)
        self.data_sparsifier.step()
        self.data_scheduler.step()
        self.data_sparsifier_state_dict = self.data_sparsifier.state_dict(include_data=False)
        self.sparsity_levels = _sparsity_levels(self.data_sparsifier)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.data_sparsifier.squash_mask()

    def _forget_restored(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A checkpoint loaded to validate, test or predict (Lightning hands its callback state
        over then too) is not one a later ``fit`` without a checkpoint resumes from."""
        if trainer.state.fn != TrainerFn.FITTING:
            self._restored = None

    on_validation_start = on_test_start = on_predict_start = _forget_restored

    def state_dict(self) -> dict[str, Any]:
        """Masks, configs and schedule position, saved in Lightning checkpoints."""
        if self.data_scheduler is None:
            return {}
        return {
            "data_sparsifier": self.data_sparsifier.state_dict(include_data=False),
            "data_scheduler": self.data_scheduler.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpoint's state until ``on_train_start`` has built the objects."""
        if not isinstance(state_dict, Mapping):
            raise CorruptStateError(
                f"{self.state_key} checkpoint state must be a dict, got {type(state_dict).__name__}"
            )
        if state_dict:
            keys = ("data_sparsifier", "data_scheduler")
            missing = [key for key in keys if not isinstance(state_dict.get(key), Mapping)]
            unknown = sorted(set(state_dict) - set(keys))
            if missing or unknown:
                raise CorruptStateError(
                    f"{self.state_key} checkpoint state needs dicts under {list(keys)}: missing "
                    f"or not a dict {missing}, unknown keys {unknown}"
                )
        self._restored = state_dict or None
