"""The per-epoch monitor: PGD accuracy on training images held out from training, the cheap robustness signal that
early stopping and the catastrophic-overfitting detector read, so that no test image enters a training decision."""

from __future__ import annotations

import torch

from rrm.attacks import pgd
from rrm.data import ImageData, as_tensor
from rrm.metrics import accuracy
from rrm.models import Classifier
from rrm.train.config import TrainConfig


def monitor_split(data: ImageData, examples: int) -> tuple[tuple, tuple]:
    """``((train_x, train_y), (monitor_x, monitor_y))``: the last ``examples`` training images (at most half of
    them; the splits are shuffled and stratified) held out for the per-epoch monitor, which decides early stopping, so
    that no test image enters a training decision."""
    held = min(examples, len(data.train_y) // 2)
    if not held:
        return (data.train_x, data.train_y), (data.train_x[:0], data.train_y[:0])
    return (data.train_x[:-held], data.train_y[:-held]), (as_tensor(data.train_x[-held:]), data.train_y[-held:])


def monitored_robust_accuracy(
    model: Classifier, monitor: tuple[torch.Tensor, torch.Tensor], cfg: TrainConfig, steps: int | None = None
) -> float:
    """PGD accuracy on the held-out ``monitor`` images (:func:`monitor_split`): a cheap per-epoch robustness signal.

    ``steps=1`` gives the single-step (FGSM, step eps, no random start) accuracy that the catastrophic-overfitting
    detector compares it with.
    """
    steps = steps or cfg.monitor_steps

    step_size = cfg.eps if steps == 1 else 2.5 * cfg.eps / steps

    def attack(x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:  # random starts from the run's RNG
        return pgd(model, x, y, norm=cfg.norm, eps=cfg.eps, step_size=step_size, steps=steps, random_start=steps > 1)

    return accuracy(model, *monitor, attack=attack, batch_size=256)
