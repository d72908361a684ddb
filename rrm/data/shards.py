"""Prepared datasets larger than memory: pre-decoded images in safetensors shards, read row by row.

A sharded dataset is a directory::

    dataset.json                  the manifest: the metadata of a prepared file (name, classes, augment, mean, std,
                                  source), the image shape, each split's shards with their image count and sha256,
                                  each split's pixel type (``dtypes``; uint8 where it is absent) and the digest
    train-00000.safetensors ...   tensors ``x`` (NCHW: uint8 photographs, or float32 in [0, 1] for data that rrm
    test-00000.safetensors  ...   made, such as a robustified set) and ``y`` (int64 labels), no metadata, so the
                                  bytes depend on the images alone and a second prepare writes the same files

Why this format: images are decoded, resized and labelled once (:func:`rrm.data.shard_writer.write_shards`, in
worker processes), and a row of ``x`` is a fixed number of bytes at a known offset, so any image is one ``preadv``
away. Training therefore keeps its exact shuffle over the whole dataset (the same batches as in memory, on one process
or many), each torchrun rank reads only its rows, and nothing is mapped into the process: memory stays the reader's
few batches however large the dataset (a memory map would count every page touched). safetensors is already how rrm
stores data and models: no pickle, a documented header, readable from any language. The shards are plain immutable
files that DVC versions as one directory output, storing a shard once however many versions share it.

Checks: opening a dataset compares every shard's size with its header (a truncated file is named). Unless
``verify=False``, each shard's sha256 is compared with the manifest lazily: the first time a process reads rows of a
shard, before it returns any of them, and once per process. So a torchrun rank hashes the shards its rows come from,
opening costs no read of the data, and a damaged shard is still named in one line before any batch uses it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rrm.data.core import ImageData
from rrm.errors import RRMError
from rrm.io import sha256_file

SHARDS_FORMAT = "rrm-shards/1"
MANIFEST = "dataset.json"
SPLITS = ("train", "test")
# Open shard files kept per dataset (a Restricted ImageNet at 224 px has ~1,200 shards).
_OPEN_FILES = 64
SHARD_NAME = re.compile(r"^(train|test)-\d{5}\.safetensors$")
# The pixel types a shard may hold: torch's, numpy's and safetensors' names
DTYPES = {"uint8": (torch.uint8, np.uint8, "U8"), "float32": (torch.float32, np.float32, "F32")}
_PREPARE_FIX = "re-run `rrm data prepare --shards` to re-create it"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.safetensors"


@dataclass(frozen=True)
class Shard:
    """One shard file: its images' byte range, their count and the file's sha256."""

    path: Path
    count: int
    x_offset: int  # where the first image's bytes start in the file
    row_bytes: int
    sha256: str


class _Files:
    """File descriptors of shards, opened on first read and kept (at most :data:`_OPEN_FILES`, least recent closed).

    Shared by every view of one dataset and safe across threads: ``preadv`` has no file position to race on.
    """

    def __init__(self) -> None:
        self._fds: OrderedDict[Path, int] = OrderedDict()
        self._lock = threading.Lock()

    def fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.pop(path, None)
            if fd is None:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as exc:
                    what = f"cannot read dataset shard {str(path)!r} ({exc.strerror})"
                    raise RRMError(f"{what}; {_PREPARE_FIX}") from None
            self._fds[path] = fd
            while len(self._fds) > _OPEN_FILES:
                os.close(self._fds.popitem(last=False)[1])
            return fd

    def close(self, _close=os.close) -> None:  # bound now, and no contextlib: __del__ may run as modules are torn down
        with self._lock:
            for fd in self._fds.values():
                try:  # noqa: SIM105 (contextlib may be gone when this runs at exit)
                    _close(fd)
                except OSError:
                    pass
            self._fds.clear()

    def __del__(self) -> None:
        self.close()


class _Verifier:
    """The shards this process has hashed and found equal to the manifest; shared by every view of one dataset."""

    def __init__(self) -> None:
        self._done: set[Path] = set()
        self._lock = threading.Lock()

    def check(self, shards: Iterable[Shard]) -> None:
        """Hash those of ``shards`` not checked yet (in threads) and name the first that differs from its manifest."""
        with self._lock:  # one thread hashes a shard; the others wait for it rather than hash it again
            todo = [s for s in dict.fromkeys(shards) if s.path not in self._done]
            if todo:
                _verify(todo)
                self._done.update(s.path for s in todo)

    def __getstate__(self) -> dict:  # a process that receives the dataset keeps what was checked before
        return {"done": self._done}

    def __setstate__(self, state: dict) -> None:
        self._done, self._lock = set(state["done"]), threading.Lock()


class ShardedImages:
    """NCHW images (uint8, or float32) stored in shards, read on demand: a :class:`rrm.data.core.LazyImages`.

    Indexing (a slice, a boolean mask, integer indices) gives a view of the selected rows without reading; only
    :meth:`read` reads, with one ``preadv`` per run of consecutive rows straight into the returned tensor.
    """

    ndim = 4
    device = torch.device("cpu")

    def __init__(
        self,
        shards: Sequence[Shard],
        image_shape: tuple[int, int, int],
        rows: np.ndarray | None = None,
        files: _Files | None = None,
        verifier: _Verifier | None = None,
        dtype: torch.dtype = torch.uint8,
    ):
        self.shards = tuple(shards)
        self.image_shape = tuple(image_shape)
        self.dtype = dtype
        self._starts = np.cumsum([0, *(s.count for s in self.shards)])
        self.rows = np.arange(self._starts[-1], dtype=np.int64) if rows is None else rows
        self._files = files or _Files()
        self._verifier = verifier  # None: no hashing (``verify=False``)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self.image_shape))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key) -> ShardedImages:
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        if isinstance(key, (int, np.integer)):
            raise TypeError("index a ShardedImages with a slice, a mask or an index array; read() gives the pixels")
        return ShardedImages(self.shards, self.image_shape, self.rows[key], self._files, self._verifier, self.dtype)

    def __repr__(self) -> str:
        shape, dtype = "x".join(map(str, self.image_shape)), str(self.dtype).removeprefix("torch.")
        return f"ShardedImages({len(self)} x {shape} {dtype} in {len(self.shards)} shards)"

    def __getstate__(self) -> dict:  # descriptors stay in their process
        return {**self.__dict__, "_files": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _files=_Files())

    def fingerprint(self) -> bytes:
        """The shards' sha256s and image counts and, for a view, the rows it takes: the content, without reading it."""
        h = hashlib.sha256()
        for shard in self.shards:
            h.update(f"{shard.sha256}:{shard.count};".encode())
        if not np.array_equal(self.rows, np.arange(self._starts[-1])):
            h.update(self.rows.tobytes())
        return h.digest()

    def read(self, index=None, *, pin: bool = False) -> torch.Tensor:
        """Rows ``index`` of this view (all of them without it) as one tensor; ``pin`` page-locks it."""
        rows = self.rows
        if index is not None:
            rows = rows[index.cpu().numpy() if isinstance(index, torch.Tensor) else np.asarray(index)]
        out = torch.empty((len(rows), *self.image_shape), dtype=self.dtype, pin_memory=pin)
        if not len(rows):
            return out
        flat = memoryview(out.numpy()).cast("B")
        which = np.searchsorted(self._starts, rows, side="right") - 1
        if self._verifier is not None:
            self._verifier.check(self.shards[i] for i in np.unique(which).tolist())
        local = rows - self._starts[which]
        # runs of rows that follow each other in one shard are read in one call
        breaks = np.flatnonzero((np.diff(rows) != 1) | (np.diff(which) != 0)) + 1
        bounds = [0, *breaks.tolist(), len(rows)]
        row_bytes = self.shards[0].row_bytes
        for a, b in itertools.pairwise(bounds):
            shard = self.shards[which[a]]
            want = (b - a) * row_bytes
            got = os.preadv(
                self._files.fd(shard.path),
                [flat[a * row_bytes : b * row_bytes]],
                shard.x_offset + int(local[a]) * row_bytes,
            )
            if got != want:
                raise RRMError(
                    f"dataset shard {str(shard.path)!r} is truncated (an image ends past its end); {_PREPARE_FIX}"
                )
        return out


