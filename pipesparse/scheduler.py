"""Schedulers that vary one config value of a data sparsifier over time (e.g. a sparsity ramp).

``BaseDataScheduler`` follows torch.ao's data scheduler (itself modelled on torch's LR
schedulers): the constructor makes the initial step at ``last_epoch=0``, each ``step()``
advances ``last_epoch`` and writes :meth:`get_schedule_param`'s values into the sparsifier's
``data_groups``, which the next ``data_sparsifier.step()`` uses. Unlike the reference it does
not monkeypatch ``data_sparsifier.step`` (the sparsifier counts its own steps), and it checks
the new values with the sparsifier's own validation (of the config, and of the data it will
mask) before changing anything.
"""

from __future__ import annotations

import abc
import math
import numbers
import warnings
from collections.abc import Mapping
from typing import Any

from pipesparse.base import BaseDataSparsifier, _plain
from pipesparse.errors import CorruptStateError, UnknownDataError

__all__ = ["BaseDataScheduler", "CubicSparsityScheduler", "LinearSparsityScheduler"]

_NOT_STATE = ("data_sparsifier", "_sparsifier_steps_at_start")
_REQUIRED_STATE = ("last_epoch", "_step_count", "base_param", "_last_param", "schedule_param")
# what each saved attribute must be: a state that passes the key check but not this would only
# fail later, in a step, with the earlier state already gone
_STATE_TYPES: dict[str, type] = {
    "last_epoch": int,
    "_step_count": int,
    "base_param": dict,
    "_last_param": dict,
    "schedule_param": str,
    "verbose": bool,
    "_get_sp_called_within_step": bool,
}


def _check_type(key: str, value: Any, expected: type) -> None:
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise CorruptStateError(
            f"scheduler state_dict has {key}={value!r}; expected {expected.__name__}"
        )


def _unknown_key(sparsifier: BaseDataSparsifier, schedule_param: str) -> str | None:
    """Why ``schedule_param`` cannot be scheduled on ``sparsifier`` (not one of its config
    keys: the rule would ignore it and the schedule change nothing), or None."""
    known = set(sparsifier.defaults).union(*sparsifier.data_groups.values())
    if schedule_param in known:
        return None
    return (
        f"schedule_param {schedule_param!r} is not a config key of {type(sparsifier).__name__}; "
        f"its keys: {', '.join(sorted(known)) or 'none'}"
    )


