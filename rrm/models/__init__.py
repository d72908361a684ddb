"""The model zoo: every architecture by name, one feature protocol, and a checkpoint format that rebuilds it."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from rrm.errors import RRMError, unknown
from rrm.io import atomic_path
from rrm.models.base import Classifier, Normalize
from rrm.models.teacher import Teacher, load_teacher
from rrm.models.zoo import ARCHITECTURES, WIDTH_SCALABLE

MODEL_FORMAT = "rrm-model/1"

__all__ = [
    "ARCHITECTURES",
    "Classifier",
    "Normalize",
    "Teacher",
    "build_model",
    "load_model",
    "load_teacher",
    "model_from_state",
    "save_model",
]


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    feature_dim: int | None = None,
    width: float = 1.0,
    stem_prefix: dict | None = None,
) -> Classifier:
    """Build architecture ``name`` for images of ``in_channels x image_size x image_size`` in [0, 1].

    ``stem_prefix``: a teacher's first layer runs in front of the model, whose own first layer reads its maps
    (:func:`rrm.models.transplant.stem_prefix_spec` gives it; ``--transplant stem-prefix`` copies the weights).
    """
    if name not in ARCHITECTURES:
        raise unknown("model", name, ARCHITECTURES)
    if num_classes < 2:
        raise RRMError(f"num_classes must be >= 2, got {num_classes}")
    if feature_dim is not None and feature_dim < 1:
        raise RRMError(
            f"feature_dim must be a positive integer, got {feature_dim}; leave it unset to keep the penultimate size"
        )
    if not (math.isfinite(width) and width > 0):
        raise RRMError(f"width must be a finite number > 0, got {width}; 1.0 is the architecture's own width")
    if width != 1.0 and name not in WIDTH_SCALABLE:
        raise RRMError(
            f"model {name!r} has a fixed width; drop --width or choose one of {', '.join(sorted(WIDTH_SCALABLE))}"
        )
    if image_size < 4:
        raise RRMError(f"image_size must be >= 4 pixels, got {image_size}")
    mean = tuple(mean) if mean is not None else (0.0,) * in_channels
    std = tuple(std) if std is not None else (1.0,) * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise RRMError(f"mean and std need {in_channels} values (one per channel), got {len(mean)} and {len(std)}")
    body, penultimate_dim = ARCHITECTURES[name](in_channels, image_size, width)
    if stem_prefix:
        from rrm.models.transplant import prefixed_body  # transplant imports the base protocol, not this module

        body = prefixed_body(body, in_channels, stem_prefix)
    spec = dict(
        name=name,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        mean=list(mean),
        std=list(std),
        feature_dim=feature_dim,
        width=width,
    )
    if stem_prefix:  # only where set: the specs of every other model stay as they were
        spec["stem_prefix"] = dict(stem_prefix)
    return Classifier(body, penultimate_dim, num_classes, mean, std, feature_dim=feature_dim, spec=spec)


def save_model(model: Classifier, path: str | os.PathLike, meta: dict | None = None) -> None:
    """Write the architecture spec, weights and ``meta`` (method, dataset, threat model, ...) atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"format": MODEL_FORMAT, "spec": model.spec, "state_dict": state, "meta": dict(meta or {})}, tmp)


def model_from_state(payload: dict, source: str = "checkpoint") -> Classifier:
    """Rebuild a model from a dict holding ``spec`` and ``state_dict`` (a model file or a training checkpoint)."""
    try:
        model = build_model(**payload["spec"])
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise RRMError(
            f"{source} does not hold an rrm model ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "pass a file written by `rrm train`"
        ) from None
    return model


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[Classifier, dict]:
    """Load a model written by :func:`save_model` (or a training checkpoint); returns ``(model, meta)``."""
    path = Path(path)
    if not path.is_file():
        raise RRMError(f"model file {str(path)!r} does not exist; train one with `rrm train` or check the path")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError:
        raise RRMError(
            f"model file {str(path)!r} cannot be read: permission denied; run as a user who may read it, or change "
            "its permissions"
        ) from None
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise RRMError(
            f"model file {str(path)!r} is corrupt or not a torch file ({type(exc).__name__}); "
            "re-create it with `rrm train`"
        ) from None
    if not isinstance(payload, dict) or "spec" not in payload:
        raise RRMError(f"{str(path)!r} is not an rrm model file; pass a file written by `rrm train`")
    model = model_from_state(payload, source=repr(str(path)))
    return model.eval(), dict(payload.get("meta", {}))
