"""Matching at several depths: which stages RRM matches, with what weight, and the small adapters that map a
student's stage to the teacher's shape where they differ."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from rrm.errors import RRMError

PAPER_LAYERS = ("penultimate",)


def parse_match_layers(items: Sequence[str]) -> dict[str, float]:
    """``("stem:0.5", "penultimate")`` -> ``{"stem": 0.5, "penultimate": 1.0}``; names are checked against the
    models later, weights here."""
    layers: dict[str, float] = {}
    for item in items:
        name, _, weight = str(item).partition(":")
        name = name.strip()
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise RRMError(f"match layer {item!r} is NAME or NAME:WEIGHT (e.g. stem:0.5)") from None
        if not name:
            raise RRMError(f"match layer {item!r} has no name; use e.g. stem,penultimate")
        if not (value >= 0 and math.isfinite(value)):
            raise RRMError(f"the weight of match layer {name!r} must be a number >= 0, got {weight}")
        if name in layers:
            raise RRMError(f"match layer {name!r} is listed twice")
        layers[name] = value
    if not layers:
        raise RRMError("--match-layers needs at least one stage, e.g. penultimate")
    return layers


def stage_adapter(student: Sequence[int], teacher: Sequence[int]) -> nn.Module | None:
    """A map from the student's stage shape to the teacher's: a 1x1 convolution where channels differ, then pooling
    (or interpolation) to the teacher's resolution; a linear layer for flat stages. None where shapes agree."""
    student, teacher = tuple(student), tuple(teacher)
    if student == teacher:
        return None
    if len(student) == 1 and len(teacher) == 1:
        return nn.Linear(student[0], teacher[0])
    if len(student) != 3 or len(teacher) != 3:
        raise RRMError(
            f"cannot match a stage of shape {list(student)} to one of shape {list(teacher)}; match stages "
            "of the same kind (maps with maps, vectors with vectors)"
        )
    layers: list[nn.Module] = []
    if student[0] != teacher[0]:
        layers.append(nn.Conv2d(student[0], teacher[0], 1))
    if student[1:] != teacher[1:]:
        size = tuple(teacher[1:])
        layers.append(nn.AdaptiveAvgPool2d(size) if student[1] >= teacher[1] else nn.Upsample(size=size))
    return nn.Sequential(*layers)
