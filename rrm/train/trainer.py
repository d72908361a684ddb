"""The one trainer every method runs in: same data pipeline, augmentation, optimiser, precision and timing.

Nothing here imports MLflow, DVC or Optuna: tracking and tuning attach through :class:`Callback`. Under
``torchrun`` the same function trains data-parallel (see :mod:`rrm.train.distributed`); callbacks run on rank 0 only.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from rrm.config import resolve_device
from rrm.data import ImageData, batches, load_dataset
from rrm.errors import RRMError
from rrm.io import check_writable, headline_path, write_json
from rrm.metrics import accuracy
from rrm.models import Classifier, Teacher, save_model
from rrm.progress import Bar
from rrm.train import distributed
from rrm.train.basics import (  # noqa: F401  (re-exported: the trainer's public names)
    CHECKPOINT,
    CHECKPOINT_FORMAT,
    HEADLINE,
    METRICS,
    MODEL,
    Callback,
    RunOutput,
    TrainResult,
    epoch_line,
    load_checkpoint,
    lr_factor,
    progress_shown,
    save_checkpoint,
    seed_everything,
    summarize,
)
from rrm.train.config import TrainConfig
from rrm.train.flops import FlopCounter
from rrm.train.methods import Method, get_method
from rrm.train.monitor import monitored_robust_accuracy
from rrm.train.overfitting import collapse_epoch
from rrm.train.setup import build_student, run_teacher, training_split
from rrm.train.strategy import resolved_precision, resolved_schedule


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % 2**63


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(
    cfg: TrainConfig,
    *,
    callbacks: tuple[Callback, ...] | list[Callback] = (),
    data: ImageData | None = None,
    teacher: Teacher | Classifier | str | os.PathLike | None = None,
) -> TrainResult:
    """Train ``cfg.model`` with ``cfg.method``; writes checkpoint, model and metrics under ``cfg.out_dir``.

    ``data`` and ``teacher`` may be passed in already loaded (tests, tuning); otherwise they are loaded from
    ``cfg.dataset`` and ``cfg.teacher``. ``teacher`` may also be a model file to load in place of ``cfg.teacher``
    (a registry teacher pulled by the caller, which keeps ``cfg.teacher`` as the URI it records); a file is loaded
    after seeding, as ``cfg.teacher`` is, so a student's initialisation does not depend on where its teacher came
    from. Started by ``torchrun`` with several processes, every process calls this
    and they train data-parallel with ``cfg.batch_size`` as the global batch; only rank 0 writes files and runs
    ``callbacks``, and every rank returns the same result.
    """
    cfg.validate()
    method_cls = get_method(cfg.method)  # an unknown method fails before any process group is joined
    out_dir = Path(cfg.out_dir)
    if cfg.resume and not cfg.resume_or_start and not (out_dir / CHECKPOINT).is_file():
        raise RRMError(
            f"--resume: there is no checkpoint in {str(out_dir)!r} to resume; drop --resume to start a new "
            "run there, or pass --resume-or-start to resume when there is one and start afresh otherwise"
        )
    check_writable(out_dir, directory=True)  # creates nothing: the directory is made once training starts
    ctx, device = distributed.setup(resolve_device(cfg.device), cfg.batch_size)
    output = RunOutput(out_dir, ctx.is_main)
    try:
        return _train(cfg, method_cls, ctx, device, callbacks, data, teacher, output)
    except BaseException as exc:
        kept = output.clean_up()
        if kept and isinstance(exc, RRMError):
            raise RRMError(f"{exc}; {kept}") from None
        if kept and isinstance(exc, KeyboardInterrupt):  # Ctrl-C or SIGTERM: the command line says what was kept
            exc.kept = kept
        raise
    finally:
        distributed.teardown(ctx)


def _train(
    cfg: TrainConfig,
    method_cls: type[Method],
    ctx: distributed.Context,
    device: torch.device,
    callbacks,
    data: ImageData | None,
    teacher: Teacher | Classifier | str | os.PathLike | None,
    output: RunOutput,
) -> TrainResult:
    """A run in four steps: set up (:class:`_Run`), resume from a checkpoint, train epoch by epoch, finish."""
    run = _Run(cfg, method_cls, ctx, device, data, teacher)
    callbacks = callbacks if ctx.is_main else ()
    start = run.resume(output.path / CHECKPOINT)
    for cb in callbacks:
        cb.on_train_start(cfg, run.data, run.model)
    output.open(start)  # after the callbacks started: an unreachable tracking server leaves no empty directory
    if run.history and run.history[-1].get("early_stopped"):
        start = run.passes  # an early-stopped run is finished
    show = ctx.is_main and progress_shown(cfg.progress)
    steps_per_epoch = math.ceil(len(run.train_y) / cfg.batch_size)
    # one bar over every step of the run, so that its ETA is the whole run's; a line is left after each epoch
    bar = Bar(  # hidden (progress off, or not a terminal): a line a minute from the main process
        total=run.passes * steps_per_epoch,
        initial=start * steps_per_epoch,
        disable=not show,
        heartbeat=ctx.is_main,
        leave=False,
    )
    for epoch in range(start, run.passes):
        metrics = run.epoch(epoch, bar, show)
        if ctx.is_main:
            run.save_checkpoint(output.path / CHECKPOINT, epoch + 1)
            output.wrote(CHECKPOINT, epoch + 1)
        if show:
            Bar.write(epoch_line(metrics, run.passes), file=sys.stderr)
        for cb in callbacks:
            cb.on_epoch_end(epoch + 1, metrics)
        if metrics.get("early_stopped"):
            break
    bar.close()
    return run.finish(output, callbacks)


class _Run:
    """One training run: what its set-up built (data, teacher, model, method, optimiser) and what it has trained
    (``history``), read and advanced by :func:`_train`'s steps."""

    def __init__(
        self,
        cfg: TrainConfig,
        method_cls: type[Method],
        ctx: distributed.Context,
        device: torch.device,
        data: ImageData | None,
        teacher: Teacher | Classifier | str | os.PathLike | None,
    ):
        """Set-up: seed, then the data, the teacher, the method, the model (or the transplant) and the optimiser.

        Their order is the order in which they draw random numbers, which a seeded run repeats exactly.
        """
        if cfg.sync_batchnorm and not (ctx.enabled and device.type == "cuda"):
            raise RRMError(
                "--sync-batchnorm needs torchrun with several processes on CUDA; without it each rank "
                "normalises with its own share of the batch (drop the flag)"
            )
        self.cfg, self.ctx, self.device = cfg, ctx, device
        seed_everything(cfg.seed, cfg.deterministic)
        self.data = data if data is not None else load_dataset(cfg.dataset)
        self.teacher = run_teacher(cfg, method_cls, teacher, device)
        self.method = method_cls(cfg, self.teacher if method_cls.needs_teacher else None)
        self.model, self.teacher, self.transplant = build_student(
            cfg, ctx, device, self.data, self.method, self.teacher
        )
        (self.train_x, self.train_y), self.monitor = training_split(cfg, self.data, device)
        self._build_optimiser()
        self.history: list[dict] = []
        self.watch_co = self.method.single_step and cfg.monitor_examples > 0
        # counted once (a real training step, the monitor's passes), then multiplied
        self.flops_per_image: float | None = None
        self.monitor_flops: float | None = None
        self.before: dict | None = None  # the weights at the end of the previous epoch, to undo a catastrophic overfit
        self.shard_weight = 1.0  # this rank's share of the current global batch

    def _build_optimiser(self) -> None:
        """SGD over the model's and the method's parameters, the learning-rate schedule, precision and loss scaler."""
        cfg, method, device = self.cfg, self.method, self.device
        self.passes = math.ceil(cfg.epochs / method.epochs_per_pass)
        steps_per_pass = math.ceil(len(self.train_y) / cfg.batch_size) * method.epochs_per_pass
        total_steps = self.passes * steps_per_pass
        self.schedule = schedule = resolved_schedule(cfg.schedule, method)
        # the method's own parameters (RRM's adapters) train with the model and are not saved with it
        self.params = [*self.model.parameters(), *method.parameters()]
        self.optimizer = torch.optim.SGD(self.params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda it: lr_factor(
                schedule, it / total_steps, it / steps_per_pass * method.epochs_per_pass, cfg.milestones, cfg.lr_gamma
            ),
        )
        self.precision = resolved_precision(cfg.precision, method, device)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16" and device.type == "cuda")

    def resume(self, checkpoint_path: Path) -> int:
        """Continue from ``checkpoint_path`` when the run resumes and it exists: weights, optimiser, schedule, the
        method's state, history and every random generator. Returns the pass to start from."""
        cfg = self.cfg
        if not ((cfg.resume or cfg.resume_or_start) and checkpoint_path.exists()):
            return 0
        state = load_checkpoint(checkpoint_path, cfg)
        self.model.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.method.load_state_dict(state.get("method", {}))
        self.history = state["history"]
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        np.random.set_state(("MT19937", state["rng"]["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
        random.setstate((3, tuple(state["rng"]["python"]), None))
        return state["epoch"]

    def step(self, loss: torch.Tensor) -> None:
        """Back-propagate ``loss`` and take one optimiser and scheduler step (the methods' ``StepFn``)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.ctx.enabled:
            distributed.reduce_gradients(self.params, self.shard_weight)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    def epoch(self, epoch: int, bar: Bar, show: bool) -> dict:
        """One pass over the training data (0-based ``epoch``), then the epoch's measurements; returns its metrics,
        appended to ``history``."""
        cfg, ctx, device, model, method = self.cfg, self.ctx, self.device, self.model, self.method
        if cfg.early_stop_on_co:
            self.before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        method.start_epoch(epoch)
        model.train()
        generator = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch))
        if ctx.enabled:  # attack starts differ between ranks and do not depend on where a run was resumed
            torch.manual_seed((_epoch_seed(cfg.seed, epoch) + 7919 * (ctx.rank + 1)) % 2**63)
        sums: dict[str, torch.Tensor] = {}
        seen = 0
        _sync(device)
        started = time.perf_counter()
        bar.set_description(f"{cfg.method} {epoch + 1}/{self.passes}", refresh=False)
        epoch_batches = batches(
            self.train_x,
            self.train_y,
            cfg.batch_size,
            shuffle=True,
            generator=generator,
            augment=self.data.augment,
            device=device,
            shard=(ctx.rank, ctx.world_size) if ctx.enabled else None,
        )
        for i, (xb, yb) in enumerate(epoch_batches):
            if cfg.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            n = len(yb)
            if ctx.enabled:  # weight by the share of the global batch: 0 for a stand-in example (see batches)
                n_global = min(cfg.batch_size, len(self.train_y) - i * cfg.batch_size)
                n = distributed.share(n_global, ctx)
                self.shard_weight = n / n_global
            counting = self.flops_per_image is None and len(yb) > 0  # count one real step, then multiply
            with (
                torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None),
                FlopCounter() if counting else contextlib.nullcontext() as counter,
            ):
                terms = method.train_batch(model, xb, yb, self.step)
            if counting:
                self.flops_per_image = counter.get_total_flops() / len(yb)
            seen += n
            # Sums stay on the device (no host sync in the step); read once per epoch.
            for key, value in terms.items():
                if key != "logits":
                    sums[key] = sums.get(key, 0) + value.detach().float() * n
            sums["correct"] = sums.get("correct", 0) + (terms["logits"].detach().argmax(1) == yb).sum() * (n > 0)
            if show and i % 20 == 0:  # reading them waits for the device: every 20 steps only
                bar.set_postfix(loss=f"{terms['loss'].item():.3f}", acc=f"{float(sums['correct']) / max(seen, 1):.3f}")
            bar.update()
        _sync(device)
        epoch_seconds = time.perf_counter() - started
        if ctx.enabled:  # the global batch's loss terms and accuracy, as one process would report them
            sums = distributed.sum_tensors({**sums, "seen": torch.tensor(float(seen), device=device)})
            seen = sums.pop("seen")
            distributed.average_batchnorm_stats(model, ctx)
        return self._measure(epoch, {key: float(value) / float(seen) for key, value in sums.items()}, epoch_seconds)

    def _measure(self, epoch: int, means: dict[str, float], epoch_seconds: float) -> dict:
        """The epoch's metrics: its training means, test accuracy and the monitor's robust accuracy (rank 0 measures,
        every rank keeps the same history); a catastrophic overfit is flagged, and undone with ``early_stop_on_co``."""
        cfg, model = self.cfg, self.model
        if not math.isfinite(means["loss"]):
            raise RRMError(
                f"the training loss became {means['loss']} in epoch {epoch + 1} of {cfg.method!r}; "
                "lower --lr, or use --precision fp32"
            )
        metrics = {
            "epoch": epoch + 1,
            "paper_epochs": (epoch + 1) * self.method.epochs_per_pass,
            "lr": self.optimizer.param_groups[0]["lr"],
            "epoch_seconds": epoch_seconds,
            # a pass over the data; this rank's count stands for every rank's (they run the same steps)
            "epoch_flops": self.flops_per_image * len(self.train_y),
            "train_accuracy": means.pop("correct"),
            **means,
        }
        if self.ctx.is_main:
            metrics["test_accuracy"] = accuracy(model, self.data.test_x, self.data.test_y, batch_size=512)  # reported
            if cfg.monitor_examples:  # the monitor's passes are part of the run's cost: counted once, as the step's
                with FlopCounter() if self.monitor_flops is None else contextlib.nullcontext() as counter:
                    metrics["monitor_robust_accuracy"] = monitored_robust_accuracy(model, self.monitor, cfg)
                    if self.watch_co:
                        metrics["monitor_fgsm_accuracy"] = monitored_robust_accuracy(model, self.monitor, cfg, steps=1)
                if self.monitor_flops is None:
                    self.monitor_flops = counter.get_total_flops()
                metrics["monitor_flops"] = self.monitor_flops
        if self.ctx.enabled:  # rank 0 evaluated; every rank keeps the same history
            metrics = distributed.broadcast(metrics)
        self.history.append(metrics)
        collapsed = self.watch_co and collapse_epoch(self.history) == epoch + 1
        if collapsed:
            metrics["catastrophic_overfitting"] = True
        if collapsed and cfg.early_stop_on_co:  # Wong et al.: keep the model from before the collapse
            model.load_state_dict(self.before)
            metrics["early_stopped"] = True
        return metrics

    def save_checkpoint(self, path: Path, epoch: int) -> None:
        """Everything :meth:`resume` reads, after ``epoch`` passes."""
        save_checkpoint(
            path, self.model, self.method, self.optimizer, self.scheduler, self.scaler, epoch, self.history, self.cfg
        )

    def finish(self, output: RunOutput, callbacks) -> TrainResult:
        """The trained model in eval mode, its summary, and (rank 0) the model and metrics files beside the
        checkpoint; the callbacks see the result."""
        cfg, model, data, teacher = self.cfg, self.model, self.data, self.teacher
        model.eval()
        if cfg.compile:  # drop the compiled wrappers: the returned model and the caller's teacher are plain again
            for net in (model, teacher):
                if net is not None:
                    net.__dict__.pop("features", None)
        summary = summarize(self.history, self.method.epochs_per_pass)
        summary.update(
            method=cfg.method,
            model=cfg.model,
            dataset=data.name,
            dataset_digest=data.digest,
            precision=self.precision,
            schedule=self.schedule,
            device=str(self.device),
            processes=self.ctx.world_size,
            # CPU float sums are ordered by torch's thread count: the same seed gives the same weights only with it
            threads=torch.get_num_threads(),
        )
        if self.transplant:  # a transplant learns from the teacher whatever the method: the report adds its cost
            summary["transplant"], summary["transplant_reason"] = self.transplant
        meta = {
            "method": cfg.method,
            "model": cfg.model,
            "dataset": data.name,
            "dataset_digest": data.digest,
            "norm": cfg.norm,
            "eps": cfg.eps,
            "teacher": cfg.teacher,
            "feature_dim": model.feature_dim,
            "config": cfg.to_dict(),
            "summary": summary,
        }
        if self.ctx.is_main:
            save_model(model, output.path / MODEL, meta)
            output.wrote(MODEL)
            write_json(output.path / METRICS, summary)
            write_json(headline_path(output.path / METRICS), {k: summary[k] for k in HEADLINE if k in summary})
            output.wrote(METRICS)
        result = TrainResult(
            model=model, config=cfg, history=self.history, summary=summary, out_dir=output.path, data=data
        )
        for cb in callbacks:
            cb.on_train_end(result)
        return result