def _header(path: Path) -> tuple[dict, int]:
    """A shard's safetensors header and the offset of its data, checking that the file holds all the data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            raw = fh.read(length) if length is not None and length < size else b""
        header = json.loads(raw) if raw and len(raw) == length else None
    except FileNotFoundError:
        raise RRMError(f"dataset shard {str(path)!r} is missing; {_PREPARE_FIX}") from None
    except OSError as exc:
        raise RRMError(f"cannot read dataset shard {str(path)!r} ({exc.strerror}); {_PREPARE_FIX}") from None
    except (ValueError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict) or not {"x", "y"} <= set(header):
        raise RRMError(
            f"dataset shard {str(path)!r} is truncated or not a shard (no readable header with tensors x "
            f"and y); {_PREPARE_FIX}"
        )
    data_start = 8 + length
    end = max(int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__")
    if size != data_start + end:
        raise RRMError(f"dataset shard {str(path)!r} is truncated ({size} of {data_start + end} bytes); {_PREPARE_FIX}")
    return header, data_start


def open_shard(
    path: Path, count: int, image_shape: tuple[int, ...], sha256: str, dtype: str = "uint8"
) -> tuple[Shard, np.ndarray]:
    """The shard and its labels, checked against what the manifest says it holds (``dtype``: a :data:`DTYPES` key)."""
    header, data_start = _header(path)
    x, y = header["x"], header["y"]
    stored = DTYPES[dtype][2]
    if (x["dtype"], x["shape"], y["dtype"], y["shape"]) != (stored, [count, *image_shape], "I64", [count]):
        raise RRMError(
            f"dataset shard {str(path)!r} holds x {x['dtype']} {x['shape']} and y {y['dtype']} "
            f"{y['shape']}, not the {count} {stored} images {list(image_shape)} its manifest lists; {_PREPARE_FIX}"
        )
    y_start, y_end = (data_start + int(o) for o in y["data_offsets"])
    with open(path, "rb") as fh:
        fh.seek(y_start)
        labels = np.frombuffer(fh.read(y_end - y_start), dtype="<i8").astype(np.int64)
    row_bytes = int(np.prod(image_shape)) * np.dtype(DTYPES[dtype][1]).itemsize
    shard = Shard(path, count, data_start + int(x["data_offsets"][0]), row_bytes, sha256)
    return shard, labels


def is_sharded(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a sharded dataset's directory or its manifest."""
    path = Path(path)
    return (path / MANIFEST).is_file() if path.is_dir() else path.name == MANIFEST


