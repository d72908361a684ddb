"""Writing a sharded dataset (the format is :mod:`rrm.data.shards`): images decoded in worker processes, each shard
written atomically and the manifest last, so an interrupted prepare resumes from its finished shards."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import re
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save

from rrm.data.core import ImageData, LazyImages
from rrm.data.shards import DTYPES, MANIFEST, SHARD_NAME, SHARDS_FORMAT, SPLITS, assemble, open_shard, shard_name
from rrm.errors import RRMError
from rrm.io import atomic_path, check_writable, ensure_dir, sha256_file
from rrm.progress import Bar

# Shards of about this size: large enough for few files and sequential reads, small enough that an interrupted
# prepare loses little and every worker gets several.
SHARD_BYTES = 32 << 20


@dataclass(frozen=True)
class _Task:
    """One shard to write: its images as files to decode (``paths``), or as pixels: an array in memory or lazy
    images (:class:`rrm.data.core.LazyImages`), read (or computed) only when the shard is written."""

    path: Path
    labels: np.ndarray
    image_size: int = 0
    paths: tuple[str, ...] = ()
    pixels: np.ndarray | LazyImages | None = None
    dtype: str = "uint8"  # a rrm.data.shards.DTYPES key: the pixel type of its split


def _write_shard(task: _Task) -> str:
    """Decode (or take) the task's images, write its shard atomically and return the file's sha256."""
    if task.pixels is None:
        from rrm.data.decode import decode_image

        x = np.empty((len(task.paths), 3, task.image_size, task.image_size), dtype=np.uint8)
        for i, path in enumerate(task.paths):
            x[i] = decode_image(path, task.image_size).numpy()
    else:
        x = task.pixels.read().numpy() if isinstance(task.pixels, LazyImages) else task.pixels
    # safetensors writes an array's buffer as it lies in memory, whatever its strides: C order first
    blob = save({"x": np.ascontiguousarray(x), "y": np.ascontiguousarray(task.labels, dtype=np.int64)})
    with atomic_path(task.path) as tmp:
        tmp.write_bytes(blob)
    return hashlib.sha256(blob).hexdigest()


def _finished(task: _Task, image_shape: tuple[int, ...]) -> str | None:
    """The sha256 of the task's shard if a run before this one wrote it whole with these labels; else None."""
    if not task.path.is_file():
        return None
    try:
        _, labels = open_shard(task.path, len(task.labels), image_shape, "", task.dtype)
    except RRMError:
        return None
    return sha256_file(task.path) if np.array_equal(labels, task.labels) else None


def _worker_init() -> None:
    torch.set_num_threads(1)  # parallelism is across processes; a thread pool per worker would oversubscribe


