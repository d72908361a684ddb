"""Photographs read from disk: CIFAR-10, any ImageNet-style folder tree, and Restricted ImageNet.

Every loader decodes once into uint8 NCHW tensors, so training never touches JPEGs and a prepared file is exactly
what a run saw. Folder walking and CIFAR parsing are torchvision's; the splits are seeded and stratified.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from sklearn.model_selection import train_test_split
from torchvision.datasets import CIFAR10
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from rrm.data.core import AUGMENTATIONS, ImageData
from rrm.data.decode import decode_image
from rrm.errors import RRMError, unknown
from rrm.progress import Bar

Samples = list[tuple[str, int]]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# Tsipras et al. (2019), "Robustness may be at odds with accuracy": inclusive index ranges into the sorted 1,000
# ILSVRC-2012 WordNet IDs, in the label order of MadryLab's `robustness` (RESTRICTED_IMAGNET_RANGES).
RESTRICTED_IMAGENET_RANGES: dict[str, tuple[int, int]] = {
    "dog": (151, 268),
    "cat": (281, 285),
    "frog": (30, 32),
    "turtle": (33, 37),
    "bird": (80, 100),
    "primate": (365, 382),
    "fish": (389, 397),
    "crab": (118, 121),
    "insect": (300, 319),
}
# The WordNet IDs at those indices, spelled out so that a tree holding only some of the 1,000 classes maps correctly.
RESTRICTED_IMAGENET_WNIDS: dict[str, tuple[str, ...]] = {
    "dog": tuple(
        """
        n02085620 n02085782 n02085936 n02086079 n02086240 n02086646 n02086910 n02087046 n02087394 n02088094
        n02088238 n02088364 n02088466 n02088632 n02089078 n02089867 n02089973 n02090379 n02090622 n02090721
        n02091032 n02091134 n02091244 n02091467 n02091635 n02091831 n02092002 n02092339 n02093256 n02093428
        n02093647 n02093754 n02093859 n02093991 n02094114 n02094258 n02094433 n02095314 n02095570 n02095889
        n02096051 n02096177 n02096294 n02096437 n02096585 n02097047 n02097130 n02097209 n02097298 n02097474
        n02097658 n02098105 n02098286 n02098413 n02099267 n02099429 n02099601 n02099712 n02099849 n02100236
        n02100583 n02100735 n02100877 n02101006 n02101388 n02101556 n02102040 n02102177 n02102318 n02102480
        n02102973 n02104029 n02104365 n02105056 n02105162 n02105251 n02105412 n02105505 n02105641 n02105855
        n02106030 n02106166 n02106382 n02106550 n02106662 n02107142 n02107312 n02107574 n02107683 n02107908
        n02108000 n02108089 n02108422 n02108551 n02108915 n02109047 n02109525 n02109961 n02110063 n02110185
        n02110341 n02110627 n02110806 n02110958 n02111129 n02111277 n02111500 n02111889 n02112018 n02112137
        n02112350 n02112706 n02113023 n02113186 n02113624 n02113712 n02113799 n02113978
    """.split()
    ),
    "cat": tuple("n02123045 n02123159 n02123394 n02123597 n02124075".split()),
    "frog": tuple("n01641577 n01644373 n01644900".split()),
    "turtle": tuple("n01664065 n01665541 n01667114 n01667778 n01669191".split()),
    "bird": tuple(
        """
        n01795545 n01796340 n01797886 n01798484 n01806143 n01806567 n01807496 n01817953 n01818515 n01819313
        n01820546 n01824575 n01828970 n01829413 n01833805 n01843065 n01843383 n01847000 n01855032 n01855672
        n01860187
    """.split()
    ),
    "primate": tuple(
        """
        n02480495 n02480855 n02481823 n02483362 n02483708 n02484975 n02486261 n02486410 n02487347 n02488291
        n02488702 n02489166 n02490219 n02492035 n02492660 n02493509 n02493793 n02494079
    """.split()
    ),
    "fish": tuple("n02514041 n02526121 n02536864 n02606052 n02607072 n02640242 n02641379 n02643566 n02655020".split()),
    "crab": tuple("n01978287 n01978455 n01980166 n01981276".split()),
    "insect": tuple(
        """
        n02165105 n02165456 n02167151 n02168699 n02169497 n02172182 n02174001 n02177972 n02190166 n02206856
        n02219486 n02226429 n02229544 n02231487 n02233338 n02236044 n02256656 n02259212 n02264363 n02268443
    """.split()
    ),
}
# The statistics `robustness` normalises Restricted ImageNet with, so models are comparable with the literature.
RESTRICTED_IMAGENET_MEAN = (0.4717, 0.4499, 0.3837)
RESTRICTED_IMAGENET_STD = (0.2600, 0.2516, 0.2575)

_WNID_LABEL = {wnid: label for label, wnids in enumerate(RESTRICTED_IMAGENET_WNIDS.values()) for wnid in wnids}


def cifar10(root: str | os.PathLike = "data/cifar10", download: bool = False) -> ImageData:
    """CIFAR-10's 50,000 / 10,000 images via torchvision, which checks every file against the published md5s."""
    train, test = _cifar_split(Path(root), True, download), _cifar_split(Path(root), False, download)
    return ImageData(
        name="cifar10",
        train_x=_nchw(train),
        train_y=torch.tensor(train.targets, dtype=torch.int64),
        test_x=_nchw(test),
        test_y=torch.tensor(test.targets, dtype=torch.int64),
        classes=tuple(train.classes),
        augment="crop-flip",
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        source={"dataset": "CIFAR-10", "root": str(root)},
    )


