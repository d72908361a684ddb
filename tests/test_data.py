"""Datasets: the embedded sets, the prepared-file format, splits, batching, augmentation and the on-disk loaders."""

from __future__ import annotations

import functools
import hashlib
import operator
import pickle
import re
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
from PIL import Image
from safetensors.torch import save_file
from torchvision.datasets import CIFAR10

import rrm.data.core
from rrm.data import (
    DATASETS,
    ImageData,
    augment_batch,
    batches,
    load_dataset,
    prepare_dataset,
    read_dataset,
    save_dataset,
)
from rrm.data.folders import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    RESTRICTED_IMAGENET_MEAN,
    RESTRICTED_IMAGENET_RANGES,
    RESTRICTED_IMAGENET_STD,
    RESTRICTED_IMAGENET_WNIDS,
    cifar10,
    imagefolder,
    restricted_imagenet,
)
from rrm.errors import RRMError


def _indexed(n: int = 40, num_classes: int = 4) -> ImageData:
    """Float images whose first pixel is their training index, so every split and batch can be traced back."""
    x = torch.rand(n, 1, 4, 4) * 0.5
    x[:, 0, 0, 0] = torch.arange(n) / 1000
    y = torch.arange(n) % num_classes
    return ImageData(
        name="indexed",
        train_x=x,
        train_y=y,
        test_x=x[:4].clone(),
        test_y=y[:4].clone(),
        classes=tuple("abcd"[:num_classes]),
    )


def _ids(x: torch.Tensor) -> list[int]:
    return [round(v * 1000) for v in x[:, 0, 0, 0].tolist()]


# --- embedded datasets --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist() -> ImageData:
    return DATASETS["mnist5k"]()


def test_mnist5k_is_a_fixed_stratified_4000_1000_split_of_uint8_images(mnist):
    assert (len(mnist.train_y), len(mnist.test_y)) == (4000, 1000)
    assert torch.bincount(mnist.train_y).tolist() == [400] * 10
    assert torch.bincount(mnist.test_y).tolist() == [100] * 10
    assert mnist.train_x.dtype == torch.uint8 and mnist.input_shape == (1, 28, 28)
    assert int(mnist.train_x.min()) == 0 and int(mnist.train_x.max()) == 255
    assert DATASETS["mnist5k"]().digest == mnist.digest


def test_digits_is_1500_297_floats_in_unit_range():
    data = DATASETS["digits"]()
    assert (len(data.train_y), len(data.test_y)) == (1500, 297)
    assert data.train_x.dtype == torch.float32 and data.input_shape == (1, 8, 8)
    assert float(data.train_x.min()) == 0.0 and float(data.train_x.max()) == 1.0


# --- prepared files -----------------------------------------------------------------------------------------------


def test_prepared_file_reads_back_equal(tmp_path):
    data, digest = prepare_dataset("digits", tmp_path / "digits.safetensors")
    back = read_dataset(tmp_path / "digits.safetensors")
    assert back.digest == digest == data.digest
    for key in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(back, key), getattr(data, key))
    assert (back.classes, back.mean, back.std, back.source) == (data.classes, data.mean, data.std, data.source)
    assert load_dataset(tmp_path / "digits.safetensors").digest == digest
    assert [p.name for p in tmp_path.iterdir()] == ["digits.safetensors"]


def test_altered_tensor_bytes_fail_the_digest(tmp_path):
    path = tmp_path / "d.safetensors"
    save_dataset(_indexed(), path)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # the last byte belongs to the last tensor's data, so the file still parses
    path.write_bytes(bytes(raw))
    with pytest.raises(RRMError, match="does not match its digest"):
        read_dataset(path)
    assert read_dataset(path, verify=False).name == "indexed"


