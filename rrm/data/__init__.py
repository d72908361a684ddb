"""Datasets by name or by prepared file, all as :class:`ImageData` in [0, 1] pixel space."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from rrm.data.core import AUGMENTATIONS, ImageData, augment_batch, batches, read_dataset, save_dataset, to_float
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


# name -> loader(**options) -> ImageData
DATASETS: dict[str, Callable[..., ImageData]] = {
    "mnist5k": mnist5k,
    "digits": digits,
    "cifar10": _folder_loader("cifar10"),
    "imagefolder": _folder_loader("imagefolder"),
    "restricted-imagenet": _folder_loader("restricted_imagenet"),
}

__all__ = [
    "AUGMENTATIONS", "DATASETS", "ImageData", "augment_batch", "batches", "load_dataset", "prepare_dataset",
    "read_dataset", "save_dataset", "to_float",
]


def load_dataset(name_or_path: str | os.PathLike, **options) -> ImageData:
    """A registered dataset by name (with its loader's ``options``), or a file written by ``rrm data prepare``."""
    key = str(name_or_path)
    if key in DATASETS:
        try:
            return DATASETS[key](**options)
        except TypeError as exc:
            raise RRMError(f"dataset {key!r} does not take these options: {exc}") from None
        except ValueError as exc:  # a value the loader cannot use (test_size larger than the data, a text seed)
            raise RRMError(f"dataset {key!r} cannot use the options {options}: "
                           f"{(str(exc).splitlines() or [type(exc).__name__])[0]}; check -o") from None
    if Path(key).suffix == ".safetensors" or Path(key).is_file():
        if options:
            raise RRMError(f"options {sorted(options)} apply to named datasets, not to the prepared file {key!r}")
        return read_dataset(key)
    raise unknown("dataset", key, list(DATASETS) + ["<path to a prepared .safetensors file>"])


def prepare_dataset(name: str, out: str | os.PathLike, **options) -> tuple[ImageData, str]:
    """Load dataset ``name`` and write it to one versionable file; returns the data and its content digest."""
    check_writable(out)  # before the loading, which may take minutes for folder datasets
    data = load_dataset(name, **options)
    return data, save_dataset(data, out)
