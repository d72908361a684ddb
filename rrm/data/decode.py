"""Decoding one image file into the uint8 CHW square every folder dataset holds.

A module of its own, light to import, because :mod:`rrm.data.shard_writer` runs it in worker processes that each import
what it needs.
"""

from __future__ import annotations

import functools

import torch
from PIL import Image
from torchvision.transforms import v2

from rrm.errors import RRMError


def decode_image(path: str, image_size: int) -> torch.Tensor:
    """One image as uint8 CHW RGB: its shorter side resized to ``image_size``, centre-cropped to a square."""
    return _square(image_size)(_open_rgb(path, image_size))


@functools.cache
def _square(image_size: int) -> v2.Compose:
    return v2.Compose([v2.Resize(image_size), v2.CenterCrop(image_size), v2.PILToTensor()])


def _open_rgb(path: str, image_size: int) -> Image.Image:
    try:
        with Image.open(path) as image:
            # Lets JPEG decode at a reduced scale that still covers image_size: several times faster on ImageNet.
            image.draft("RGB", (image_size, image_size))
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        raise RRMError(f"cannot read image {path!r} ({exc}): replace or delete the file") from None
