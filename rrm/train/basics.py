"""What the trainer is made of besides its loop: callbacks and results, the run directory, devices and seeds, the
learning-rate schedules and checkpoints that resume a run exactly."""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import sys
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rrm.data import ImageData
from rrm.errors import RRMError
from rrm.io import atomic_path, ensure_dir, missing_parents
from rrm.models import Classifier
from rrm.stats import epoch_time_stats
from rrm.train.config import RUNTIME_OPTIONS, TrainConfig

CHECKPOINT_FORMAT = "rrm-checkpoint/1"
CHECKPOINT, MODEL, METRICS = "checkpoint.pt", "model.pt", "train_metrics.json"
# The run's numbers in METRICS' headline file (rrm.io.headline_path), the one DVC lists; timings stay in METRICS
HEADLINE = ("test_accuracy", "train_loss", "epochs", "total_flops")


class Callback:
    """Hooks for tracking and tuning; every method is optional. Raising from a hook stops training."""

    def on_train_start(self, cfg: TrainConfig, data: ImageData, model: Classifier) -> None: ...

    def on_epoch_end(self, epoch: int, metrics: dict) -> None: ...

    def on_train_end(self, result: TrainResult) -> None: ...


@dataclass
class TrainResult:
    model: Classifier
    config: TrainConfig
    history: list[dict]
    summary: dict
    out_dir: Path
    data: ImageData = field(repr=False)

    @property
    def model_path(self) -> Path:
        return self.out_dir / MODEL

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / METRICS


class RunOutput:
    """The run directory: made when training starts. A run that fails keeps its last good checkpoint (and what it
    wrote beside it), or else leaves the directory as it found it: the files that appeared in it during the run (a
    callback's too) are removed, and so are the directories the run created."""

    def __init__(self, path: Path, main: bool):
        self.path, self.main = path, main
        # taken before the callbacks start, which may write into the directory (MLflow's run file)
        self.made = missing_parents(path) if main else []  # the directories this run may create, innermost first
        self.before = {p.name for p in path.iterdir()} if main and path.is_dir() else set()
        self.written: list[str] = []  # files of a good epoch (or of the finished run) that this run wrote
        self.epoch = 0  # the epoch of the checkpoint on disk: saved by this run, or resumed from
        self.opened = False

    def open(self, resumed_epoch: int) -> None:
        self.epoch, self.opened = resumed_epoch, True
        if self.main:
            ensure_dir(self.path)

    def wrote(self, name: str, epoch: int | None = None) -> None:
        self.written = list(dict.fromkeys([*self.written, name]))
        self.epoch = epoch if epoch is not None else self.epoch

    def clean_up(self) -> str | None:
        """Undo what a failed run left; returns what it kept and why (None if it changed nothing on disk)."""
        if not self.main:
            return None
        if self.epoch:
            names = self.written or [CHECKPOINT]
            return (
                f"kept {', '.join(names)} in {str(self.path)!r} (epoch {self.epoch}, the last good one; --resume "
                "continues from it)"
            )
        changed, removed = self.opened, None
        with contextlib.suppress(OSError):  # never raise over the run's own error
            if self.path.is_dir() and self.path not in self.made:
                for new in sorted(p for p in self.path.iterdir() if p.name not in self.before and p.is_file()):
                    new.unlink()
                    changed = True
            for made in self.made:  # innermost first, and only while they are empty of anything else
                if not made.exists():
                    continue
                if made == self.path:
                    shutil.rmtree(made)
                else:
                    made.rmdir()
                changed, removed = True, made
        if not changed:
            return None
        where = f"; removed {str(removed)!r}, which this run had created" if removed is not None else ""
        return f"kept nothing (no epoch finished){where}"


def progress_shown(progress: bool | None) -> bool:
    """Whether a run shows its progress (the bar, a line per epoch): ``progress``, or None for when stderr is a
    terminal."""
    return progress if progress is not None else sys.stderr.isatty()


def start_line(cfg: TrainConfig) -> str:
    """What a run says before it loads anything, so that a command shows life before seconds of loading."""
    teacher = f", teacher {cfg.teacher}" if cfg.teacher else ""
    return f"training {cfg.method} {cfg.model} on {cfg.dataset} for {cfg.epochs} epochs{teacher}: loading"