def _cifar_split(root: Path, train: bool, download: bool) -> CIFAR10:
    """One split, telling a missing copy (say where to put it) from a damaged one (replace it) in one line."""
    folder = root / CIFAR10.base_folder
    names = [name for name, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]
    if not download and not all((folder / name).is_file() for name in names):
        raise RRMError(
            f"CIFAR-10 not found under {str(root)!r}: put the extracted {CIFAR10.base_folder} folder "
            "there, or pass download=True (`rrm data prepare cifar10 --download`) on a machine with "
            "internet"
        )
    try:
        return CIFAR10(root, train=train, download=download)
    except RuntimeError:
        raise RRMError(
            f"CIFAR-10 files in {str(folder)!r} do not match their published checksums (damaged or "
            f"partial): replace the {CIFAR10.base_folder} folder with a fresh copy, or delete it and "
            "pass download=True"
        ) from None
    except OSError as exc:
        raise RRMError(
            f"could not download CIFAR-10 to {str(root)!r} ({exc}): check internet access, or put the "
            f"extracted {CIFAR10.base_folder} folder there yourself"
        ) from None


def _nchw(split: CIFAR10) -> torch.Tensor:
    """torchvision keeps CIFAR as NHWC numpy; our tensors are NCHW."""
    return torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous()


@dataclass(frozen=True)
class FolderPlan:
    """What a folder dataset will hold, before any image is decoded: its (path, label) lists and metadata.

    :func:`rrm.data.shard_writer.write_shards` decodes it in worker processes; :meth:`load` decodes it here, into
    memory.
    """

    name: str
    train: Samples
    test: Samples
    classes: tuple[str, ...]
    image_size: int
    augment: str
    source: dict
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def load(self) -> ImageData:
        train_x, train_y = _load_images(self.train, self.image_size, f"{self.name} train")
        test_x, test_y = _load_images(self.test, self.image_size, f"{self.name} test")
        return ImageData(
            name=self.name,
            train_x=train_x,
            train_y=train_y,
            test_x=test_x,
            test_y=test_y,
            classes=self.classes,
            augment=self.augment,
            mean=self.mean,
            std=self.std,
            source=self.source,
        )


