"""Ilyas et al.'s robustified dataset D_R, the input of robust data training (method ``rdt``).

For each training image x, start from a random *other* training image x_r and minimise
``||g_T(x_r) - g_T(x)||_2`` over x_r with normalised-gradient L2 steps, clamped to [0, 1]; x_r keeps x's label.
The work is batched, shows a progress bar, and is resumable: finished batches are saved to a partial file, so an
interrupted run continues from its last save (at most ``save_every_s`` seconds of work are lost). With ``shards``
the output is a directory of shards (:mod:`rrm.data.shards`, float32 pixels), streamed one batch per shard: memory
holds one batch however large the dataset, and an interrupted run keeps its finished shards and resumes after them.

Its cost is counted as training's is (:mod:`rrm.train.flops`): the FLOPs of one batch, per image, times the training
images, stored as ``robustify_flops`` in the dataset's ``source``; ``rrm report`` adds them to rdt's cost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import numbers
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from rrm.data import ImageData, as_tensor, save_dataset, to_float
from rrm.errors import RRMError
from rrm.io import atomic_path, check_writable
from rrm.models import Classifier
from rrm.progress import Bar
from rrm.train.flops import FlopCounter


def _partners(n: int, seed: int) -> torch.Tensor:
    """For each index a random different index (a random non-zero cyclic offset per example)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.arange(n) + torch.randint(1, n, (n,), generator=g)) % n


def check_settings(steps: int, step_size: float, batch_size: int) -> None:
    """Raise :class:`RRMError` unless the feature-matching budget is usable: whole steps and batches, a finite step."""
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise RRMError(f"robustify needs {name} to be a whole number >= 1, got {value!r}")
    if (
        isinstance(step_size, bool)
        or not isinstance(step_size, numbers.Real)
        or not (math.isfinite(step_size) and step_size > 0)
    ):
        raise RRMError(f"robustify needs step_size to be a finite number > 0, got {step_size!r}; Ilyas et al. use 0.1")