# The per-epoch accuracies an epoch line shows where they were measured, with their labels.
_EPOCH_ACCURACIES = (
    ("test_accuracy", "test acc"),
    ("monitor_robust_accuracy", "monitor robust acc"),
    ("monitor_fgsm_accuracy", "monitor FGSM acc"),
)


def epoch_line(metrics: dict, passes: int) -> str:
    """The line left after epoch ``metrics["epoch"]`` of ``passes``: loss, accuracies (as fractions) and seconds."""
    measured = [f"{label} {metrics[key]:.4f}" for key, label in _EPOCH_ACCURACIES if key in metrics]
    flags = [
        label
        for key, label in (("catastrophic_overfitting", "catastrophic overfitting"), ("early_stopped", "early stopped"))
        if metrics.get(key)
    ]
    return ", ".join(
        [
            f"epoch {metrics['epoch']}/{passes}: loss {metrics['loss']:.4f}",
            f"train acc {metrics['train_accuracy']:.4f}",
            *measured,
            f"{metrics['epoch_seconds']:.1f} s",
            *flags,
        ]
    )


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # the call costs ~2.5 s (it imports torch's compiler config), so only when the setting changes
    if deterministic != torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic


def lr_factor(
    schedule: str, progress: float, epoch_progress: float, milestones: tuple[int, ...], gamma: float
) -> float:
    """The learning-rate multiplier at ``progress`` (fraction of all steps) / ``epoch_progress`` (in epochs)."""
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "cyclic":  # Wong et al.'s triangle: 0 -> peak at 2/5 of training -> 0
        return float(np.interp(progress, [0, 0.4, 1], [0, 1, 0]))
    if schedule == "step":
        return gamma ** bisect_right(sorted(milestones), epoch_progress)
    return 1.0


def save_checkpoint(path: Path, model, method, optimizer, scheduler, scaler, epoch: int, history: list, cfg) -> None:
    state = {
        "format": CHECKPOINT_FORMAT,
        "spec": model.spec,
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "method": method.state_dict(),
        "epoch": epoch,
        "history": history,
        "config": cfg.to_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
            "python": list(random.getstate()[1]),
        },
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, cfg: TrainConfig) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign files raise many types
        raise RRMError(f"checkpoint {str(path)!r} is corrupt ({type(exc).__name__}); delete it to start over") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise RRMError(f"{str(path)!r} is not an rrm training checkpoint; delete it to start over")
    saved = {k: v for k, v in state["config"].items() if k not in (*RUNTIME_OPTIONS, "epochs")}
    now = {k: v for k, v in cfg.to_dict().items() if k in saved}
    changed = sorted(
        k
        for k in saved
        if saved[k] != now[k] and not (isinstance(saved[k], (list, tuple)) and list(saved[k]) == list(now[k] or []))
    )
    if changed:
        raise RRMError(
            f"checkpoint {str(path)!r} was written with other settings ({', '.join(changed)}); "
            "use the same settings to resume, or another --out-dir"
        )
    return state


def summarize(history: list[dict], epochs_per_pass: int = 1) -> dict:
    """Final metrics and the paper's epoch-time statistics (Free AT's passes counted as its replays)."""
    last = history[-1]
    kept = history[-2] if last.get("early_stopped") else last  # the weights kept are those of the epoch before
    summary = {
        **epoch_time_stats([h["epoch_seconds"] for h in history], epochs_per_pass),
        "test_accuracy": kept["test_accuracy"],
        "train_loss": kept["loss"],
    }
    summary["total_flops"] = sum(h.get("epoch_flops", 0) + h.get("monitor_flops", 0) for h in history)
    summary["flops_per_epoch"] = summary["total_flops"] / summary["epochs"]  # paper epochs, as epoch_seconds
    if "monitor_robust_accuracy" in kept:
        summary["monitor_robust_accuracy"] = kept["monitor_robust_accuracy"]
    collapsed = [h["epoch"] for h in history if h.get("catastrophic_overfitting")]
    if collapsed:
        summary["catastrophic_overfitting_epoch"] = collapsed[0]
    if last.get("early_stopped"):
        summary["early_stopped_at_epoch"] = last["epoch"]
    return summary
