"""Ilyas et al.'s robustified dataset D_R, the input of robust data training (method ``rdt``).

For each training image x, start from a random *other* training image x_r and minimise
``||g_T(x_r) - g_T(x)||_2`` over x_r with normalised-gradient L2 steps, clamped to [0, 1]; x_r keeps x's label.
The work is batched, shows a progress bar, and is resumable: finished batches are saved to a partial file, so an
interrupted run continues from its last save (at most ``save_every_s`` seconds of work are lost).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rrm.data import ImageData, save_dataset, to_float
from rrm.errors import RRMError
from rrm.io import atomic_path
from rrm.models import Classifier


def _partners(n: int, seed: int) -> torch.Tensor:
    """For each index a random different index (a random non-zero cyclic offset per example)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.arange(n) + torch.randint(1, n, (n,), generator=g)) % n


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
    if steps < 1 or step_size <= 0 or batch_size < 1:
        raise RRMError(f"robustify needs steps >= 1, step_size > 0, batch_size >= 1; got {steps}, {step_size}, "
                       f"{batch_size}")
    if len(data.train_y) < 2:
        raise RRMError("robustify needs at least two training images")
    spec = teacher.spec
    if (spec.get("in_channels"), spec.get("image_size"), spec.get("image_size")) != data.input_shape:
        raise RRMError(f"the teacher was built for {spec.get('in_channels')}x{spec.get('image_size')}px images but "
                       f"{data.name!r} has {'x'.join(map(str, data.input_shape))}; use a teacher trained on it")
    teacher = teacher.to(device).eval()
    teacher.requires_grad_(False)
    out = Path(out)
    partial = out.with_name(out.name + ".partial.pt")
    settings = {"steps": steps, "step_size": step_size, "seed": seed, "from_digest": data.digest}
    n = len(data.train_y)
    result = torch.empty(data.train_x.shape, dtype=torch.float32)
    done = 0
    if partial.exists():
        saved = torch.load(partial, map_location="cpu", weights_only=True)
        if saved.get("settings") == settings:
            done, result = saved["done"], saved["images"]
    partners = _partners(n, seed)
    last_save = time.monotonic()
    bar = tqdm(total=n, initial=done, desc="robustify", unit="img", disable=None if progress is None else not progress)
    for start in range(done, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        target = to_float(data.train_x[idx]).to(device)
        begin = to_float(data.train_x[partners[idx]]).to(device)
        result[idx] = match_features(teacher, begin, target, steps, step_size).cpu()
        done = int(idx[-1]) + 1
        if time.monotonic() - last_save > save_every_s or done == n:
            with atomic_path(partial) as tmp:
                torch.save({"settings": settings, "done": done, "images": result}, tmp)
            last_save = time.monotonic()
        bar.update(len(idx))
    bar.close()
    robust = dataclasses.replace(
        data, name=f"{data.name}-robust", train_x=result,
        source={"kind": "robustified", "from": data.name, "teacher": teacher_ref, **settings},
    )
    save_dataset(robust, out)
    partial.unlink(missing_ok=True)
    return robust