def read_manifest(path: str | os.PathLike) -> tuple[Path, dict]:
    """The dataset directory and its manifest, checked for the keys this version reads."""
    path = Path(path)
    directory = path.parent if path.name == MANIFEST and not path.is_dir() else path
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        why = (
            "has no manifest: its prepare did not finish; re-run the same `rrm data prepare --shards` to resume"
            if any(SHARD_NAME.match(p.name) for p in directory.glob("*.safetensors"))
            else f"is not a sharded dataset (no {MANIFEST}); write one with `rrm data prepare --shards`"
        )
        raise RRMError(f"dataset directory {str(directory)!r} {why}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise RRMError(
            f"dataset manifest {str(manifest_path)!r} cannot be read ({type(exc).__name__}); {_PREPARE_FIX}"
        ) from None
    keys = ("name", "classes", "augment", "mean", "std", "source", "image_shape", "splits", "digest")
    if not isinstance(manifest, dict) or manifest.get("format") != SHARDS_FORMAT:
        raise RRMError(
            f"{str(manifest_path)!r} is not an rrm shards manifest (no format {SHARDS_FORMAT!r}); {_PREPARE_FIX}"
        )
    missing = [k for k in keys if k not in manifest]
    if missing or set(manifest["splits"]) != set(SPLITS):
        what = f"lacks {', '.join(missing)}" if missing else f"has splits {sorted(manifest['splits'])}"
        raise RRMError(f"dataset manifest {str(manifest_path)!r} is damaged (it {what}); {_PREPARE_FIX}")
    return directory, manifest


def open_shards(path: str | os.PathLike, verify: bool = True) -> ImageData:
    """A sharded dataset as :class:`ImageData` whose images are :class:`ShardedImages`; labels are read now.

    ``verify``: compare each shard's sha256 with the manifest the first time this process reads from it (``False``
    checks sizes and headers only).
    """
    directory, manifest = read_manifest(path)
    try:
        data = assemble(directory, manifest, _Verifier() if verify else None)
    except (KeyError, TypeError, ValueError) as exc:  # a manifest entry of the wrong shape
        raise RRMError(
            f"dataset manifest {str(directory / MANIFEST)!r} is damaged ({type(exc).__name__}: "
            f"{(str(exc).splitlines() or [''])[0]}); {_PREPARE_FIX}"
        ) from None
    if data.digest != manifest["digest"]:
        raise RRMError(
            f"dataset manifest {str(directory / MANIFEST)!r} does not match its digest (edited or "
            f"damaged); {_PREPARE_FIX}"
        )
    return data


def assemble(directory: Path, manifest: dict, verifier: _Verifier | None = None) -> ImageData:
    """The dataset the manifest describes, its shards' sizes, headers and labels checked; their hashes by
    ``verifier`` as they are read (none without one)."""
    image_shape = tuple(int(v) for v in manifest["image_shape"])
    files = _Files()
    images, labels = {}, {}
    for split in SPLITS:
        dtype = manifest.get("dtypes", {}).get(split, "uint8")
        if dtype not in DTYPES:
            raise ValueError(f"unknown pixel type {dtype!r} of the {split} split")
        opened = [
            open_shard(directory / entry["file"], int(entry["images"]), image_shape, str(entry["sha256"]), dtype)
            for entry in manifest["splits"][split]
        ]
        images[split] = ShardedImages(
            [s for s, _ in opened], image_shape, files=files, verifier=verifier, dtype=DTYPES[dtype][0]
        )
        labels[split] = torch.from_numpy(np.concatenate([y for _, y in opened] or [np.zeros(0, np.int64)]))
    return ImageData(
        name=manifest["name"],
        train_x=images["train"],
        train_y=labels["train"],
        test_x=images["test"],
        test_y=labels["test"],
        classes=tuple(manifest["classes"]),
        augment=manifest["augment"],
        mean=tuple(manifest["mean"]),
        std=tuple(manifest["std"]),
        source=dict(manifest["source"]),
    )


def _verify(shards: Iterable[Shard]) -> None:
    """Hash the shards in threads (hashlib releases the GIL) and name the first that differs from its manifest."""
    shards = list(shards)
    with ThreadPoolExecutor(min(8, len(shards) or 1)) as pool:
        for shard, actual in zip(shards, pool.map(lambda s: sha256_file(s.path), shards)):
            if actual != shard.sha256:
                raise RRMError(
                    f"dataset shard {str(shard.path)!r} does not match its digest in {MANIFEST} "
                    f"(modified or damaged); {_PREPARE_FIX}"
                )