class BaseDataScheduler:
    """Vary ``schedule_param`` of every data group of ``data_sparsifier`` step by step.

    Call ``data_sparsifier.step()`` first, then ``scheduler.step()`` (as with LR schedulers);
    the opposite order warns. Subclasses implement :meth:`get_schedule_param`.

    Args:
        data_sparsifier: the :class:`~pipesparse.BaseDataSparsifier` whose config is scheduled.
        schedule_param: the config key to vary, e.g. ``"sparsity_level"``.
        last_epoch: the step to resume after (``-1``: start from scratch).
        verbose: print every change.
    """

    def __init__(
        self,
        data_sparsifier: BaseDataSparsifier,
        schedule_param: str,
        last_epoch: int = -1,
        verbose: bool = False,
    ):
        if not isinstance(data_sparsifier, BaseDataSparsifier):
            raise TypeError(
                f"{type(data_sparsifier).__name__} is not a pipesparse.BaseDataSparsifier"
            )
        if not isinstance(schedule_param, str):
            raise TypeError(
                f"schedule_param must be a config key (str), got {type(schedule_param).__name__}"
            )
        unknown = _unknown_key(data_sparsifier, schedule_param)
        if unknown:
            raise ValueError(unknown)
        if (
            isinstance(last_epoch, bool)
            or not isinstance(last_epoch, numbers.Integral)
            or last_epoch < -1
        ):
            # as load_state_dict requires: a state this scheduler saves must load back
            raise ValueError(
                f"last_epoch must be an int >= -1 (-1: start from scratch), got {last_epoch!r}"
            )
        self.data_sparsifier = data_sparsifier
        self.schedule_param = schedule_param
        self.base_param = {
            name: config.get(schedule_param) for name, config in data_sparsifier.data_groups.items()
        }
        self.last_epoch = int(last_epoch)
        self.verbose = bool(verbose)  # load_state_dict takes a bool: verbose=1 must load back
        self._step_count = 0
        self._last_param: dict[str, Any] = {}
        self._get_sp_called_within_step = False
        self._sparsifier_steps_at_start = data_sparsifier._step_count
        self.step()

    @abc.abstractmethod
    def get_schedule_param(self) -> dict[str, Any]:
        """Name -> new value of ``schedule_param``, computed from ``self.last_epoch``."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement get_schedule_param() (name -> new value of "
            f"{self.schedule_param!r})"
        )

    def get_last_param(self) -> dict[str, Any]:
        """Name -> value of ``schedule_param`` after the last step."""
        return self._last_param

    def step(self) -> None:
        """Advance one step and write the new values into the sparsifier's ``data_groups``."""
        if self._step_count == 1 and (
            self.data_sparsifier._step_count <= self._sparsifier_steps_at_start
        ):
            warnings.warn(
                "Detected call of `scheduler.step()` before `data_sparsifier.step()`. Call "
                "`data_sparsifier.step()` BEFORE `scheduler.step()`, otherwise the first value "
                "of the schedule is skipped.",
                UserWarning,
                stacklevel=2,
            )
        self.last_epoch += 1
        self._get_sp_called_within_step = True
        try:
            self._apply(self.get_schedule_param())
        except BaseException:
            self.last_epoch -= 1  # a failed step changes nothing
            raise
        finally:
            self._get_sp_called_within_step = False
        self._step_count += 1

    def _apply(self, params: Mapping[str, Any]) -> None:
        """Validate every new config, and the data it will mask (as the sparsifier's next
        step will), then write them all (bad values change nothing)."""
        sparsifier = self.data_sparsifier
        groups = sparsifier.data_groups
        # numpy scalars as Python numbers, as add_data stores configs: states stay plain
        params = {name: _plain(value) for name, value in params.items()}
        for name, value in params.items():
            if name not in groups:
                raise UnknownDataError(name, list(groups))
            config = {**groups[name], self.schedule_param: value}
            data = sparsifier._data.get(name)
            try:
                sparsifier._validate_config(config)
                if data is not None and not sparsifier.is_squashed(name):
                    sparsifier._validate_data(name, data, config)
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"{type(self).__name__} set {self.schedule_param}={value!r} for {name!r}: {err}"
                ) from None
        for name, value in params.items():
            groups[name][self.schedule_param] = value
            if self.verbose:
                print(f"Adjusting {self.schedule_param} for group {name} to {value}")
        self._last_param = {
            name: config.get(self.schedule_param) for name, config in groups.items()
        }
        self.data_sparsifier.enable_mask_update = True

    def state_dict(self) -> dict[str, Any]:
        """Every attribute but the sparsifier (save the sparsifier's own state separately);
        plain Python values, loadable with ``torch.load(..., weights_only=True)`` (numpy
        numbers a user's schedule or edit put there are saved as Python numbers)."""
        return {
            key: {k: _plain(v) for k, v in value.items()}
            if isinstance(value, dict)
            else _plain(value)
            for key, value in self.__dict__.items()
            if key not in _NOT_STATE
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (restore the sparsifier first)."""
        if not isinstance(state_dict, Mapping):
            raise CorruptStateError(
                f"scheduler state_dict must be a dict, got {type(state_dict).__name__}"
            )
        missing = [key for key in _REQUIRED_STATE if key not in state_dict]
        unknown = sorted(set(state_dict) - set(self.state_dict()))
        if missing or unknown:
            raise CorruptStateError(
                f"not a {type(self).__name__} state_dict: missing keys {missing}, "
                f"unknown keys {unknown}"
            )
        self._check_state(state_dict)
        self.__dict__.update(state_dict)

    def _check_state(self, state_dict: Mapping[str, Any]) -> None:
        """Raise :class:`CorruptStateError` for a value of the wrong type or range."""
        for key, expected in _STATE_TYPES.items():
            if key in state_dict:
                _check_type(key, state_dict[key], expected)
        if state_dict["last_epoch"] < -1 or state_dict["_step_count"] < 0:
            raise CorruptStateError(
                f"scheduler state_dict has last_epoch={state_dict['last_epoch']} and "
                f"_step_count={state_dict['_step_count']}; expected >= -1 and >= 0"
            )
        unknown = _unknown_key(self.data_sparsifier, state_dict["schedule_param"])
        if unknown:
            raise CorruptStateError(f"scheduler state_dict: {unknown}")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__} (\nData Sparsifier {self.data_sparsifier}\n"
            f"    {self.schedule_param}: {self.base_param}\n)"
        )


class _RampScheduler(BaseDataScheduler):
    """Moves ``schedule_param`` of every data group (and of the sparsifier's defaults) from
    ``init_level`` to ``final_level`` over ``total_steps`` steps, then holds ``final_level``;
    subclasses give the shape of the ramp."""

    def __init__(
        self,
        data_sparsifier: BaseDataSparsifier,
        init_level: float = 0.0,
        final_level: float = 0.5,
        total_steps: int = 100,
        schedule_param: str = "sparsity_level",
        last_epoch: int = -1,
        verbose: bool = False,
    ):
        for key, level in (("init_level", init_level), ("final_level", final_level)):
            if (
                isinstance(level, bool)
                or not isinstance(level, numbers.Real)
                or not math.isfinite(level)
            ):
                raise ValueError(f"{key} must be a finite number, got {level!r}")
        if (
            isinstance(total_steps, bool)
            or not isinstance(total_steps, numbers.Integral)
            or total_steps < 1
        ):
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        self.init_level = float(init_level)
        self.final_level = float(final_level)
        self.total_steps = int(total_steps)  # numpy ints too, as Python ints (plain state)
        super().__init__(data_sparsifier, schedule_param, last_epoch, verbose)

    def _shape(self, progress: float) -> float:
        """Fraction of the way from init to final level at ``progress`` in [0, 1]."""
        raise NotImplementedError

    def level_at(self, step: int) -> float:
        """The scheduled value after ``step`` steps."""
        return self._level(self.__dict__, step)

    def _level(self, state: Mapping[str, Any], step: int) -> float:
        """:meth:`level_at` for the ramp of ``state`` (this scheduler's attributes or a
        state_dict's)."""
        progress = min(max(step, 0), state["total_steps"]) / state["total_steps"]
        init, final = state["init_level"], state["final_level"]
        return init + (final - init) * self._shape(progress)

    def get_schedule_param(self) -> dict[str, float]:
        level = self.level_at(self.last_epoch)
        return dict.fromkeys(self.data_sparsifier.data_groups, level)

    def step(self) -> None:
        """Also write the level into the sparsifier's defaults, so data registered later (a
        pipeline's first batch) starts from the scheduled value, not the constructor's."""
        defaults = self.data_sparsifier.defaults
        level = self.level_at(self.last_epoch + 1)
        try:
            self.data_sparsifier._validate_config({**defaults, self.schedule_param: level})
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"{type(self).__name__} cannot set {self.schedule_param}={level!r}: {err}"
            ) from None
        super().step()
        defaults[self.schedule_param] = level

    def _check_state(self, state_dict: Mapping[str, Any]) -> None:
        super()._check_state(state_dict)
        state = {**self.__dict__, **state_dict}
        for key in ("init_level", "final_level"):
            if not isinstance(state[key], float) or not math.isfinite(state[key]):
                raise CorruptStateError(
                    f"scheduler state_dict has {key}={state[key]!r}; expected a finite float"
                )
        _check_type("total_steps", state["total_steps"], int)
        if state["total_steps"] < 1:
            raise CorruptStateError(
                f"scheduler state_dict has total_steps={state['total_steps']}; expected >= 1"
            )
        level = self._level(state, state["last_epoch"])
        try:
            self.data_sparsifier._validate_config(
                {**self.data_sparsifier.defaults, state["schedule_param"]: level}
            )
        except (TypeError, ValueError) as err:
            raise CorruptStateError(
                f"scheduler state_dict sets {state['schedule_param']}={level!r}: {err}"
            ) from None

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Also put the restored step's level into the sparsifier's defaults (as :meth:`step`
        does), so data registered after a resume starts from it."""
        super().load_state_dict(state_dict)
        self.data_sparsifier.defaults[self.schedule_param] = self.level_at(self.last_epoch)


class LinearSparsityScheduler(_RampScheduler):
    """``s_t = s_i + (s_f - s_i) * t / T``: a straight ramp of ``sparsity_level``.

    Args:
        data_sparsifier: the sparsifier whose ``schedule_param`` is ramped (every data group).
        init_level: value at step 0 (``s_i``).
        final_level: value from step ``total_steps`` on (``s_f``).
        total_steps: length of the ramp (``T``), in ``scheduler.step()`` calls.
        schedule_param: config key to ramp.
        last_epoch: the step to resume after (``-1``: start from scratch).
        verbose: print every change.
    """

    def _shape(self, progress: float) -> float:
        return progress


class CubicSparsityScheduler(_RampScheduler):
    """``s_t = s_f + (s_i - s_f) * (1 - t / T) ** 3`` (Zhu & Gupta, 2017, "To prune, or not to
    prune"): prune fast while much is redundant, slowly as the final level nears.

    Args:
        data_sparsifier: the sparsifier whose ``schedule_param`` is ramped (every data group).
        init_level: value at step 0 (``s_i``).
        final_level: value from step ``total_steps`` on (``s_f``).
        total_steps: length of the ramp (``T``), in ``scheduler.step()`` calls.
        schedule_param: config key to ramp.
        last_epoch: the step to resume after (``-1``: start from scratch).
        verbose: print every change.
    """

    def _shape(self, progress: float) -> float:
        return 1.0 - (1.0 - progress) ** 3
