"""Nested options and results as MLflow params and metrics: text for params, numbers for metrics, ``a/b`` keys."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping

__all__ = ["as_params", "is_number", "leaves", "numbers", "training_params"]


def as_params(config: Mapping) -> dict[str, str]:
    """Options as MLflow params; ``lam`` under its paper name ``lambda``."""
    out: dict[str, str] = {}
    for key, value in config.items():
        text = json.dumps(list(value)) if isinstance(value, (list, tuple)) else str(value)
        out["lambda" if key == "lam" else key] = text
    return out


def training_params(config: Mapping, device: str | None = None) -> dict[str, str]:
    """The params of a training run: the options every method reads, and of the method's own options only its
    (:attr:`rrm.train.Method.options`), so a natural run shows no lambda or alpha. ``schedule`` and (given the
    ``device``) ``precision`` are the ones that ran, as the run's tags say, not None for "the method's default";
    ``teacher`` and ``transplant`` only where there is one."""
    from rrm.train import METHODS, resolved_precision, resolved_schedule

    method = METHODS.get(str(config.get("method")))
    owned = {name for cls in METHODS.values() for name in cls.options}
    kept = {
        key: value
        for key, value in config.items()
        if (key not in owned or (method is not None and key in method.options))
        and not (key in ("teacher", "transplant") and value is None)
    }
    if method is not None:
        kept["schedule"] = resolved_schedule(config.get("schedule"), method)
        if device is not None:
            kept["precision"] = resolved_precision(config.get("precision"), method, device)
    return as_params(kept)


def leaves(values: Mapping, prefix: str = "") -> Iterator[tuple[str, object]]:
    """The leaves of a nested mapping, keyed by their ``/``-joined path."""
    for key, value in values.items():
        if isinstance(value, Mapping):
            yield from leaves(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


def is_number(value: object) -> bool:
    """A metric's value: an int or float, not a flag."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def numbers(values: Mapping) -> dict[str, float]:
    """The numeric leaves of a nested mapping."""
    return {k: float(v) for k, v in leaves(values) if is_number(v)}