def test_truncated_missing_and_foreign_files_are_errors(tmp_path):
    path = tmp_path / "d.safetensors"
    save_dataset(_indexed(), path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(RRMError, match="corrupt"):
        read_dataset(path)
    with pytest.raises(RRMError, match="does not exist"):
        read_dataset(tmp_path / "absent.safetensors")
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(RRMError, match="not an rrm dataset"):
        read_dataset(tmp_path / "weights.safetensors")


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def half_write(tensors, filename, metadata):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(rrm.data.core, "save_file", half_write)
    with pytest.raises(OSError):
        save_dataset(_indexed(), tmp_path / "d.safetensors")
    assert list(tmp_path.iterdir()) == []


# --- splits -------------------------------------------------------------------------------------------------------


def test_validation_split_is_stratified_disjoint_and_deterministic():
    data = _indexed(n=40, num_classes=4)
    split = data.validation_split(fraction=0.2, seed=3)
    assert torch.bincount(split.test_y).tolist() == [2, 2, 2, 2]
    train_ids, val_ids = _ids(split.train_x), _ids(split.test_x)
    assert not set(train_ids) & set(val_ids)
    assert sorted(train_ids + val_ids) == list(range(40))
    assert all(data.train_y[i] == y for i, y in zip(val_ids, split.test_y.tolist()))
    assert _ids(data.validation_split(fraction=0.2, seed=3).test_x) == val_ids
    assert _ids(data.validation_split(fraction=0.2, seed=4).test_x) != val_ids
    assert split.source["validation_of"] == "indexed"
    with pytest.raises(RRMError, match="fraction"):
        data.validation_split(fraction=1.0)


def test_subset_takes_the_first_examples():
    small = _indexed().subset(n_train=5, n_test=2)
    assert _ids(small.train_x) == [0, 1, 2, 3, 4] and small.train_y.tolist() == [0, 1, 2, 3, 0]
    assert len(small.test_y) == 2


# --- batching and augmentation ------------------------------------------------------------------------------------


def test_shuffled_batches_cover_every_example_once():
    data = _indexed(n=10)
    g = torch.Generator().manual_seed(0)
    seen = [i for xb, _ in batches(data.train_x, data.train_y, 4, shuffle=True, generator=g) for i in _ids(xb)]
    assert sorted(seen) == list(range(10)) and seen != list(range(10))


def test_batches_scale_uint8_to_unit_floats_and_drop_last():
    x = torch.arange(10 * 4, dtype=torch.uint8).reshape(10, 1, 2, 2) * 6
    y = torch.arange(10)
    kept = list(batches(x, y, 4))
    assert [len(yb) for _, yb in kept] == [4, 4, 2]
    assert kept[0][0].dtype == torch.float32 and torch.equal(kept[0][0], x[:4].float() / 255)
    assert [len(yb) for _, yb in batches(x, y, 4, drop_last=True)] == [4, 4]


def test_seeded_generator_reproduces_the_order():
    x, y = torch.rand(20, 1, 2, 2), torch.arange(20)

    def order(seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return [i for _, yb in batches(x, y, 8, shuffle=True, generator=g) for i in yb.tolist()]

    assert order(0) == order(0) != order(1)


def _crops(image: torch.Tensor, pad: int) -> dict[tuple[int, int, bool], torch.Tensor]:
    """Every output crop-flip may produce for one image, computed by hand: shift (dy, dx) in the padded image, flip."""
    h, w = image.shape[1:]
    padded = torch.zeros(image.shape[0], h + 2 * pad, w + 2 * pad)
    padded[:, pad : pad + h, pad : pad + w] = image
    out = {}
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            out[dy, dx, False], out[dy, dx, True] = crop, crop.flip(2)
    return out


def test_crop_flip_matches_hand_computed_shifts_and_flips():
    image = torch.rand(3, 16, 16)
    batch = image.expand(200, -1, -1, -1).contiguous()
    out = augment_batch(batch, "crop-flip", torch.Generator().manual_seed(0))
    assert out.shape == batch.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    candidates = _crops(image, pad=2)
    made = [next(k for k, crop in candidates.items() if torch.equal(o, crop)) for o in out]
    assert {flip for _, _, flip in made} == {True, False}
    assert len({(dy, dx) for dy, dx, _ in made}) == 25  # every shift of the 5 x 5 grid occurs in 200 draws
    again = augment_batch(batch, "crop-flip", torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_crop_never_flips_and_none_is_identity():
    image = torch.rand(1, 8, 8)
    batch = image.expand(50, -1, -1, -1).contiguous()
    candidates = _crops(image, pad=1)
    out = augment_batch(batch, "crop", torch.Generator().manual_seed(1))
    flips = {next(k for k, crop in candidates.items() if torch.equal(o, crop))[2] for o in out}
    assert flips == {False}
    assert augment_batch(batch, "none") is batch


# --- CIFAR-10 -----------------------------------------------------------------------------------------------------


def _write_cifar(root: Path, per_batch: int = 3) -> tuple[np.ndarray, list[int], np.ndarray, list[int]]:
    """A tiny copy in the real on-disk format: pickled dicts of uint8 (N, 3072) rows (R, G, B planes) and labels."""
    folder = root / CIFAR10.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = {
        name: rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        for name, _ in CIFAR10.train_list + CIFAR10.test_list
    }
    labels = {name: [(i + k) % 10 for k in range(per_batch)] for i, name in enumerate(rows)}
    for name in rows:
        (folder / name).write_bytes(pickle.dumps({"data": rows[name], "labels": labels[name]}))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / CIFAR10.meta["filename"]).write_bytes(pickle.dumps({"label_names": names}))
    train = [name for name, _ in CIFAR10.train_list]
    return (
        np.concatenate([rows[n] for n in train]),
        functools.reduce(operator.iadd, (labels[n] for n in train), []),
        rows["test_batch"],
        labels["test_batch"],
    )


@pytest.fixture
def cifar_root(tmp_path, monkeypatch) -> tuple[Path, tuple]:
    """A tiny CIFAR-10 copy whose checksums torchvision is told, the way it is told the real ones.

    torchvision verifies each file's md5 against class attributes. The test swaps those for the md5s of the files
    it wrote, so the loader runs unchanged, checksums included: a byte altered afterwards still fails.
    """
    root = tmp_path / "cifar10"
    arrays = _write_cifar(root)

    def md5(name: str) -> str:
        return hashlib.md5((root / CIFAR10.base_folder / name).read_bytes()).hexdigest()

    monkeypatch.setattr(CIFAR10, "train_list", [[name, md5(name)] for name, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[name, md5(name)] for name, _ in CIFAR10.test_list])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5(CIFAR10.meta["filename"])})
    return root, arrays


