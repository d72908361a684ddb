"""The one trainer every method runs in: same data pipeline, augmentation, optimiser, precision and timing.

Nothing here imports MLflow, DVC or Optuna: tracking and tuning attach through :class:`Callback`. Under
``torchrun`` the same function trains data-parallel (see :mod:`rrm.train.distributed`); callbacks run on rank 0 only.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from rrm.attacks import pgd
from rrm.config import resolve_device
from rrm.data import ImageData, as_tensor, batches, load_dataset
from rrm.errors import RRMError
from rrm.io import check_writable, ensure_dir, missing_parents, write_json
from rrm.metrics import accuracy
from rrm.models import Classifier, Teacher, build_model, load_teacher, save_model
from rrm.models.transplant import transplanted
from rrm.stats import epoch_time_stats
from rrm.train import distributed
from rrm.train.basics import (  # noqa: F401  (re-exported: the trainer's public names)
    CHECKPOINT,
    CHECKPOINT_FORMAT,
    METRICS,
    MODEL,
    Callback,
    TrainResult,
    epoch_line,
    load_checkpoint,
    lr_factor,
    progress_shown,
    save_checkpoint,
    seed_everything,
)
from rrm.train.config import TrainConfig
from rrm.train.flops import FlopCounter
from rrm.train.methods import Method, get_method
from rrm.train.overfitting import collapse_epoch


def resolved_precision(precision: str | None, method: type[Method] | Method, device: torch.device | str) -> str:
    """The autocast precision a run uses: ``precision``, or None for the method's default on ``device``."""
    if precision is not None:
        return precision
    return "fp16" if method.mixed_precision_on_gpu and torch.device(device).type == "cuda" else "fp32"


def resolved_schedule(schedule: str | None, method: type[Method] | Method) -> str:
    """The learning-rate schedule a run uses: ``schedule``, or None for the method's default."""
    return schedule or method.default_schedule


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % 2**63


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    output = _RunOutput(out_dir, ctx.is_main)
    try:
        return _train(cfg, method_cls, ctx, device, callbacks, data, teacher, output)
    except BaseException as exc:
        kept = output.clean_up()
        if kept and isinstance(exc, RRMError):
            raise RRMError(f"{exc}; {kept}") from None
        raise
    finally:
        distributed.teardown(ctx)


class _RunOutput:
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


