"""Accuracy, natural or under an attack: the one loop the trainer, the evaluation and tuning all count with.

It imports neither tracking nor evaluation, so the training core may use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from rrm.data import batches
from rrm.progress import Bar

# attack(x, y, seed) -> adversarial images of the batch (x, y), on x's device; batch i gets seed + i.
Attack = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def device_of(model: nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attack: Attack | None = None,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool | None = False,
    desc: str = "accuracy",
) -> float:
    """Fraction of ``x`` that ``model`` classifies as ``y``, or of ``attack``'s images of it, batch by batch.

    The batches go to the model's device and the model is put in eval mode, and left there: wrap the call in
    :func:`rrm.attacks.frozen` to have its mode and gradients restored. ``progress=None`` shows a bar only on a
    terminal.
    """
    model.eval()
    device = device_of(model)
    correct = torch.zeros((), dtype=torch.long, device=device)  # summed on the device: no host sync per batch
    stream = batches(x, y, batch_size, device=device)
    bar = Bar(
        stream,
        total=math.ceil(len(y) / batch_size),
        desc=desc,
        leave=False,
        disable=None if progress is None else not progress,
    )
    for i, (xb, yb) in enumerate(bar):
        if attack is not None:
            xb = attack(xb, yb, seed + i)
        with torch.no_grad():
            correct += (model(xb).argmax(1) == yb).sum()
    return int(correct) / max(1, len(y))