@pytest.fixture
def downloads(monkeypatch) -> list[str]:
    """Records download attempts instead of making them (there is no network in tests)."""
    calls = []

    def fake_download(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", fake_download)
    return calls


def test_cifar10_reads_a_local_copy_as_nchw(cifar_root, downloads):
    root, (train_rows, train_labels, test_rows, test_labels) = cifar_root
    data = DATASETS["cifar10"](root=root)
    assert data.train_x.shape == (15, 3, 32, 32) and data.test_x.shape == (3, 3, 32, 32)
    assert torch.equal(data.train_x, torch.from_numpy(train_rows.reshape(-1, 3, 32, 32)))
    assert torch.equal(data.test_x, torch.from_numpy(test_rows.reshape(-1, 3, 32, 32)))
    assert data.train_y.tolist() == train_labels and data.test_y.tolist() == test_labels
    assert data.train_y.dtype == torch.int64 and data.classes[:2] == ("airplane", "automobile")
    assert (data.augment, data.mean, data.std) == ("crop-flip", CIFAR10_MEAN, CIFAR10_STD)
    assert cifar10(root, download=True).digest == data.digest  # a verified copy is not downloaded again
    assert downloads == []


def test_cifar10_damaged_file_is_an_error(cifar_root):
    root, _ = cifar_root
    batch = root / CIFAR10.base_folder / "data_batch_3"
    raw = bytearray(batch.read_bytes())
    raw[-10] ^= 0xFF
    batch.write_bytes(bytes(raw))
    with pytest.raises(RRMError, match="checksums") as err:
        cifar10(root)
    assert "\n" not in str(err.value)


def test_cifar10_missing_says_where_to_put_it_and_downloads_only_when_asked(tmp_path, downloads):
    with pytest.raises(RRMError, match=re.escape(f"under '{tmp_path / 'none'}'")) as err:
        cifar10(tmp_path / "none")
    assert "cifar-10-batches-py" in str(err.value) and "\n" not in str(err.value)
    assert downloads == []
    with pytest.raises(RRMError, match="could not download"):
        cifar10(tmp_path / "none", download=True)
    assert downloads == [CIFAR10.url]


# --- image folders ------------------------------------------------------------------------------------------------

CLASSES = ("ant", "bee", "cow")


def _png(path: Path, channel: int, value: int, mode: str = "RGB") -> None:
    """A 40 x 24 image: a centre band of ``value`` in ``channel`` between black bars that the centre crop to 16 x 16
    removes (at 8 x 8 the resize would blend the bars into the band's edge)."""
    pixels = np.zeros((24, 40, 4), np.uint8)
    pixels[:, 6:34, channel] = value
    pixels[..., 3] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGBA").convert(mode).save(path)


def _tree(root: Path, per_class: int, first_value: int = 200) -> None:
    """Class k's images carry distinct values in channel k; class "bee" is stored as RGBA to exercise conversion."""
    for k, name in enumerate(CLASSES):
        for i in range(per_class):
            _png(root / name / f"{i}.png", k, first_value + 5 * i, "RGBA" if name == "bee" else "RGB")


def _check_pixels(x: torch.Tensor, y: torch.Tensor) -> list[int]:
    """Each image is its class's solid colour after the centre crop; returns the values, which identify the files."""
    values = []
    for image, label in zip(x, y.tolist()):
        assert image[label].unique().numel() == 1
        assert int(image.sum(dim=(1, 2)).count_nonzero()) == 1
        values.append(int(image[label, 0, 0]))
    return values


def test_imagefolder_splits_one_tree_stratified(tmp_path):
    _tree(tmp_path, per_class=5)
    data = DATASETS["imagefolder"](root=tmp_path, image_size=16, test_fraction=0.2, seed=0)
    assert data.classes == CLASSES and data.augment == "crop-flip"
    assert data.train_x.shape == (12, 3, 16, 16) and data.train_x.dtype == torch.uint8
    assert torch.bincount(data.train_y).tolist() == [4, 4, 4] and torch.bincount(data.test_y).tolist() == [1, 1, 1]
    train = list(zip(data.train_y.tolist(), _check_pixels(data.train_x, data.train_y)))
    test = list(zip(data.test_y.tolist(), _check_pixels(data.test_x, data.test_y)))
    assert sorted(train + test) == [(k, 200 + 5 * i) for k in range(3) for i in range(5)]
    assert imagefolder(tmp_path, image_size=16).digest == data.digest
    assert imagefolder(tmp_path, image_size=16, seed=1).digest != data.digest


def test_imagefolder_uses_train_and_val_folders(tmp_path):
    _tree(tmp_path / "train", per_class=3, first_value=200)
    _tree(tmp_path / "val", per_class=2, first_value=100)
    data = load_dataset("imagefolder", root=tmp_path, image_size=16)
    assert data.classes == CLASSES and data.input_shape == (3, 16, 16)
    assert (len(data.train_y), len(data.test_y)) == (9, 6)
    assert all(v >= 200 for v in _check_pixels(data.train_x, data.train_y))
    assert all(v < 200 for v in _check_pixels(data.test_x, data.test_y))
    assert data.train_y.tolist() != sorted(data.train_y.tolist())  # shuffled, so subset() stays balanced


@pytest.mark.parametrize(
    "layout, message",
    [
        ("missing", "does not exist"),
        ("empty", "no class folders"),
        ("empty-class", "no valid file"),
        ("unreadable", "cannot read image"),
        ("train-only", "no val/ or test/"),
        ("mismatched", "different classes"),
        ("one-per-class", "cannot split"),
    ],
)
def test_imagefolder_problems_are_one_line_errors(tmp_path, layout, message):
    root = tmp_path / "tree"
    if layout != "missing":
        root.mkdir()
    if layout == "empty-class":
        _tree(root, per_class=2)
        (root / "dog").mkdir()
    if layout == "unreadable":
        _tree(root, per_class=5)
        (root / "ant" / "broken.png").write_bytes(b"not a png")
    if layout in ("train-only", "mismatched"):
        _tree(root / "train", per_class=2)
    if layout == "mismatched":
        _tree(root / "val", per_class=2)
        (root / "val" / "dog").mkdir()
        _png(root / "val" / "dog" / "0.png", 0, 10)
    if layout == "one-per-class":
        _tree(root, per_class=1)
    with pytest.raises(RRMError, match=message) as err:
        imagefolder(root, image_size=8)
    assert "\n" not in str(err.value)


# --- Restricted ImageNet ------------------------------------------------------------------------------------------


def test_restricted_imagenet_table_matches_the_published_ranges():
    assert list(RESTRICTED_IMAGENET_WNIDS) == list(RESTRICTED_IMAGENET_RANGES)
    for name, (first, last) in RESTRICTED_IMAGENET_RANGES.items():
        assert len(RESTRICTED_IMAGENET_WNIDS[name]) == last - first + 1, name
    # Index order is WordNet-ID order in ILSVRC-2012, so the groups sorted by range start must be one sorted run.
    by_start = sorted(RESTRICTED_IMAGENET_RANGES, key=lambda n: RESTRICTED_IMAGENET_RANGES[n][0])
    run = [wnid for name in by_start for wnid in RESTRICTED_IMAGENET_WNIDS[name]]
    assert all(re.fullmatch(r"n\d{8}", w) for w in run) and run == sorted(run) and len(set(run)) == len(run)


# (wnid, super-class label or None when outside the 9 ranges): first and last dog, a cat, a frog, the last fish,
# and neighbours just outside: timber wolf (index 269) and tench (index 0).
WNIDS = [
    ("n02085620", 0),
    ("n02113978", 0),
    ("n02123045", 1),
    ("n01641577", 2),
    ("n02655020", 6),
    ("n02114367", None),
    ("n01440764", None),
]


def test_restricted_imagenet_maps_wnids_to_super_classes(tmp_path):
    for split, count in (("train", 2), ("val", 1)):
        for j, (wnid, _) in enumerate(WNIDS):
            for i in range(count):
                _png(tmp_path / split / wnid / f"{i}.png", 0, 10 * (j + 1) + i)
    data = DATASETS["restricted-imagenet"](root=tmp_path, image_size=16)
    assert data.classes == ("dog", "cat", "frog", "turtle", "bird", "primate", "fish", "crab", "insect")
    assert (data.mean, data.std) == (RESTRICTED_IMAGENET_MEAN, RESTRICTED_IMAGENET_STD)
    assert (len(data.train_y), len(data.test_y)) == (10, 5)
    for x, y in ((data.train_x, data.train_y), (data.test_x, data.test_y)):
        for image, label in zip(x, y.tolist()):
            wnid, expected = WNIDS[int(image[0, 0, 0]) // 10 - 1]
            assert label == expected, wnid
    assert torch.bincount(data.train_y, minlength=9).tolist() == [4, 2, 2, 0, 0, 0, 2, 0, 0]


def test_restricted_imagenet_without_matching_folders_is_an_error(tmp_path):
    _png(tmp_path / "train" / "n01440764" / "0.png", 0, 10)
    _png(tmp_path / "val" / "n01440764" / "0.png", 0, 10)
    with pytest.raises(RRMError, match="no Restricted ImageNet class folders"):
        restricted_imagenet(tmp_path)
