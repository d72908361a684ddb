"""Data-parallel training across processes started by ``torchrun``: the same trainer, config and command line.

``torchrun --nproc-per-node N -m rrm.cli train ...`` (or ``python -m torch.distributed.run``) starts N processes
with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in their environment; :func:`setup` joins them into one process
group (gloo on CPU, NCCL on CUDA, each process on ``cuda:LOCAL_RANK``).

Semantics, chosen so that a run on N processes follows the trajectory of a single process:

- ``batch_size`` is the *global* batch. Every rank draws the same shuffled order (the (seed, epoch) generator) and
  takes its contiguous share of each global batch (:func:`rrm.data.core.shard_bounds`), augmented exactly as the
  whole batch would be.
  ``batch_size`` must be divisible by the world size.
- After each backward the gradients of all ranks are summed in one ``all_reduce`` of a flat buffer, each rank's
  weighted by its share of the global batch (``n_rank / n_global``: 1/N for full batches, exact for a short last
  batch too). A method's loss is a mean over its batch, so the result is the gradient of the global batch's loss.
- BatchNorm normalises with per-rank batch statistics (as torch's DDP does); running statistics are averaged across
  ranks after each epoch, before evaluation and checkpoint. ``sync_batchnorm`` (CUDA only) uses global statistics.
  Models without BatchNorm match single-process training up to floating-point summation order.
- Only rank 0 evaluates, writes checkpoints and the model, shows progress bars and runs callbacks (MLflow runs,
  tuning hooks); its epoch metrics, reduced over all ranks, are broadcast to the others.
- Random draws inside a step (attack starts) come from a generator seeded per (seed, epoch, rank), so ranks draw
  different noise and a resumed run draws what the uninterrupted one drew.

Why a manual all-reduce and not :class:`torch.nn.parallel.DistributedDataParallel`: DDP synchronises gradients
from hooks fired by ``forward`` on the wrapper, but the methods call ``model.features`` and ``model.head``
directly, attacks run extra forward/backward passes on the model (each of which would trigger or confuse DDP's
reducer), Free AT takes several optimiser steps per batch, and KDIGA differentiates twice. One explicit reduction
between ``backward`` and ``optimizer.step`` is correct for all of them; it gives up DDP's overlap of communication
with the backward pass, which matters little at the model sizes this project trains.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rrm.data.core import shard_bounds
from rrm.errors import RRMError

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank among ``world_size`` processes and whether it owns the process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Context()


def is_main() -> bool:
    """Whether this process is rank 0 (or not started by torchrun): the one that prints and writes."""
    return int(os.environ.get("RANK", "0")) == 0


def launched() -> bool:
    """Whether this process was started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device, batch_size: int) -> tuple[Context, torch.device]:
    """Join the torchrun process group (or use one the caller initialised); returns the context and this rank's
    device. Without torchrun (or with one process) this is a no-op."""
    if not dist.is_available() or not (dist.is_initialized() or launched()):
        return SINGLE, device
    missing = [k for k in ENV if k not in os.environ]
    if missing and not dist.is_initialized():
        raise RRMError(
            f"WORLD_SIZE is set but {', '.join(missing)} is not; start distributed training with "
            "`torchrun --nproc-per-node N -m rrm.cli train ...`"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
        )
    ctx = Context(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, owns_group=owns)
    if batch_size % ctx.world_size:
        teardown(ctx)
        raise RRMError(
            f"batch_size {batch_size} is the global batch and must be divisible by the {ctx.world_size} "
            f"processes; use --batch-size {batch_size - batch_size % ctx.world_size or ctx.world_size}"
        )
    return ctx, device


def teardown(ctx: Context) -> None:
    """Leave the process group if :func:`setup` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def share(n: int, ctx: Context) -> int:
    """How many examples of a global batch of ``n`` this rank trains on (0 for some ranks of a short last batch)."""
    start, stop = shard_bounds(n, ctx.rank, ctx.world_size)
    return stop - start


def _sum_over_ranks(tensors: list[torch.Tensor], scale: float) -> None:
    """Replace each tensor by the sum over ranks of ``scale`` times it: one all-reduce of one flat float buffer."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors]).mul_(scale)
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def reduce_gradients(params: list[torch.nn.Parameter], weight: float) -> None:
    """Replace every gradient by the sum over ranks of ``weight`` times it (``weight``: the rank's batch share)."""
    _sum_over_ranks([p.grad for p in params if p.grad is not None], weight)


def sum_tensors(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum a dict of scalar tensors over ranks in one all-reduce (every rank must pass the same keys)."""
    keys = sorted(values)
    flat = torch.stack([values[k].float().reshape(()) for k in keys])
    dist.all_reduce(flat)
    return dict(zip(keys, flat))


def average_batchnorm_stats(model: torch.nn.Module, ctx: Context) -> None:
    """Average BatchNorm running means and variances over ranks (they saw different shards)."""
    _sum_over_ranks(
        [
            b
            for m in model.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            for b in (m.running_mean, m.running_var)
            if b is not None
        ],
        1 / ctx.world_size,
    )


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Make every rank start from rank 0's weights and buffers (one broadcast per tensor; once per run)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)


def broadcast(value: object) -> object:
    """Rank 0's ``value`` on every rank (a picklable object: epoch metrics)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
