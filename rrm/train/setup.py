"""A run's set-up before any training: its teacher, its student (or a transplant into it), laid out and wrapped as
the run asks, and the training images beside the monitor's.

The trainer calls these after seeding, in the order in which they draw random numbers, which a seeded run repeats.
"""

from __future__ import annotations

import os
import sys

import torch

from rrm.data import ImageData
from rrm.errors import RRMError
from rrm.models import Classifier, Teacher, build_model, load_teacher
from rrm.models.transplant import transplanted
from rrm.train import distributed
from rrm.train.config import TrainConfig
from rrm.train.monitor import monitor_split
from rrm.train.strategy import Method


def run_teacher(
    cfg: TrainConfig,
    method_cls: type[Method],
    teacher: Teacher | Classifier | str | os.PathLike | None,
    device: torch.device,
) -> Teacher | Classifier | str | os.PathLike | None:
    """The frozen teacher where the method or the transplant needs one (``teacher`` as given otherwise); built
    here, after seeding, whatever it came from, so that a seeded student starts the same."""
    if not (method_cls.needs_teacher or cfg.transplant):
        return teacher
    if teacher is None and not cfg.teacher:
        what = f"method {cfg.method!r}" if method_cls.needs_teacher else f"--transplant {cfg.transplant}"
        raise RRMError(f"{what} needs a teacher; pass --teacher <model file or models:/ URI>")
    return load_teacher(teacher if teacher is not None else cfg.teacher, device)


def build_student(
    cfg: TrainConfig,
    ctx: distributed.Context,
    device: torch.device,
    data: ImageData,
    method: Method,
    teacher: Classifier | None,
) -> tuple[Classifier, Classifier | None, tuple[str, str] | None]:
    """``(model, teacher, transplant)``: the student on ``device``, checked by the method, in channels-last layout,
    broadcast under torchrun and compiled where the run asks (the teacher laid out and compiled alike), and the
    transplant's ``(kind, reason)`` where the student's first layer is the teacher's."""

    def build(**extra) -> Classifier:
        return build_model(cfg.model, **data.model_kwargs(), feature_dim=cfg.feature_dim, width=cfg.width, **extra)

    transplant = None
    if cfg.transplant:  # decided and checked before any training
        model, kind, reason = transplanted(cfg.transplant, teacher, build, frozen=cfg.transplant_frozen)
        transplant = (kind, reason)
        if ctx.is_main:
            hint = (
                "" if method.adversarial else "; alone it keeps little robustness: add --method fast to train the rest"
            )
            print(f"transplant: {kind} ({reason}){hint}", file=sys.stderr)
    else:
        model = build()
    model = model.to(device)
    method.check(data, model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher = teacher.to(memory_format=torch.channels_last)
    if ctx.enabled:
        distributed.broadcast_parameters(model)
        if cfg.sync_batchnorm:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.compile:  # features, not __call__: the methods call features/head directly; state_dict keys unchanged
        model.features = torch.compile(model.features)
        if teacher is not None:
            teacher.features = torch.compile(teacher.features)
    return model, teacher, transplant


def training_split(cfg: TrainConfig, data: ImageData, device: torch.device) -> tuple[tuple, tuple]:
    """``((train_x, train_y), monitor)``: the training images and labels (on ``device`` with ``data_on_device``) and
    the monitor's held-out ones (:func:`~rrm.train.monitor.monitor_split`)."""
    (train_x, train_y), monitor = monitor_split(data, cfg.monitor_examples)
    if cfg.data_on_device and data.lazy:
        raise RRMError(
            f"--data-on-device copies the whole training set to the device, but {data.name!r} is read from shards "
            "batch by batch; drop --data-on-device"
        )
    if cfg.data_on_device:  # batches are then gathered on the device: no host-to-device copy per step
        train_x, train_y = train_x.to(device), train_y.to(device)
    return (train_x, train_y), monitor
