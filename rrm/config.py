"""The ground floor every layer builds on: typed configurations validated at the edge, and the device.

A configuration is a dataclass deriving :class:`Config`: it is built from a params-file section or the command
line (:meth:`Config.from_dict`, unknown keys refused), copied with :meth:`Config.replace`, written with
:meth:`Config.to_dict`, and its ``validate`` starts with :meth:`Config.check_types` and ends with
:meth:`Config.check_finite`, so every value has its field's type and no number is nan or infinite. Nothing here
imports another rrm module but :mod:`rrm.errors`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from typing import TYPE_CHECKING, ClassVar

import torch

from rrm.errors import RRMError

if TYPE_CHECKING:
    from typing import Self

__all__ = ["Config", "resolve_device"]


class Config:
    """The shared behaviour of rrm's dataclass configurations. A subclass sets, where it needs them:

    - ``KIND``: how its options are named in messages ("training", "evaluation");
    - ``ALIASES``: keys accepted for fields under another name (``{"lambda": "lam"}``);
    - ``SPELLED``: fields named otherwise in messages (``{"lam": "lambda"}``);
    - ``LISTS``: tuple fields a params file or flag may give as a list or a string, and ``COMMA_LISTS`` whether
      such a string is split at commas (``"stem,block1"``) or is one item (``"apgd"``).
    """

    KIND: ClassVar[str] = ""
    ALIASES: ClassVar[dict[str, str]] = {}
    SPELLED: ClassVar[dict[str, str]] = {}
    LISTS: ClassVar[tuple[str, ...]] = ()
    COMMA_LISTS: ClassVar[bool] = False

    def replace(self, **changes) -> Self:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Self:
        """Build from a params-file section or parsed options; unknown keys are an error naming the valid ones."""
        values = dict(values)
        for alias, name in cls.ALIASES.items():
            if alias in values:
                values[name] = values.pop(alias)
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(values) - names)
        if bad:
            kind = f"{cls.KIND} " if cls.KIND else ""
            raise RRMError(f"unknown {kind}option(s) {bad}; valid options: {', '.join(sorted(names))}")
        for name in cls.LISTS:
            value = values.get(name)
            if isinstance(value, str):
                values[name] = tuple(value.split(",") if cls.COMMA_LISTS else [value])
            elif isinstance(value, list):
                values[name] = tuple(value)
        return cls(**values)

    def spelled(self, name: str) -> str:
        """A field's name as messages give it."""
        return self.SPELLED.get(name, name)

    def check_types(self) -> None:
        """Raise :class:`RRMError` for a field whose value does not have the field's type.

        Library callers and ``-o KEY=VALUE`` pass values that no command-line parser has typed; a wrong type would
        otherwise fail deep inside a run, or be silently coerced. Validation starts with it.
        """
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), hints[f.name]
            if not _conforms(value, kind):
                raise RRMError(f"{self.spelled(f.name)} must be {_describe(kind)}, got {value!r}")

    def check_finite(self) -> None:
        """Raise :class:`RRMError` for a number field that is nan or infinite: no option of rrm means anything
        there. Validation ends with it, so the range checks before it name their own fix first."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            items = value if isinstance(value, (tuple, list)) else [value]
            if any(
                isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral) and not math.isfinite(v)
                for v in items
            ):
                raise RRMError(f"{self.spelled(f.name)} must be a finite number, got {value!r}; pass a finite value")


def _conforms(value: object, kind: object) -> bool:
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return any(_conforms(value, arm) for arm in typing.get_args(kind))
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        return isinstance(value, (tuple, list)) and all(_conforms(v, item) for v in value)
    if typing.get_origin(kind) is dict or kind is dict:
        return isinstance(value, dict)
    return not isinstance(kind, type) or isinstance(value, kind)


def _describe(kind: object) -> str:
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        arms = [arm for arm in typing.get_args(kind) if arm is not type(None)]
        described = " or ".join(_describe(arm) for arm in arms)
        return f"{described} (or unset)" if len(arms) < len(typing.get_args(kind)) else described
    if typing.get_origin(kind) is tuple:
        item = _describe(typing.get_args(kind)[0]).removeprefix("a ").removeprefix("an ")
        return f"a list of {item if item == 'text' else item + 's'}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "text", dict: "a mapping"}.get(
        kind, f"a {getattr(kind, '__name__', kind)}"
    )


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA, else MPS, else the CPU), or the named device; one line naming the fix where it is absent."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RRMError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RRMError(f"device {name!r} asked for but CUDA is not available here; use --device cpu or auto")
    return device
