"""Every plot rrm draws, on matplotlib's Agg canvas (``Figure`` without pyplot: no display, no global state).

Import this module only where a plot is written: matplotlib takes a second to import, and the command line starts
without it.

- A training run's curves (``curves.png`` in its MLflow run): per-epoch loss terms, accuracies and epoch time.
"""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.figure import Figure


def _save(fig: Figure, path: str | os.PathLike, title: str) -> Path:
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=90)
    return Path(path)


# ------------------------------------------------------------------------------------------------------- training

# Per-epoch keys drawn as accuracies or times rather than as loss terms.
_NOT_LOSSES = {"epoch", "paper_epochs", "lr", "epoch_seconds", "train_accuracy", "test_accuracy",
               "monitor_robust_accuracy"}


def plot_training_curves(history: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Per-epoch loss terms, accuracies and epoch time as one PNG (matplotlib's Agg canvas; no display needed)."""
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    losses, accuracy, seconds = fig.subplots(1, 3)
    for key in dict.fromkeys(k for h in history for k in h if k not in _NOT_LOSSES):
        losses.plot(epochs, [h.get(key, float("nan")) for h in history], marker="o", label=key)
    losses.set(title="loss terms", xlabel="epoch")
    for key in ("train_accuracy", "test_accuracy", "monitor_robust_accuracy"):
        if key in history[0]:
            accuracy.plot(epochs, [h[key] for h in history], marker="o", label=key)
    accuracy.set(title="accuracy", xlabel="epoch", ylim=(0, 1))
    seconds.plot(epochs, [h["epoch_seconds"] for h in history], marker="o")
    seconds.set(title="epoch time", xlabel="epoch", ylabel="seconds")
    for ax in (losses, accuracy):
        ax.legend(fontsize="small")
    return _save(fig, path, title)
