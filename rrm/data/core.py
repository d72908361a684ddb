"""Image sets held as tensors, their versionable file format, batching and augmentation.

Images are NCHW tensors in [0, 1]: ``uint8`` (scaled by 1/255 when batched) for real photographs, ``float32`` for
synthesised data such as robustified datasets. A prepared dataset is one safetensors file (no pickle, byte-stable)
whose metadata carries a content digest, so DVC can version it and every run can record which data it saw.

A dataset larger than memory holds its images as a lazy array instead (:class:`LazyImages`, the shards of
:mod:`rrm.data.shards`): indexing it gives a view, and :func:`batches` reads each batch's rows in a background
thread. Labels are always tensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from rrm.errors import RRMError, unknown
from rrm.io import atomic_path

DATASET_FORMAT = "rrm-dataset/1"
# What a dataset file holds: these metadata keys (JSON-encoded where not plain text) and these tensors.
_HEADER_KEYS = ("name", "classes", "augment", "mean", "std", "source")
_TENSORS = ("train_x", "train_y", "test_x", "test_y")
AUGMENTATIONS = ("none", "crop-flip", "crop", "resized-crop-flip")
# Batches a lazy dataset's reader keeps ready ahead of the one being trained on.
PREFETCH_BATCHES = 4


@runtime_checkable
class LazyImages(Protocol):
    """uint8 NCHW images that are read on demand (numpy memmap's rule: indexing gives a view, :meth:`read` reads)."""

    @property
    def shape(self) -> torch.Size: ...

    @property
    def ndim(self) -> int: ...

    def __len__(self) -> int: ...

    def __getitem__(self, key) -> LazyImages: ...

    def read(self, index=None, *, pin: bool = False) -> torch.Tensor:
        """The rows ``index`` (all without it) as one uint8 tensor; ``pin``: in page-locked memory for the GPU."""
        ...

    def fingerprint(self) -> bytes:
        """What identifies these rows' content, for the dataset digest, without reading the images."""
        ...


Images = torch.Tensor | LazyImages


@dataclass
class ImageData:
    """A train/test pair of labelled image tensors plus what every model and method needs to know about them."""

    name: str
    train_x: Images
    train_y: torch.Tensor
    test_x: Images
    test_y: torch.Tensor
    classes: tuple[str, ...]
    augment: str = "none"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    # Provenance (e.g. the source dataset and teacher of a robustified set); stored in the file.
    source: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.augment not in AUGMENTATIONS:
            raise unknown("augmentation", self.augment, AUGMENTATIONS)
        for split, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
                raise RRMError(
                    f"{self.name}: {split} images must be NCHW with one label each, got {tuple(x.shape)} "
                    f"and {tuple(y.shape)}"
                )
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise RRMError(f"{self.name}: train and test images differ in shape")
        if not self.mean:
            self.mean, self.std = channel_stats(self.train_x)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_x.shape[1:]
        return int(c), int(h), int(w)

    @property
    def lazy(self) -> bool:
        """Whether the images are read from disk batch by batch (:class:`LazyImages`) rather than held in memory."""
        return isinstance(self.train_x, LazyImages) or isinstance(self.test_x, LazyImages)

    @property
    def digest(self) -> str:
        """sha256 over the tensors' bytes and the metadata that changes training; stable across files and machines.

        Lazy images enter through their :meth:`LazyImages.fingerprint` (their shards' sha256s and the rows taken), so
        the digest of shards is computed without reading them.
        """
        h = hashlib.sha256()
        for t in (self.train_x, self.train_y, self.test_x, self.test_y):
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            if isinstance(t, LazyImages):
                h.update(t.fingerprint())
                continue
            h.update(t.contiguous().numpy().tobytes())
        h.update(json.dumps([self.classes, self.augment, self.mean, self.std], sort_keys=True).encode())
        return h.hexdigest()

    def model_kwargs(self) -> dict:
        """The arguments of :func:`rrm.models.build_model` that this data fixes."""
        c, h, _ = self.input_shape
        return dict(num_classes=self.num_classes, in_channels=c, image_size=h, mean=self.mean, std=self.std)

    def validation_split(self, fraction: float = 0.2, seed: int = 0) -> ImageData:
        """Carve a stratified validation split from the training data; the result's test split is that validation set.

        Tuning scores trials on it, so the real test split is never looked at while choosing hyper-parameters.
        """
        if not 0 < fraction < 1:
            raise RRMError(f"validation fraction must be in (0, 1), got {fraction}")
        g = torch.Generator().manual_seed(seed)
        val_idx = []
        for c in range(self.num_classes):
            idx = torch.nonzero(self.train_y == c).flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            val_idx.append(idx[: max(1, round(len(idx) * fraction))])
        val = torch.cat(val_idx).sort().values
        keep = torch.ones(len(self.train_y), dtype=torch.bool)
        keep[val] = False
        return dataclasses.replace(
            self,
            name=f"{self.name}-val",
            train_x=self.train_x[keep],
            train_y=self.train_y[keep],
            test_x=self.train_x[val],
            test_y=self.train_y[val],
            source={**self.source, "validation_of": self.name, "fraction": fraction, "seed": seed},
        )

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> ImageData:
        """The first ``n_train`` / ``n_test`` examples (the splits are already shuffled and stratified)."""
        return dataclasses.replace(
            self,
            train_x=self.train_x[:n_train],
            train_y=self.train_y[:n_train],
            test_x=self.test_x[:n_test],
            test_y=self.test_y[:n_test],
        )


def to_float(x: torch.Tensor) -> torch.Tensor:
    """Images as float32 in [0, 1]."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def as_tensor(x: Images) -> torch.Tensor:
    """``x`` itself when it is a tensor; a lazy array's rows read into memory (for the few images an attack needs)."""
    return x.read() if isinstance(x, LazyImages) else x


def channel_stats(x: Images, n: int = 2048) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of the first ``n`` images, rounded: what a model normalises with."""
    first = to_float(as_tensor(x[:n]))
    mean = tuple(round(v, 4) for v in first.mean(dim=(0, 2, 3)).tolist())
    std = tuple(round(max(v, 1e-3), 4) for v in first.std(dim=(0, 2, 3)).tolist())
    return mean, std


def save_dataset(data: ImageData, path: str | os.PathLike) -> str:
    """Write ``data`` to one safetensors file atomically; returns its digest."""
    digest = data.digest
    meta = {
        "format": DATASET_FORMAT,
        "name": data.name,
        "classes": json.dumps(list(data.classes)),
        "augment": data.augment,
        "mean": json.dumps(list(data.mean)),
        "std": json.dumps(list(data.std)),
        "source": json.dumps(data.source, sort_keys=True),
        "digest": digest,
    }
    tensors = {k: getattr(data, k).contiguous() for k in _TENSORS}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return digest


def read_dataset(path: str | os.PathLike, verify: bool = True) -> ImageData:
    """Read a file written by :func:`save_dataset`, checking its digest unless ``verify`` is False."""
    path = Path(path)
    if not path.is_file():
        raise RRMError(f"dataset file {str(path)!r} does not exist; write it with `rrm data prepare`")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise RRMError(f"dataset file {str(path)!r} is corrupt ({exc}); re-create it with `rrm data prepare`") from None
    if meta.get("format") != DATASET_FORMAT:
        raise RRMError(
            f"{str(path)!r} is not an rrm dataset file (its metadata header has no format "
            f"{DATASET_FORMAT!r}); write one with `rrm data prepare`"
        )
    missing = [key for key in (*_HEADER_KEYS, "digest") if key not in meta]
    if missing or set(tensors) != set(_TENSORS):
        what = (
            f"its metadata header lacks {', '.join(missing)}"
            if missing
            else f"it holds tensors {sorted(tensors)}, not {list(_TENSORS)}"
        )
        raise RRMError(f"dataset file {str(path)!r} is damaged ({what}); re-create it with `rrm data prepare`")
    try:
        header = {key: json.loads(meta[key]) for key in ("classes", "mean", "std", "source")}
        data = ImageData(
            name=meta["name"],
            classes=tuple(header["classes"]),
            augment=meta["augment"],
            mean=tuple(header["mean"]),
            std=tuple(header["std"]),
            source=dict(header["source"]),
            **tensors,
        )
        digest = data.digest if verify else None
    except (ValueError, TypeError) as exc:  # a header value that is not JSON, or JSON of the wrong shape
        raise RRMError(
            f"dataset file {str(path)!r} is damaged ({type(exc).__name__} reading its metadata header: "
            f"{(str(exc).splitlines() or [''])[0]}); re-create it with `rrm data prepare`"
        ) from None
    if verify and digest != meta["digest"]:
        raise RRMError(
            f"dataset file {str(path)!r} does not match its digest (modified or damaged); "
            "re-create it with `rrm data prepare`"
        )
    return data


def augment_batch(
    x: torch.Tensor, kind: str, generator: torch.Generator | None = None, within: tuple[int, int] | None = None
) -> torch.Tensor:
    """Per-dataset training augmentation on a float batch: random crop (zero padding 1/8 of the side) and flip, or
    ImageNet's random-resized crop and flip (``resized-crop-flip``, :func:`_resized_crop_flip`).

    Vectorised on the batch's device, so every method sees the same augmentation at no per-image Python cost.
    ``within=(offset, total)``: ``x`` is rows ``offset:offset + len(x)`` of a batch of ``total``; the random draws
    are made for the whole batch, so a data-parallel rank augments its share exactly as one process would.
    """
    if kind == "none":
        return x
    n, _, h, w = x.shape
    offset, total = within or (0, n)
    gen_device = generator.device if generator is not None else "cpu"
    if kind == "resized-crop-flip":
        draws = torch.rand((5, total), generator=generator, device=gen_device)[:, offset : offset + n].to(x.device)
        return _resized_crop_flip(x, draws)
    pad = max(1, h // 8)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (total,), generator=generator, device=gen_device)[offset : offset + n].to(
        x.device
    )
    dx = torch.randint(0, 2 * pad + 1, (total,), generator=generator, device=gen_device)[offset : offset + n].to(
        x.device
    )
    rows = (torch.arange(h, device=x.device)[None, :] + dy[:, None])[:, None, :, None]
    cols = (torch.arange(w, device=x.device)[None, :] + dx[:, None])[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    out = padded[batch, chans, rows, cols]
    if kind == "crop-flip":
        flip = (torch.rand(total, generator=generator, device=gen_device)[offset : offset + n] < 0.5).to(x.device)
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out


# torchvision's RandomResizedCrop defaults: the crop covers 8% to 100% of the image, aspect ratio 3/4 to 4/3.
RESIZED_CROP_SCALE = (0.08, 1.0)
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)


def _resized_crop_flip(x: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Random-resized crop and horizontal flip of every image in one bilinear ``grid_sample``.

    ``draws``: 5 x n numbers uniform in [0, 1), one column per image: the crop's area, its log aspect ratio, its
    horizontal and vertical position, and the flip (below 1/2 mirrors). Unlike torchvision, which redraws a crop that
    does not fit up to 10 times, the crop's sides are clipped to the image, so one draw serves every image.
    """
    area = RESIZED_CROP_SCALE[0] + (RESIZED_CROP_SCALE[1] - RESIZED_CROP_SCALE[0]) * draws[0]
    low, high = math.log(RESIZED_CROP_RATIO[0]), math.log(RESIZED_CROP_RATIO[1])
    ratio = torch.exp(low + (high - low) * draws[1])
    # sides as fractions of the image's width and height
    width = torch.sqrt(area * ratio).clamp(max=1.0)
    height = torch.sqrt(area / ratio).clamp(max=1.0)
    left = (1 - width) * draws[2]
    top = (1 - height) * draws[3]
    flip = draws[4] < 0.5
    theta = torch.zeros((len(x), 2, 3), dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = torch.where(flip, -width, width)
    theta[:, 0, 2] = 2 * left + width - 1
    theta[:, 1, 1] = height
    theta[:, 1, 2] = 2 * top + height - 1
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """(start, stop) of rank ``rank``'s contiguous share of a batch of ``n``; shares differ by at most one."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def batches(
    x: Images,
    y: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    augment: str = "none",
    device: torch.device | str = "cpu",
    drop_last: bool = False,
    indices: torch.Tensor | None = None,
    shard: tuple[int, int] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Float batches in [0, 1] on ``device``, optionally shuffled and augmented; ``indices`` restricts to a subset.

    ``shard=(rank, world_size)``: only that rank's share (:func:`shard_bounds`) of each batch, augmented as in the
    whole batch. A rank whose share of a short last batch is empty gets the batch's first example instead (its
    weight in the global batch is zero: see :mod:`rrm.train.distributed`). ``x`` may already be on ``device``.

    Lazy images (:class:`LazyImages`) are read by a background thread that keeps :data:`PREFETCH_BATCHES` batches
    ready, in page-locked memory when ``device`` is a GPU; the order, the shares and the augmentation (on ``device``,
    after the copy) are those of in-memory images, so both give the same batches.
    """
    device = torch.device(device)
    order = indices if indices is not None else torch.arange(len(y))
    if shuffle:
        order = order[torch.randperm(len(order), generator=generator)]
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    plan = []
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        within = None
        if shard is not None:
            first, last = shard_bounds(len(idx), *shard)
            if last == first:  # an empty share of a short last batch: the batch's first example stands in
                first, last = 0, 1
            within = (first, len(idx))
            idx = idx[first:last]
        plan.append((idx, within))
    if isinstance(x, LazyImages):
        images = _read_ahead(x, [idx for idx, _ in plan], pin=device.type == "cuda")
    else:
        images = (x[idx.to(x.device, non_blocking=True) if x.device != idx.device else idx] for idx, _ in plan)
    for (idx, within), xb in zip(plan, images):
        xb = to_float(xb.to(device, non_blocking=True))
        yield augment_batch(xb, augment, generator, within), y[idx].to(device, non_blocking=True)


def _read_ahead(x: LazyImages, rows: list[torch.Tensor], pin: bool) -> Iterator[torch.Tensor]:
    """``x.read(r)`` for each ``r`` in ``rows``, read by one background thread :data:`PREFETCH_BATCHES` ahead.

    One thread suffices: a read is a few ``preadv`` calls per batch, which release the GIL, and it keeps the main
    thread's cores for the training step. Leaving the loop early cancels what was not read yet.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="rrm-reader") as pool:
        pending: deque[Future] = deque()
        try:
            for r in rows:
                pending.append(pool.submit(x.read, r, pin=pin))
                if len(pending) > PREFETCH_BATCHES:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
