"""Ilyas et al.'s robustified dataset D_R, the input of robust data training (method ``rdt``).

For each training image x, start from a random *other* training image x_r and minimise
``||g_T(x_r) - g_T(x)||_2`` over x_r with normalised-gradient L2 steps, clamped to [0, 1]; x_r keeps x's label.
The work is batched, shows a progress bar, and is resumable: finished batches are saved to a partial file, so an
interrupted run continues from its last save (at most ``save_every_s`` seconds of work are lost).

Its cost is counted as training's is (:mod:`rrm.train.flops`): the FLOPs of one batch, per image, times the training
images, stored as ``robustify_flops`` in the dataset's ``source``; ``rrm report`` adds them to rdt's cost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import os
import time
from pathlib import Path

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
) -> ImageData:
    """Write the robustified training split of ``data`` (test split unchanged) to ``out``; returns it."""
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
    check_writable(out)
    partial = out.with_name(out.name + ".partial.pt")
    settings = {"steps": steps, "step_size": step_size, "seed": seed, "from_digest": data.digest}
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
        target = to_float(as_tensor(data.train_x[idx])).to(device)
        begin = to_float(as_tensor(data.train_x[partners[idx]])).to(device)
        with FlopCounter() if flops_per_image is None else contextlib.nullcontext() as counter:
            result[idx] = match_features(teacher, begin, target, steps, step_size).cpu()
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
            match_features(
                teacher,
                to_float(as_tensor(data.train_x[partners[:1]])).to(device),
                to_float(as_tensor(data.train_x[:1])).to(device),
                steps,
                step_size,
            )
        flops_per_image = counter.get_total_flops()
    robust = dataclasses.replace(
        data,
        name=f"{data.name}-robust",
        train_x=result,
        test_x=as_tensor(data.test_x),  # a robustified set is one file, held in memory: shards read here
        source={
            "kind": "robustified",
            "from": data.name,
            "teacher": teacher_ref,
            **settings,
            "robustify_flops": flops_per_image * n,
        },
    )
    save_dataset(robust, out)
    partial.unlink(missing_ok=True)
    return robust