def imagefolder(
    root: str | os.PathLike, image_size: int = 64, test_fraction: float = 0.2, seed: int = 0, augment: str = "crop-flip"
) -> ImageData:
    """Images in ``root/<class>/*`` (split here, seeded and stratified) or ``root/{train,val|test}/<class>/*``.

    Each image is converted to RGB, its shorter side resized to ``image_size`` and centre-cropped to a square.
    ``seed`` fixes both the split and the order of the examples, so a prepared file is reproducible.
    """
    return imagefolder_plan(root, image_size, test_fraction, seed, augment).load()


def imagefolder_plan(
    root: str | os.PathLike, image_size: int = 64, test_fraction: float = 0.2, seed: int = 0, augment: str = "crop-flip"
) -> FolderPlan:
    """:func:`imagefolder`'s samples and metadata, without decoding."""
    root = _tree_root(root, image_size, test_fraction, augment)
    train, test, class_to_idx = _split_samples(root, _folder_classes, test_fraction, seed)
    return FolderPlan(
        "imagefolder",
        train,
        test,
        tuple(sorted(class_to_idx, key=class_to_idx.__getitem__)),
        image_size,
        augment,
        source=_source(root, image_size, test_fraction, seed, augment),
    )


def restricted_imagenet(
    root: str | os.PathLike, image_size: int = 64, test_fraction: float = 0.2, seed: int = 0, augment: str = "crop-flip"
) -> ImageData:
    """The 9 super-classes of Restricted ImageNet from an ImageNet tree (``root/{train,val}/<wnid>/*``).

    WordNet-ID folders outside the 9 super-classes are ignored, so the full ILSVRC-2012 tree or any part of it works.
    ``augment="resized-crop-flip"`` trains with ImageNet's random-resized crop instead of padding and shifting.
    """
    return restricted_imagenet_plan(root, image_size, test_fraction, seed, augment).load()


def restricted_imagenet_plan(
    root: str | os.PathLike, image_size: int = 64, test_fraction: float = 0.2, seed: int = 0, augment: str = "crop-flip"
) -> FolderPlan:
    """:func:`restricted_imagenet`'s samples and metadata, without decoding."""
    root = _tree_root(root, image_size, test_fraction, augment)
    train, test, _ = _split_samples(root, _restricted_classes, test_fraction, seed)
    return FolderPlan(
        "restricted-imagenet",
        train,
        test,
        tuple(RESTRICTED_IMAGENET_WNIDS),
        image_size,
        augment,
        source=_source(root, image_size, test_fraction, seed, augment),
        mean=RESTRICTED_IMAGENET_MEAN,
        std=RESTRICTED_IMAGENET_STD,
    )


def _source(root: Path, image_size: int, test_fraction: float, seed: int, augment: str) -> dict:
    """Provenance; the augmentation only when it is not the default, so files prepared before it stay identical."""
    source = {"root": str(root), "image_size": image_size, "test_fraction": test_fraction, "seed": seed}
    return source if augment == "crop-flip" else {**source, "augment": augment}


def _tree_root(root: str | os.PathLike, image_size: int, test_fraction: float, augment: str) -> Path:
    """Check the options before walking a tree that may hold a million files."""
    if augment not in AUGMENTATIONS:
        raise unknown("augmentation", augment, AUGMENTATIONS)
    if image_size < 1:
        raise RRMError(f"image_size must be a positive number of pixels, got {image_size}")
    if not 0 < test_fraction < 1:
        raise RRMError(f"test_fraction must be in (0, 1), got {test_fraction}")
    root = Path(root)
    if not root.is_dir():
        raise RRMError(
            f"image folder {str(root)!r} does not exist: point root at a folder with one sub-folder of "
            "images per class, or with train/ and val/ folders laid out that way"
        )
    return root