def check_counts(workers: int | None, shard_images: int | None) -> None:
    """Reject a worker count or shard size below one, before any image is loaded."""
    for name, value in (("workers", workers), ("shard_images", shard_images)):
        if value is not None and value < 1:
            raise RRMError(f"{name} must be at least 1, got {value}")


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def write_shards(
    source,
    out: str | os.PathLike,
    *,
    workers: int | None = None,
    shard_images: int | None = None,
    progress: bool | None = None,
) -> ImageData:
    """Write ``source`` as a sharded dataset in directory ``out``; returns it, opened (lazily).

    ``source`` is an :class:`ImageData` of uint8 or float32 images, in memory or lazy (read, or computed, one shard
    at a time as it is written), or a :class:`rrm.data.folders.FolderPlan`, whose images ``workers`` processes
    decode (all CPUs by default). Each
    shard is written atomically and the manifest last, so an interrupted prepare leaves only whole shards: run again
    with the same arguments, it keeps them and writes the rest. Other arguments start over. ``shard_images``
    (images per shard) defaults to about :data:`SHARD_BYTES` a shard; with the images it fixes the files and so the
    digest, which the worker count does not change.
    """
    from rrm.data.folders import FolderPlan

    check_counts(workers, shard_images)
    workers = default_workers() if workers is None else workers
    out = Path(out)
    check_writable(out, directory=True)
    foreign = [p.name for p in out.iterdir() if not _ours(p)] if out.is_dir() else []
    if foreign:
        raise RRMError(
            f"{str(out)!r} holds files that are not shards ({', '.join(sorted(foreign)[:3])}); choose a "
            "new or empty directory for the shards"
        )
    dtypes = {split: "uint8" for split in SPLITS}
    if isinstance(source, FolderPlan):
        image_shape = (3, source.image_size, source.image_size)
        splits = {
            split: ([p for p, _ in samples], np.array([label for _, label in samples], dtype=np.int64))
            for split, samples in (("train", source.train), ("test", source.test))
        }
        plan_of = json.dumps([[str(p), label] for samples in (source.train, source.test) for p, label in samples])
    elif isinstance(source, ImageData):
        for images in (source.train_x, source.test_x):
            if images.dtype not in (torch.uint8, torch.float32):
                raise RRMError(
                    f"{source.name!r} holds {images.dtype} images; shards hold uint8 or float32, so write this "
                    "dataset as one file (drop --shards)"
                )
        image_shape = source.input_shape
        dtypes = {"train": _dtype_name(source.train_x.dtype), "test": _dtype_name(source.test_x.dtype)}
        splits = {
            "train": (_pixels(source.train_x), source.train_y.numpy()),
            "test": (_pixels(source.test_x), source.test_y.numpy()),
        }
        plan_of = source.digest
    else:
        raise TypeError(f"write_shards takes ImageData or FolderPlan, not {type(source).__name__}")
    per_shard = shard_images or max(1, SHARD_BYTES // math.prod(image_shape))  # uint8 rows: a float32 shard is 4x
    meta = {"name": source.name, "classes": list(source.classes), "augment": source.augment, "source": source.source}
    plan = hashlib.sha256(json.dumps([meta, image_shape, per_shard, plan_of], sort_keys=True).encode()).hexdigest()
    tasks: dict[str, list[_Task]] = {}
    for split, (images, labels) in splits.items():
        tasks[split] = []
        for index, start in enumerate(range(0, len(labels), per_shard)):
            chunk = slice(start, start + per_shard)
            path = out / shard_name(split, index)
            if isinstance(source, FolderPlan):
                tasks[split].append(_Task(path, labels[chunk], source.image_size, paths=tuple(images[chunk])))
            else:
                tasks[split].append(_Task(path, labels[chunk], pixels=images[chunk], dtype=dtypes[split]))
    _start_or_resume(out, plan, {t.path.name for split in SPLITS for t in tasks[split]})
    try:
        digests = _run_tasks([t for split in SPLITS for t in tasks[split]], image_shape, workers, progress, source.name)
    except RRMError as exc:
        kept = sum(1 for p in out.iterdir() if SHARD_NAME.match(p.name))
        raise RRMError(
            f"{exc}; the {kept} finished shards stay in {str(out)!r}, and the same command run again resumes from them"
        ) from None
    manifest = {
        "format": SHARDS_FORMAT,
        **meta,
        "image_shape": list(image_shape),
        "plan": plan,
        "splits": {
            split: [{"file": t.path.name, "images": len(t.labels), "sha256": digests[t.path]} for t in tasks[split]]
            for split in SPLITS
        },
        "mean": list(source.mean),
        "std": list(source.std),
    }
    if set(dtypes.values()) != {"uint8"}:  # a prepared photograph set's manifest stays as it was
        manifest["dtypes"] = dtypes
    data = assemble(out, manifest)  # without statistics, ImageData computes them as in memory: first training images
    manifest.update(mean=list(data.mean), std=list(data.std), digest=data.digest)
    with atomic_path(out / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    (out / _PLAN).unlink(missing_ok=True)
    return data


# Written while a prepare runs: the plan its shards belong to (the manifest keeps it once finished).
_PLAN = ".prepare-plan"


# rrm.io.atomic_path's temporary files of a shard, the manifest or the plan
_TEMPORARY = re.compile(r"^\.((train|test)-\d{5}\.safetensors|dataset\.json|\.prepare-plan)\.\d+\.tmp$")


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, (torch_dtype, *_) in DTYPES.items() if torch_dtype == dtype)


def _pixels(images) -> np.ndarray | LazyImages:
    """What a task takes of a split's images: lazy ones as they are (each shard reads or computes its rows)."""
    return images if isinstance(images, LazyImages) else images.numpy()


def _ours(path: Path) -> bool:
    """A file a prepare writes: a shard, the manifest, the plan, or a temporary file of one of them."""
    return bool(SHARD_NAME.match(path.name) or _TEMPORARY.match(path.name)) or path.name in (MANIFEST, _PLAN)


def _start_or_resume(out: Path, plan: str, planned: set[str]) -> None:
    """Keep the shards of this same plan (an interrupted or finished prepare); remove everything else of ours."""
    ensure_dir(out)
    previous = None
    with contextlib.suppress(OSError, ValueError):
        previous = json.loads((out / MANIFEST).read_text()).get("plan")
    if previous is None and (out / _PLAN).is_file():
        previous = (out / _PLAN).read_text().strip()
    same = previous == plan
    for path in out.iterdir():
        if (
            _TEMPORARY.match(path.name)
            or path.name == MANIFEST
            or (SHARD_NAME.match(path.name) and not (same and path.name in planned))
        ):
            path.unlink()
    with atomic_path(out / _PLAN) as tmp:
        tmp.write_text(plan + "\n")


def _run_tasks(
    tasks: list[_Task], image_shape: tuple[int, ...], workers: int, progress: bool | None, name: str
) -> dict[Path, str]:
    """Write the tasks' shards (skipping those a previous run finished); returns each shard's sha256."""
    digests: dict[Path, str] = {}
    todo = []
    for task in tasks:
        done = _finished(task, image_shape)
        if done is None:
            todo.append(task)
        else:
            digests[task.path] = done
    total = sum(len(t.labels) for t in tasks)
    bar = Bar(
        total=total,
        initial=total - sum(len(t.labels) for t in todo),
        unit="img",
        desc=f"prepare {name}",
        disable=None if progress is None else not progress,
        leave=False,
    )
    with bar:
        if workers == 1 or len(todo) <= 1 or todo[0].pixels is not None:
            for task in todo:
                digests[task.path] = _write_shard(task)
                bar.update(len(task.labels))
            return digests
        # Workers fork from a server process that imported the decoder once, before any thread started: cheaper than
        # spawning (an import of torch each) and safe, unlike a fork of this process after torch started its threads.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["rrm.data.shard_writer", "rrm.data.decode"])
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=context, initializer=_worker_init) as pool:
            running: dict[Future, _Task] = {pool.submit(_write_shard, t): t for t in todo}
            try:
                while running:
                    finished, _ = wait(running, return_when=FIRST_EXCEPTION)
                    for future in finished:
                        task = running.pop(future)
                        digests[task.path] = future.result()
                        bar.update(len(task.labels))
            except BaseException:
                for future in running:
                    future.cancel()
                raise
    return digests
