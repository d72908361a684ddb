"""Data jobs: a registered dataset written to a file, and Ilyas et al.'s robustified dataset."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

from rrm.config import resolve_device
from rrm.jobs.common import require
from rrm.jobs.teacher import resolve_teacher

__all__ = ["RobustifyConfig", "prepare_job", "robustify_job"]


def prepare_job(dataset: str, out: str | os.PathLike, options: dict):
    """Load a registered dataset and write it to one file (or shards: ``options`` holds ``shards=True``); returns the
    data and its digest."""
    from rrm.data import prepare_dataset

    return prepare_dataset(dataset, out, **options)


@dataclass
class RobustifyConfig:
    """Ilyas et al.'s robustified dataset: a teacher, the data and the feature-matching budget."""

    teacher: str | None = None  # a model file or a registry URI such as models:/rrm-teacher@champion
    teacher_pin: str | None = None  # a model file the teacher must equal (see teacher_file)
    dataset: str | None = None
    out: str | None = None
    steps: int = 1000
    step_size: float = 0.1
    batch_size: int = 256
    seed: int = 0
    device: str = "auto"
    progress: bool | None = None
    shards: bool = False


def robustify_job(cfg: RobustifyConfig):
    """Write the robustified dataset of ``cfg``; returns it."""
    from rrm.data import load_dataset
    from rrm.robustify import robustify

    require(cfg.teacher, "--teacher")
    require(cfg.dataset, "--dataset")
    require(cfg.out, "--out")
    data = load_dataset(cfg.dataset)
    device = resolve_device(cfg.device)
    with tempfile.TemporaryDirectory() as tmp:
        model = resolve_teacher(cfg.teacher, tmp, device, cfg.teacher_pin).model
    return robustify(
        model,
        data,
        cfg.out,
        steps=cfg.steps,
        step_size=cfg.step_size,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        device=device,
        teacher_ref=cfg.teacher,
        progress=cfg.progress,
        shards=cfg.shards,
    )
