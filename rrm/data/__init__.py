"""Datasets by name, by prepared file or by sharded directory, all as :class:`ImageData` in [0, 1] pixel space."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from rrm.data.core import (
    AUGMENTATIONS,
    ImageData,
    LazyImages,
    as_tensor,
    augment_batch,
    batches,
    read_dataset,
    save_dataset,
    to_float,
)
from rrm.data.embedded import digits, mnist5k
from rrm.errors import RRMError, unknown
from rrm.io import check_writable


def _folder_loader(name: str) -> Callable[..., ImageData]:
    """A loader from rrm.data.folders, imported on first use: torchvision's datasets cost every command ~1.5 s."""

    def load(**options) -> ImageData:
        from rrm.data import folders

        return getattr(folders, name)(**options)

    load.__name__ = load.__qualname__ = name
    return load


# Datasets whose images are files to decode: `rrm data prepare --shards` decodes them in worker processes.
_FOLDER_PLANS = {"imagefolder": "imagefolder_plan", "restricted-imagenet": "restricted_imagenet_plan"}


# name -> loader(**options) -> ImageData
DATASETS: dict[str, Callable[..., ImageData]] = {
    "mnist5k": mnist5k,
    "digits": digits,
    "cifar10": _folder_loader("cifar10"),
    "imagefolder": _folder_loader("imagefolder"),
    "restricted-imagenet": _folder_loader("restricted_imagenet"),
}

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "ImageData",
    "LazyImages",
    "as_tensor",
    "augment_batch",
    "batches",
    "load_dataset",
    "prepare_dataset",
    "read_dataset",
    "save_dataset",
    "to_float",
]


def load_dataset(name_or_path: str | os.PathLike, **options) -> ImageData:
    """A registered dataset by name (with its loader's ``options``), a file written by ``rrm data prepare``, or a
    directory of shards written by ``rrm data prepare --shards`` (opened lazily: :mod:`rrm.data.shards`)."""
    key = str(name_or_path)
    if key in DATASETS:
        return _call(key, DATASETS[key], options)
    path = Path(key)
    if path.is_dir() or path.name == "dataset.json":
        from rrm.data.shards import open_shards

        if options:
            raise RRMError(f"options {sorted(options)} apply to named datasets, not to the prepared shards {key!r}")
        return open_shards(path)
    if path.suffix == ".safetensors" or path.is_file():
        if options:
            raise RRMError(f"options {sorted(options)} apply to named datasets, not to the prepared file {key!r}")
        return read_dataset(key)
    raise unknown(
        "dataset", key, [*DATASETS, "<path to a prepared .safetensors file>", "<directory of prepared shards>"]
    )


def _call(name: str, loader: Callable, options: dict):
    try:
        return loader(**options)
    except TypeError as exc:
        raise RRMError(f"dataset {name!r} does not take these options: {exc}") from None
    except ValueError as exc:  # a value the loader cannot use (test_size larger than the data, a text seed)
        raise RRMError(
            f"dataset {name!r} cannot use the options {options}: "
            f"{(str(exc).splitlines() or [type(exc).__name__])[0]}; check -o"
        ) from None


def prepare_dataset(
    name: str,
    out: str | os.PathLike,
    *,
    shards: bool = False,
    workers: int | None = None,
    shard_images: int | None = None,
    **options,
) -> tuple[ImageData, str]:
    """Load dataset ``name`` and write it to one versionable file; returns the data and its content digest.

    ``shards``: write a directory of shards instead (:func:`rrm.data.shard_writer.write_shards`), for datasets larger
    than memory; folder datasets are then decoded by ``workers`` processes straight into the shards, never held
    whole. The returned data reads the shards lazily.
    """
    if not shards:
        if workers is not None or shard_images is not None:
            raise RRMError("workers and shard_images apply to sharded datasets; add --shards or drop them")
        check_writable(out)  # before the loading, which may take minutes for folder datasets
        data = load_dataset(name, **options)
        return data, save_dataset(data, out)
    from rrm.data import folders
    from rrm.data.shard_writer import check_counts, write_shards

    check_counts(workers, shard_images)
    check_writable(out, directory=True)
    if name in _FOLDER_PLANS:
        source = _call(name, getattr(folders, _FOLDER_PLANS[name]), options)
    else:
        source = load_dataset(name, **options)
    data = write_shards(source, out, workers=workers, shard_images=shard_images)
    return data, data.digest
