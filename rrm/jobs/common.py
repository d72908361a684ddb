"""What every job shares: whether and where it is tracked, how MLflow is loaded, and the one-line input errors;
without torch or MLflow, so that the command line refuses bad input at once."""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType

from rrm.errors import RRMError
from rrm.tracking.aliases import check_alias
from rrm.tracking.environment import FAIL_FAST_ENV

__all__ = ["FAIL_FAST_ENV", "Tracking", "check_alias", "is_registry_uri", "require", "tracking"]


@dataclass
class Tracking:
    """Whether and where a job records its run in MLflow."""

    enabled: bool = True
    experiment: str | None = "rrm"  # None: the job's default (an evaluation joins its training run's experiment)
    run_name: str | None = None  # None: the job's default name
    recipe: str | None = None  # a training's default run name starts with it (its params section), not its method


def tracking() -> ModuleType:
    """:mod:`rrm.tracking`, whose names load MLflow (seconds) when first used: only jobs that need it ask for it."""
    from rrm import tracking as module

    return module


def is_registry_uri(ref: str | os.PathLike | None) -> bool:
    """Whether a model reference is a registry URI (loading it talks to MLflow) rather than a file."""
    from rrm.models.teacher import REGISTRY_SCHEMES  # here: the command line checks its input without torch

    return isinstance(ref, str) and ref.startswith(REGISTRY_SCHEMES)


def require(value: object, what: str) -> None:
    """A missing input: one line naming the flag."""
    if value is None or value == () or value == "":
        raise RRMError(f"missing {what}; pass it, or set it in the --params section")
