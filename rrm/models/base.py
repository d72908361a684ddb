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

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate representation ``g(x)`` that RRM matches, shape ``(N, feature_dim)``."""
        return self.projection(self.body(self.normalize(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