def _train(
    cfg: TrainConfig,
    method_cls: type[Method],
    ctx: distributed.Context,
    device: torch.device,
    callbacks,
    data: ImageData | None,
    teacher: Teacher | Classifier | str | os.PathLike | None,
    output: _RunOutput,
) -> TrainResult:
    if cfg.sync_batchnorm and not (ctx.enabled and device.type == "cuda"):
        raise RRMError(
            "--sync-batchnorm needs torchrun with several processes on CUDA; without it each rank "
            "normalises with its own share of the batch (drop the flag)"
        )
    seed_everything(cfg.seed, cfg.deterministic)
    callbacks = callbacks if ctx.is_main else ()
    data = data if data is not None else load_dataset(cfg.dataset)
    if method_cls.needs_teacher or cfg.transplant:
        if teacher is None and not cfg.teacher:
            what = f"method {cfg.method!r}" if method_cls.needs_teacher else f"--transplant {cfg.transplant}"
            raise RRMError(f"{what} needs a teacher; pass --teacher <model file or models:/ URI>")
        # built here, after seeding, whatever it came from: a seeded student starts the same
        teacher = load_teacher(teacher if teacher is not None else cfg.teacher, device)
    method = method_cls(cfg, teacher if method_cls.needs_teacher else None)

    def build(**extra) -> Classifier:
        return build_model(cfg.model, **data.model_kwargs(), feature_dim=cfg.feature_dim, width=cfg.width, **extra)

    transplant = None
    if cfg.transplant:  # decided and checked before any training
        model, *transplant = transplanted(cfg.transplant, teacher, build, frozen=cfg.transplant_frozen)
        if ctx.is_main:
            hint = (
                "" if method.adversarial else "; alone it keeps little robustness: add --method fast to train the rest"
            )
            print(f"transplant: {transplant[0]} ({transplant[1]}){hint}", file=sys.stderr)
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
    (train_x, train_y), monitor = monitor_split(data, cfg.monitor_examples)
    if cfg.data_on_device and data.lazy:
        raise RRMError(
            f"--data-on-device copies the whole training set to the device, but {data.name!r} is read from shards "
            "batch by batch; drop --data-on-device"
        )
    if cfg.data_on_device:  # batches are then gathered on the device: no host-to-device copy per step
        train_x, train_y = train_x.to(device), train_y.to(device)

    passes = math.ceil(cfg.epochs / method.epochs_per_pass)
    steps_per_pass = math.ceil(len(train_y) / cfg.batch_size) * method.epochs_per_pass
    total_steps = passes * steps_per_pass
    schedule = resolved_schedule(cfg.schedule, method)
    # the method's own parameters (RRM's adapters) train with the model and are not saved with it
    params = [*model.parameters(), *method.parameters()]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda it: lr_factor(
            schedule, it / total_steps, it / steps_per_pass * method.epochs_per_pass, cfg.milestones, cfg.lr_gamma
        ),
    )
    precision = resolved_precision(cfg.precision, method, device)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")

    out_dir = output.path
    checkpoint_path = out_dir / CHECKPOINT
    history: list[dict] = []
    start = 0
    if (cfg.resume or cfg.resume_or_start) and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path, cfg)
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        method.load_state_dict(state.get("method", {}))
        history, start = state["history"], state["epoch"]
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        np.random.set_state(("MT19937", state["rng"]["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
        random.setstate((3, tuple(state["rng"]["python"]), None))

    shard_weight = 1.0  # this rank's share of the current global batch

    def step(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if ctx.enabled:
            distributed.reduce_gradients(params, shard_weight)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()

    for cb in callbacks:
        cb.on_train_start(cfg, data, model)
    output.open(start)  # after the callbacks started: an unreachable tracking server leaves no empty directory

    watch_co = method.single_step and cfg.monitor_examples > 0
    flops_per_image = monitor_flops = None
    before = None  # the weights at the end of the previous epoch, kept to undo a catastrophic overfit
    if history and history[-1].get("early_stopped"):
        start = passes  # an early-stopped run is finished
    show = ctx.is_main and progress_shown(cfg.progress)
    steps_per_epoch = math.ceil(len(train_y) / cfg.batch_size)
    # one bar over every step of the run, so that its ETA is the whole run's; a line is left after each epoch
    bar = tqdm(total=passes * steps_per_epoch, initial=start * steps_per_epoch, disable=not show, leave=False)
    for epoch in range(start, passes):
        if cfg.early_stop_on_co:
            before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        method.start_epoch(epoch)
        model.train()
        generator = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch))
        if ctx.enabled:  # attack starts differ between ranks and do not depend on where a run was resumed
            torch.manual_seed((_epoch_seed(cfg.seed, epoch) + 7919 * (ctx.rank + 1)) % 2**63)
        sums: dict[str, torch.Tensor] = {}
        seen = 0
        _sync(device)
        started = time.perf_counter()
        bar.set_description(f"{cfg.method} {epoch + 1}/{passes}", refresh=False)
        epoch_batches = batches(
            train_x,
            train_y,
            cfg.batch_size,
            shuffle=True,
            generator=generator,
            augment=data.augment,
            device=device,
            shard=(ctx.rank, ctx.world_size) if ctx.enabled else None,
        )
        for i, (xb, yb) in enumerate(epoch_batches):
            if cfg.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            n = len(yb)
            if ctx.enabled:  # weight by the share of the global batch: 0 for a stand-in example (see batches)
                n_global = min(cfg.batch_size, len(train_y) - i * cfg.batch_size)
                n = distributed.share(n_global, ctx)
                shard_weight = n / n_global
            counting = flops_per_image is None and len(yb) > 0  # count one real step, then multiply
            with (
                torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None),
                FlopCounter() if counting else contextlib.nullcontext() as counter,
            ):
                terms = method.train_batch(model, xb, yb, step)
            if counting:
                flops_per_image = counter.get_total_flops() / len(yb)
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
        metrics = {key: float(value) / float(seen) for key, value in sums.items()}
        if not math.isfinite(metrics["loss"]):
            raise RRMError(
                f"the training loss became {metrics['loss']} in epoch {epoch + 1} of {cfg.method!r}; "
                "lower --lr, or use --precision fp32"
            )
        metrics = {
            "epoch": epoch + 1,
            "paper_epochs": (epoch + 1) * method.epochs_per_pass,
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_seconds": epoch_seconds,
            # a pass over the data; this rank's count stands for every rank's (they run the same steps)
            "epoch_flops": flops_per_image * len(train_y),
            "train_accuracy": metrics.pop("correct"),
            **metrics,
        }
        if ctx.is_main:
            metrics["test_accuracy"] = accuracy(model, data.test_x, data.test_y, batch_size=512)  # reported only
            if cfg.monitor_examples:  # the monitor's passes are part of the run's cost: counted once, as the step's
                with FlopCounter() if monitor_flops is None else contextlib.nullcontext() as counter:
                    metrics["monitor_robust_accuracy"] = monitored_robust_accuracy(model, monitor, cfg)
                    if watch_co:
                        metrics["monitor_fgsm_accuracy"] = monitored_robust_accuracy(model, monitor, cfg, steps=1)
                if monitor_flops is None:
                    monitor_flops = counter.get_total_flops()
                metrics["monitor_flops"] = monitor_flops
        if ctx.enabled:  # rank 0 evaluated; every rank keeps the same history
            metrics = distributed.broadcast(metrics)
        history.append(metrics)
        collapsed = watch_co and collapse_epoch(history) == epoch + 1
        if collapsed:
            metrics["catastrophic_overfitting"] = True
        if collapsed and cfg.early_stop_on_co:  # Wong et al.: keep the model from before the collapse
            model.load_state_dict(before)
            metrics["early_stopped"] = True
        if ctx.is_main:
            save_checkpoint(checkpoint_path, model, method, optimizer, scheduler, scaler, epoch + 1, history, cfg)
            output.wrote(CHECKPOINT, epoch + 1)
        if show:
            tqdm.write(epoch_line(metrics, passes), file=sys.stderr)
        for cb in callbacks:
            cb.on_epoch_end(epoch + 1, metrics)
        if metrics.get("early_stopped"):
            break
    bar.close()

    model.eval()
    if cfg.compile:  # drop the compiled wrappers: the returned model and the caller's teacher are plain again
        for net in (model, teacher):
            if net is not None:
                net.__dict__.pop("features", None)
    summary = summarize(history, method.epochs_per_pass)
    summary.update(
        method=cfg.method,
        model=cfg.model,
        dataset=data.name,
        dataset_digest=data.digest,
        precision=precision,
        schedule=schedule,
        device=str(device),
        processes=ctx.world_size,
    )
    if transplant:  # a transplant learns from the teacher whatever the method: the report adds the teacher's cost
        summary["transplant"], summary["transplant_reason"] = transplant
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
    if ctx.is_main:
        save_model(model, out_dir / MODEL, meta)
        output.wrote(MODEL)
        write_json(out_dir / METRICS, summary)
        output.wrote(METRICS)
    result = TrainResult(model=model, config=cfg, history=history, summary=summary, out_dir=out_dir, data=data)
    for cb in callbacks:
        cb.on_train_end(result)
    return result


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
