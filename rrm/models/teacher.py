"""A teacher resolved once: one value the jobs hand to the trainer and the tracking callback, and the one function
that builds a frozen teacher."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rrm.errors import RRMError
from rrm.models.base import Classifier

REGISTRY_SCHEMES = ("models:/", "runs:/")

__all__ = ["REGISTRY_SCHEMES", "Teacher", "load_teacher"]


@dataclass(frozen=True)
class Teacher:
    """Where a teacher came from and what it is: ``ref`` as the user gave it (a file or a registry URI), the file
    its weights were read from and that file's sha256, the model, loaded once, and for a registry URI the registry's
    record of the model version it resolved to (an MLflow ``ModelVersion``: name, version, run, tags)."""

    ref: str
    path: Path
    sha256: str
    model: Classifier
    registry: Any = None


def load_teacher(source: str | os.PathLike | Classifier | Teacher, device: torch.device | str) -> Classifier:
    """A frozen teacher (eval mode, no gradients) on ``device``, from a model file, a model or a :class:`Teacher`.

    A model (or a resolved :class:`Teacher`) is copied from its spec and weights, so the global random state moves
    exactly as loading its file would: a seeded student starts the same whatever its teacher came from. Registry
    URIs (``models:/name@alias``, ``runs:/id/model``) are resolved by the jobs (``rrm.jobs``), so that training
    never needs MLflow.
    """
    from rrm.models import load_model, model_from_state  # this module is imported by the package's __init__

    if isinstance(source, Teacher):
        source = source.model
    if isinstance(source, Classifier):
        teacher = model_from_state({"spec": source.spec, "state_dict": source.state_dict()}, source="the teacher")
    elif str(source).startswith(REGISTRY_SCHEMES):
        raise RRMError(
            f"registry URI {str(source)!r} must be resolved before training: resolve it with "
            "rrm.jobs.resolve_teacher and pass it as teacher=, or pass the file `rrm teacher pull` wrote"
        )
    else:
        teacher, _ = load_model(source)
    teacher.to(device).eval()
    teacher.requires_grad_(False)
    return teacher