def _resume(partial: Path, settings: dict, empty: torch.Tensor) -> tuple[int, torch.Tensor]:
    """``(images done, images)`` from the partial file of an interrupted run; ``(0, empty)`` if it was made with other
    settings (it is then overwritten). A damaged file is an error that says to delete it."""
    fix = f"delete {str(partial)!r} to start over (the work it holds is lost)"
    try:
        saved = torch.load(partial, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign files raise many types
        raise RRMError(f"the robustify resume file {str(partial)!r} is corrupt ({type(exc).__name__}); {fix}") from None
    if not isinstance(saved, dict) or not {"settings", "done", "images"} <= set(saved):
        raise RRMError(f"{str(partial)!r} is not a robustify resume file; {fix}")
    if saved["settings"] != settings:
        return 0, empty
    done, images = saved["done"], saved["images"]
    if not (
        isinstance(images, torch.Tensor)
        and images.shape == empty.shape
        and isinstance(done, int)
        and 0 <= done <= len(images)
    ):
        raise RRMError(f"the robustify resume file {str(partial)!r} is damaged (it does not fit this dataset); {fix}")
    return done, images.float()


def match_features(
    teacher: Classifier, start: torch.Tensor, target: torch.Tensor, steps: int, step_size: float
) -> torch.Tensor:
    """Move ``start`` so the teacher's features match those of ``target`` (normalised L2 gradient descent)."""
    with torch.no_grad():
        goal = teacher.features(target)
    x = start.clone()
    for _ in range(steps):
        x.requires_grad_(True)
        loss = (teacher.features(x) - goal).norm(dim=1).sum()
        (grad,) = torch.autograd.grad(loss, x)
        norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        x = (x.detach() - step_size * grad / norm).clamp(0, 1)
    return x.detach()


def _batch(
    teacher: Classifier, data: ImageData, partners: torch.Tensor, rows: torch.Tensor, settings: dict, device
) -> torch.Tensor:
    """The robustified images of training rows ``rows``, on the CPU."""
    target = to_float(as_tensor(data.train_x[rows])).to(device)
    begin = to_float(as_tensor(data.train_x[partners[rows]])).to(device)
    return match_features(teacher, begin, target, settings["steps"], settings["step_size"]).cpu()


def robustify(
    teacher: Classifier,
    data: ImageData,
    out: str | os.PathLike,
    *,
    steps: int = 1000,
    step_size: float = 0.1,
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device = "cpu",
    teacher_ref: str = "",
    progress: bool | None = None,
    save_every_s: float = 30.0,
    shards: bool = False,
) -> ImageData:
    """Write the robustified training split of ``data`` (test split unchanged) to ``out``, a file or with ``shards``
    a directory of shards; returns it."""
    check_settings(steps, step_size, batch_size)
    if len(data.train_y) < 2:
        raise RRMError("robustify needs at least two training images")
    spec = teacher.spec
    if (spec.get("in_channels"), spec.get("image_size"), spec.get("image_size")) != data.input_shape:
        raise RRMError(
            f"the teacher was built for {spec.get('in_channels')}x{spec.get('image_size')}px images but "
            f"{data.name!r} has {'x'.join(map(str, data.input_shape))}; use a teacher trained on it"
        )
    teacher = teacher.to(device).eval()
    teacher.requires_grad_(False)
    out = Path(out)
    settings = {"steps": steps, "step_size": step_size, "seed": seed, "from_digest": data.digest}
    if shards:
        return _stream(teacher, data, out, settings, batch_size, device, teacher_ref, progress)
    check_writable(out)
    partial = out.with_name(out.name + ".partial.pt")
    n = len(data.train_y)
    result = torch.empty(data.train_x.shape, dtype=torch.float32)
    done = 0
    if partial.exists():
        done, result = _resume(partial, settings, result)
    partners = _partners(n, seed)
    flops_per_image = None
    last_save = time.monotonic()
    bar = Bar(total=n, initial=done, desc="robustify", unit="img", disable=None if progress is None else not progress)
    for start in range(done, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        with FlopCounter() if flops_per_image is None else contextlib.nullcontext() as counter:
            result[idx] = _batch(teacher, data, partners, idx, settings, device)
        if flops_per_image is None:
            flops_per_image = counter.get_total_flops() / len(idx)
        done = int(idx[-1]) + 1
        if time.monotonic() - last_save > save_every_s or done == n:
            with atomic_path(partial) as tmp:
                torch.save({"settings": settings, "done": done, "images": result}, tmp)
            last_save = time.monotonic()
        bar.update(len(idx))
    bar.close()
    if flops_per_image is None:  # every batch was done before a resume: count one image
        with FlopCounter() as counter:
            _batch(teacher, data, partners, torch.arange(1), settings, device)
        flops_per_image = counter.get_total_flops()
    # a robustified set written as one file is held in memory: shards are read here
    robust = _robustified(data, result, as_tensor(data.test_x), teacher_ref, settings, flops_per_image)
    save_dataset(robust, out)
    partial.unlink(missing_ok=True)
    return robust


def _robustified(
    data: ImageData, train_x, test_x, teacher_ref: str, settings: dict, flops_per_image: float
) -> ImageData:
    """The robustified dataset: ``data`` with the new training images, its source saying how they were made."""
    return dataclasses.replace(
        data,
        name=f"{data.name}-robust",
        train_x=train_x,
        test_x=test_x,
        source={
            "kind": "robustified",
            "from": data.name,
            "teacher": teacher_ref,
            **settings,
            "robustify_flops": flops_per_image * len(data.train_y),
        },
    )


class _Computed:
    """Robustified training images computed when read (:class:`rrm.data.core.LazyImages`): what
    :func:`rrm.data.shard_writer.write_shards` streams into shards, one shard's rows in memory at a time."""

    dtype = torch.float32
    ndim = 4
    device = torch.device("cpu")

    def __init__(self, compute: Callable[[torch.Tensor], torch.Tensor], shape, identity: bytes, rows=None):
        self._compute, self._shape, self._identity = compute, tuple(shape), identity
        self.rows = np.arange(self._shape[0], dtype=np.int64) if rows is None else rows

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self._shape[1:]))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key) -> _Computed:
        return _Computed(self._compute, self._shape, self._identity, self.rows[key])

    def read(self, index=None, *, pin: bool = False) -> torch.Tensor:
        rows = self.rows if index is None else self.rows[np.asarray(index)]
        return self._compute(torch.from_numpy(rows))

    def fingerprint(self) -> bytes:
        """The teacher, the settings and the source data (the content, without computing it), and the rows."""
        return hashlib.sha256(self._identity + self.rows.tobytes()).digest()


def _stream(
    teacher: Classifier,
    data: ImageData,
    out: Path,
    settings: dict,
    batch_size: int,
    device: str | torch.device,
    teacher_ref: str,
    progress: bool | None,
) -> ImageData:
    """Robustify into a directory of shards, one batch a shard; finished shards of the same work are kept."""
    from rrm.data.shard_writer import write_shards

    n = len(data.train_y)
    partners = _partners(n, settings["seed"])

    with FlopCounter() as counter:  # one image's work, counted before any shard (the plan names the cost)
        _batch(teacher, data, partners, torch.arange(1), settings, device)
    bar = Bar(total=n, desc="robustify", unit="img", disable=None if progress is None else not progress)

    def computed(rows: torch.Tensor) -> torch.Tensor:
        x = _batch(teacher, data, partners, rows, settings, device)
        bar.update(len(rows))
        return x

    identity = json.dumps([teacher_ref, teacher.spec, settings], sort_keys=True, default=str).encode()
    images = _Computed(computed, data.train_x.shape, hashlib.sha256(identity).digest())
    robust = _robustified(data, images, data.test_x, teacher_ref, settings, counter.get_total_flops())
    with bar:
        return write_shards(robust, out, shard_images=batch_size, progress=False)
