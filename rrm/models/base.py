"""The feature protocol every model in the zoo follows.

A :class:`Classifier` takes images in [0, 1] pixel space (normalisation is its first module, so attacks, ART and
users all speak pixels), computes its penultimate representation with ``features(x)`` and maps it to logits with
``head``. ``forward(x) == head(features(x))``. An optional ``feature_dim`` adds one linear layer after the
penultimate layer, trained with the model, so that any teacher/student pair can be matched (paper, Appendix B).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` inside the model."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """``normalize -> body -> (projection) -> head``; ``features`` is everything before ``head``."""

    def __init__(
        self,
        body: nn.Module,
        penultimate_dim: int,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        feature_dim: int | None = None,
        spec: dict | None = None,
    ):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.body = body
        self.projection: nn.Module = nn.Linear(penultimate_dim, feature_dim) if feature_dim else nn.Identity()
        self.feature_dim = feature_dim or penultimate_dim
        self.head = nn.Linear(self.feature_dim, num_classes)
        self.num_classes = num_classes
        # The arguments of ``build_model`` that rebuild this architecture; saved with every checkpoint.
        self.spec = dict(spec or {})

    @property
    def stage_names(self) -> tuple[str, ...]:
        """The named stages :meth:`stages` returns: ``stem``, ``block1`` ... ``blockN``, ``penultimate``."""
        return (*(name for name, _ in _stage_points(self.body)), "penultimate")

    def stages(self, x: torch.Tensor, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Intermediate representations by name, in one forward pass.

        ``stem`` and the plain ``blockK`` are pre-activation maps (the input of the layer's ReLU: a convolution's
        output, after its BatchNorm where there is one); a residual ``blockK`` is the block's output;
        ``penultimate`` is :meth:`features`. ``names``: the stages wanted (all by default).
        """
        points = dict(_stage_points(self.body))
        wanted = set(self.stage_names if names is None else names)
        unknown = wanted - set(self.stage_names)
        if unknown:
            raise ValueError(
                f"unknown stage(s) {sorted(unknown)} of {self.spec.get('name', 'this model')}; "
                f"its stages: {', '.join(self.stage_names)}"
            )
        at = {index: name for name, index in points.items() if name in wanted}
        out: dict[str, torch.Tensor] = {}
        h = self.normalize(x)
        for index, layer in enumerate(self.body):
            # an in-place ReLU would overwrite the pre-activation map just kept
            h = torch.relu(h) if isinstance(layer, nn.ReLU) and index - 1 in at else layer(h)
            if index in at:
                out[at[index]] = h
        if "penultimate" in wanted:
            out["penultimate"] = self.projection(h)
        return out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate representation ``g(x)`` that RRM matches, shape ``(N, feature_dim)``."""
        return self.projection(self.body(self.normalize(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _is_residual(module: nn.Module) -> bool:
    """A residual block, or a stage of them (torchvision's layer1..4)."""
    inner = module[0] if isinstance(module, nn.Sequential) and len(module) else module
    return hasattr(inner, "shortcut") or hasattr(inner, "downsample")


def _stage_points(body: nn.Module) -> list[tuple[str, int]]:
    """Where each named stage is read in ``body`` (a Sequential): the layer before each top-level ReLU (its
    pre-activation) and each residual block, named ``stem``, ``block1``, ...; the body's final ReLU is left to
    ``penultimate``."""
    if not isinstance(body, nn.Sequential):
        return []
    layers = list(body)
    points = []
    for index, layer in enumerate(layers):
        last_relu = index == len(layers) - 1 or not any(
            isinstance(m, nn.ReLU) or _is_residual(m) for m in layers[index + 1 :]
        )
        if isinstance(layer, nn.ReLU) and index > 0 and not last_relu:
            points.append(index - 1)
        elif _is_residual(layer):
            points.append(index)
    return [("stem" if i == 0 else f"block{i}", index) for i, index in enumerate(points)]
