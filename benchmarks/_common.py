"""What several benchmarks set up the same way: a quickly trained model, and a fixed list of training batches."""

from __future__ import annotations

import tempfile

import torch

from rrm.data import ImageData, batches
from rrm.train import TrainConfig, train


def trained_cnn(data: ImageData, method: str, epochs: int, norm: str, eps: float, seed: int) -> torch.nn.Module:
    """A ``cnn`` trained with ``method`` for ``epochs`` on ``data`` (lr 0.05, no monitor), in eval mode."""
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            dataset=data.name,
            model="cnn",
            method=method,
            epochs=epochs,
            lr=0.05,
            norm=norm,
            eps=eps,
            monitor_examples=0,
            seed=seed,
            out_dir=out,
            progress=False,
        )
        return train(cfg, data=data).model.eval()


def fixed_batches(data: ImageData, batch_size: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``steps + 1`` shuffled training batches (seed 0): one to warm up, then the timed ones."""
    generator = torch.Generator().manual_seed(0)
    return list(batches(data.train_x, data.train_y, batch_size, shuffle=True, generator=generator, drop_last=True))[
        : steps + 1
    ]