def _folder_classes(directory: Path) -> dict[str, int]:
    """Every sub-folder is a class, numbered in sorted order (torchvision's rule)."""
    try:
        return find_classes(directory)[1]
    except FileNotFoundError:
        raise RRMError(
            f"no class folders in {str(directory)!r}: put each class's images in a sub-folder named after the class"
        ) from None


def _restricted_classes(directory: Path) -> dict[str, int]:
    """WordNet-ID folders mapped to their Restricted ImageNet super-class; every other folder is left out."""
    wnids = [entry.name for entry in os.scandir(directory) if entry.is_dir() and entry.name in _WNID_LABEL]
    if not wnids:
        raise RRMError(
            f"no Restricted ImageNet class folders (WordNet IDs such as n02085620) in {str(directory)!r}: "
            "point root at an ILSVRC-2012 tree whose train/ and val/ hold one folder per WordNet ID"
        )
    return {wnid: _WNID_LABEL[wnid] for wnid in sorted(wnids)}


def _split_samples(
    root: Path, class_to_idx_of: Callable[[Path], dict[str, int]], test_fraction: float, seed: int
) -> tuple[Samples, Samples, dict[str, int]]:
    """Train and test (path, label) lists and the class mapping, from the tree's own split if it has one."""
    presplit = _presplit(root)
    if presplit is None:
        class_to_idx = class_to_idx_of(root)
        train, test = _stratified_split(root, _samples(root, class_to_idx), test_fraction, seed)
        return train, test, class_to_idx
    train_dir, test_dir = presplit
    class_to_idx, test_classes = class_to_idx_of(train_dir), class_to_idx_of(test_dir)
    if class_to_idx != test_classes:
        differ = sorted(set(class_to_idx) ^ set(test_classes))
        raise RRMError(
            f"{str(train_dir)!r} and {str(test_dir)!r} hold different classes ({', '.join(differ[:5])}): "
            "give both splits the same class folders"
        )
    # Shuffled because ImageData.subset takes the first examples and folders are walked class by class.
    return (
        _shuffled(_samples(train_dir, class_to_idx), seed),
        _shuffled(_samples(test_dir, class_to_idx), seed),
        class_to_idx,
    )


def _presplit(root: Path) -> tuple[Path, Path] | None:
    """``(train, val or test)`` folders when the tree comes split, None when it is one tree to split here."""
    if not (root / "train").is_dir():
        return None
    test_dirs = [root / name for name in ("val", "test") if (root / name).is_dir()]
    if not test_dirs:
        raise RRMError(
            f"{str(root)!r} has a train/ folder but no val/ or test/: add one, or point root at a single "
            "tree of class folders"
        )
    return root / "train", test_dirs[0]


def _samples(directory: Path, class_to_idx: dict[str, int]) -> Samples:
    try:
        return make_dataset(directory, class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as exc:
        raise RRMError(f"{str(directory)!r}: {exc}; add images to those class folders or remove them") from None


def _stratified_split(root: Path, samples: Samples, test_fraction: float, seed: int) -> tuple[Samples, Samples]:
    try:
        return train_test_split(
            samples, test_size=test_fraction, random_state=seed, stratify=[label for _, label in samples]
        )
    except ValueError as exc:
        raise RRMError(
            f"cannot split {str(root)!r} into train and test ({exc}): add images to the small classes or "
            "change test_fraction"
        ) from None


def _shuffled(samples: Samples, seed: int) -> Samples:
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))
    return [samples[i] for i in order.tolist()]


def _load_images(samples: Samples, image_size: int, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every image into one preallocated uint8 tensor, so peak memory is the dataset and not twice it."""
    x = torch.empty((len(samples), 3, image_size, image_size), dtype=torch.uint8)
    for i, (path, _) in enumerate(Bar(samples, desc=desc, unit="img", disable=None, leave=False)):
        x[i] = decode_image(path, image_size)
    return x, torch.tensor([label for _, label in samples], dtype=torch.int64)
