"""Sharded datasets: prepare in worker processes, read back lazily, train and shard across torchrun ranks as in memory,
resume an interrupted prepare, and name the file of a truncated or altered shard."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import one_torch_thread
from click.testing import CliRunner
from PIL import Image
from test_distributed import _flags, assert_same_trajectory, assert_same_weights, torchrun

from rrm import cli as rrm_cli
from rrm.data import augment_batch, batches, load_dataset, prepare_dataset
from rrm.data.core import _resized_crop_flip, shard_bounds
from rrm.data.folders import imagefolder_plan
from rrm.data.shard_writer import write_shards
from rrm.data.shards import MANIFEST, ShardedImages, open_shards
from rrm.errors import RRMError
from rrm.io import sha256_file
from rrm.train import TrainConfig, train

CLASSES = ("ant", "bee", "cow")


def _tree(root: Path, per_class: int = 12, seed: int = 0) -> None:
    """Random JPEGs and PNGs of assorted sizes (some not square, one greyscale), so decoding and resizing matter."""
    rng = np.random.default_rng(seed)
    for k, name in enumerate(CLASSES):
        for i in range(per_class):
            h, w = int(rng.integers(20, 48)), int(rng.integers(20, 48))
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            path = root / name / f"{i}.{'png' if i % 3 == 0 else 'jpg'}"
            path.parent.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(pixels)
            (image.convert("L") if k == 1 and i == 0 else image).save(path)


def _files(directory: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def mnist_small() -> object:
    return load_dataset("mnist5k").subset(1000, 200)


@pytest.fixture(scope="module")
def mnist_shards(tmp_path_factory, mnist_small) -> Path:
    out = tmp_path_factory.mktemp("mnist") / "shards"
    write_shards(mnist_small, out, shard_images=150)
    return out


# --- prepare and read back --------------------------------------------------------------------------------------


def test_prepare_reads_back_the_in_memory_pixels_labels_and_metadata(tmp_path):
    _tree(tmp_path / "tree")
    options = dict(root=tmp_path / "tree", image_size=16)
    memory = load_dataset("imagefolder", **options)
    lazy, digest = prepare_dataset("imagefolder", tmp_path / "a", shards=True, workers=2, shard_images=7, **options)

    assert isinstance(lazy.train_x, ShardedImages) and len(lazy.train_x.shards) == 4  # 28 images, 7 a shard
    assert torch.equal(lazy.train_x.read(), memory.train_x) and torch.equal(lazy.test_x.read(), memory.test_x)
    assert torch.equal(lazy.train_y, memory.train_y) and torch.equal(lazy.test_y, memory.test_y)
    assert (lazy.classes, lazy.augment, lazy.mean, lazy.std, lazy.source) == (
        memory.classes,
        memory.augment,
        memory.mean,
        memory.std,
        memory.source,
    )
    assert open_shards(tmp_path / "a").digest == digest == lazy.digest

    # a second prepare, on one worker this time, writes the same bytes and so the same digest
    _, digest_again = prepare_dataset("imagefolder", tmp_path / "b", shards=True, workers=1, shard_images=7, **options)
    assert digest_again == digest and _files(tmp_path / "a") == _files(tmp_path / "b")
    # what changes the data changes the digest
    _, other = prepare_dataset(
        "imagefolder", tmp_path / "c", shards=True, workers=1, shard_images=7, **{**options, "seed": 1}
    )
    assert other != digest


def test_views_read_only_their_rows_and_keep_a_digest(mnist_small, mnist_shards):
    lazy = open_shards(mnist_shards)
    assert lazy.train_x.shape == mnist_small.train_x.shape and len(lazy.train_x) == 1000
    rows = torch.tensor([999, 0, 149, 150, 151, 3, 4, 5, 700])  # across shard borders, runs and jumps
    assert torch.equal(lazy.train_x.read(rows), mnist_small.train_x[rows])
    assert torch.equal(lazy.train_x[140:160].read(), mnist_small.train_x[140:160])
    assert torch.equal(lazy.train_x[lazy.train_y == 3].read(), mnist_small.train_x[mnist_small.train_y == 3])
    assert lazy.train_x[:0].read().shape == (0, 1, 28, 28)

    split = lazy.validation_split(0.2, seed=0)
    reference = mnist_small.validation_split(0.2, seed=0)
    assert isinstance(split.test_x, ShardedImages)
    assert torch.equal(split.test_x.read(), reference.test_x) and torch.equal(split.test_y, reference.test_y)
    assert split.digest != lazy.digest and split.digest == lazy.validation_split(0.2, seed=0).digest


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- batches, training and torchrun -----------------------------------------------------------------------------


@pytest.mark.parametrize("augment", ["crop-flip", "resized-crop-flip"])
def test_shuffled_batches_and_every_ranks_share_equal_the_in_memory_ones(mnist_small, mnist_shards, augment):
    lazy = open_shards(mnist_shards)
    for shard in (None, (0, 2), (1, 2)):
        kw = dict(shuffle=True, augment=augment, shard=shard)
        memory = batches(
            mnist_small.train_x, mnist_small.train_y, 256, generator=torch.Generator().manual_seed(3), **kw
        )
        read = batches(lazy.train_x, lazy.train_y, 256, generator=torch.Generator().manual_seed(3), **kw)
        pairs = list(zip(memory, read, strict=True))
        assert len(pairs) == 4
        for (xm, ym), (xl, yl) in pairs:
            assert torch.equal(xm, xl) and torch.equal(ym, yl)


def test_each_rank_reads_only_its_share(mnist_shards, monkeypatch):
    lazy = open_shards(mnist_shards)
    read_rows: dict[int, list[int]] = {0: [], 1: []}
    original = ShardedImages.read
    for rank in (0, 1):
        monkeypatch.setattr(
            ShardedImages,
            "read",
            lambda self, index=None, pin=False, r=rank: (
                read_rows[r].extend(self.rows[index.numpy()].tolist()) or original(self, index, pin=pin)
            ),
        )
        list(
            batches(
                lazy.train_x,
                lazy.train_y,
                256,
                shuffle=True,
                generator=torch.Generator().manual_seed(0),
                shard=(rank, 2),
            )
        )
    assert not set(read_rows[0]) & set(read_rows[1])
    assert sorted(read_rows[0] + read_rows[1]) == list(range(1000))
    assert len(read_rows[0]) == sum(shard_bounds(n, 0, 2)[1] for n in (256, 256, 256, 232))


COMMON = dict(model="cnn", epochs=2, lr=0.05, batch_size=256, monitor_examples=0, progress=False)


@pytest.fixture(scope="module")
def single_on_shards(tmp_path_factory, mnist_shards):
    with one_torch_thread():
        return train(TrainConfig(**COMMON, dataset=str(mnist_shards), out_dir=str(tmp_path_factory.mktemp("one"))))


def test_training_on_shards_equals_training_in_memory(tmp_path, mnist_small, single_on_shards):
    with one_torch_thread():
        memory = train(TrainConfig(**COMMON, dataset="mnist5k", out_dir=str(tmp_path / "memory")), data=mnist_small)
    for lazy_epoch, memory_epoch in zip(single_on_shards.history, memory.history, strict=True):
        for key in ("loss", "train_accuracy", "test_accuracy", "epoch_flops"):
            assert lazy_epoch[key] == memory_epoch[key], key
    for (name, a), b in zip(single_on_shards.model.state_dict().items(), memory.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert single_on_shards.summary["dataset_digest"] == open_shards(single_on_shards.config.dataset).digest


def test_two_processes_on_shards_follow_the_single_process_trajectory(tmp_path, mnist_shards, single_on_shards):
    result = torchrun(
        tmp_path, "train", *_flags(COMMON), "--dataset", str(mnist_shards), "--out-dir", "ddp", "--no-track"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    history = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)["history"]
    assert_same_trajectory(history, single_on_shards.history)
    assert_same_weights(tmp_path / "ddp" / "model.pt", single_on_shards.model)


def test_data_on_device_needs_data_in_memory(tmp_path, mnist_shards):
    with pytest.raises(RRMError, match="drop --data-on-device"):
        train(TrainConfig(**COMMON, dataset=str(mnist_shards), data_on_device=True, out_dir=str(tmp_path / "r")))
    assert not (tmp_path / "r").exists()


# --- resuming, damage and bad input -----------------------------------------------------------------------------


def test_an_interrupted_prepare_resumes_keeping_its_finished_shards(tmp_path):
    _tree(tmp_path / "tree")
    options = dict(root=tmp_path / "tree", image_size=16, test_fraction=0.25)
    broken = Path(imagefolder_plan(**options).train[-1][0])  # in the last training shard
    good = broken.read_bytes()
    broken.write_bytes(b"not an image")
    out = tmp_path / "out"
    with pytest.raises(RRMError, match="cannot read image") as err:
        prepare_dataset("imagefolder", out, shards=True, workers=2, shard_images=5, **options)
    _one_line(err, str(broken), "finished shards stay in", "resumes")
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.safetensors")}
    assert kept and "train-00005.safetensors" not in kept and not (out / MANIFEST).exists()
    assert not list(out.glob(".*.tmp"))
    with pytest.raises(RRMError, match="did not finish"):
        load_dataset(out)
    (out / ".train-00001.safetensors.999.tmp").write_bytes(b"left by a killed worker")

    broken.write_bytes(good)
    _, digest = prepare_dataset("imagefolder", out, shards=True, workers=1, shard_images=5, **options)
    for name, stamp in kept.items():  # not written again
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == stamp, name
    assert not list(out.glob(".*"))
    _, fresh = prepare_dataset("imagefolder", tmp_path / "fresh", shards=True, workers=1, shard_images=5, **options)
    assert digest == fresh and _files(out) == _files(tmp_path / "fresh")

    # other options start over in the same directory: no shard of the old plan survives
    _, smaller = prepare_dataset("imagefolder", out, shards=True, workers=1, shard_images=30, **options)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "test-00000.safetensors", "train-00000.safetensors"]
    assert smaller != digest and open_shards(out).digest == smaller


def _one_line(err: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_a_truncated_shard_is_a_one_line_error_naming_it(tmp_path, mnist_small):
    out = tmp_path / "shards"
    write_shards(mnist_small, out, shard_images=300)
    shard = out / "train-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(RRMError) as err:
        load_dataset(out)
    _one_line(err, repr(str(shard)), "truncated", "rrm data prepare")
    shard.write_bytes(b"\x10")  # not even a header
    with pytest.raises(RRMError) as err:
        open_shards(out, verify=False)
    _one_line(err, repr(str(shard)), "truncated")
    shard.unlink()
    with pytest.raises(RRMError) as err:
        open_shards(out)
    _one_line(err, repr(str(shard)), "missing")


def test_a_shard_or_manifest_that_does_not_match_its_digest_is_a_one_line_error(tmp_path, mnist_small):
    out = tmp_path / "shards"
    write_shards(mnist_small, out, shard_images=300)
    shard = out / "test-00000.safetensors"
    blob = bytearray(shard.read_bytes())
    blob[-1] ^= 0xFF  # one pixel of the last test image
    shard.write_bytes(bytes(blob))
    data = load_dataset(out)  # opening reads no pixels: the shard is checked when rows of it are first read
    assert torch.equal(data.train_x.read(), mnist_small.train_x)  # the other shards are whole
    with pytest.raises(RRMError) as err:
        data.test_x[:1].read()  # a row of the damaged shard, not the damaged row itself
    _one_line(err, repr(str(shard)), "does not match its digest")
    assert open_shards(out, verify=False).test_x.read()[-1, 0, -1, -1] != mnist_small.test_x[-1, 0, -1, -1]

    blob[-1] ^= 0xFF
    shard.write_bytes(bytes(blob))
    manifest = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps({**manifest, "augment": "crop"}))
    with pytest.raises(RRMError) as err:
        load_dataset(out)
    _one_line(err, repr(str(out / MANIFEST)), "does not match its digest")


def test_each_shard_is_hashed_once_by_the_process_that_first_reads_it(tmp_path, mnist_small, monkeypatch):
    """Opening hashes nothing; a read hashes the shards its rows come from, once per process; a copy sent to another
    process (a spawned rank) keeps what was checked and hashes only the rest."""
    import pickle

    import rrm.data.shards as shards

    out = tmp_path / "shards"
    write_shards(mnist_small, out, shard_images=300)
    hashed: list[str] = []
    monkeypatch.setattr(shards, "sha256_file", lambda path: hashed.append(Path(path).name) or sha256_file(path))
    data = open_shards(out)
    assert hashed == []
    data.train_x[:10].read()
    assert hashed == ["train-00000.safetensors"]
    data.train_x[5:20].read()  # the same shard again, through another view
    assert hashed == ["train-00000.safetensors"]
    rank = pickle.loads(pickle.dumps(data.train_x))
    rank.read(torch.tensor([0, 299, 300, 650]))  # shards 0, 1 and 2
    assert sorted(hashed) == ["train-00000.safetensors", "train-00001.safetensors", "train-00002.safetensors"]
    data.train_x.read()
    assert sorted(hashed).count("train-00001.safetensors") == 2, "the copy's checks stay in its process"
    assert len(hashed) == len(set(hashed)) + 2  # the parent hashed shards 1 and 2 itself, and every other once
    before = len(hashed)
    open_shards(out, verify=False).train_x.read()
    assert len(hashed) == before


def test_cli_prepares_shards_and_reports_damage_in_one_line(tmp_path, cli_project):
    _tree(tmp_path / "tree", per_class=4)
    runner = CliRunner()
    args = "data prepare --dataset imagefolder --out rim --shards --workers 1 -o image_size=8 -o test_fraction=0.25"
    args = [*args.split(), "-o", f"root={tmp_path / 'tree'}"]
    result = runner.invoke(rrm_cli.cli, args)
    assert result.exit_code == 0, result.output
    assert "9 train / 3 test images 3x8x8 in 2 shards" in result.output
    train = ["train", "--dataset", "rim", "--epochs", "1", "--no-track", "--out-dir", "r"]
    shard = cli_project / "rim" / "train-00000.safetensors"
    blob = bytearray(shard.read_bytes())
    blob[-1] ^= 0xFF  # a pixel: the size and header still hold, the hash does not
    shard.write_bytes(bytes(blob))
    result = runner.invoke(rrm_cli.cli, train)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "train-00000.safetensors" in lines[0] and "does not match its digest" in lines[0], lines
    assert not (cli_project / "r").exists()
    (cli_project / "rim" / "test-00000.safetensors").write_bytes(b"\0" * 20)
    result = runner.invoke(rrm_cli.cli, train)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "test-00000.safetensors" in lines[0] and "truncated" in lines[0], result.stderr
    assert not (cli_project / "r").exists()


def test_a_params_file_section_prepares_shards(cli_project):
    (cli_project / "params.yaml").write_text(
        "prepare:\n  dataset: mnist5k\n  out: data/mnist\n  shards: true\n  shard_images: 2000\n"
    )
    result = CliRunner().invoke(rrm_cli.cli, ["data", "prepare", "--params", "params.yaml"])
    assert result.exit_code == 0, result.output
    data = load_dataset(cli_project / "data" / "mnist")
    assert len(data.train_x.shards) == 2 and data.digest == open_shards(cli_project / "data" / "mnist").digest


def test_float_images_are_sharded_as_they_are(tmp_path):
    """float32 pixels (the digits' scaled ones, a robustified set's) are kept bit for bit, not rounded to uint8; the
    manifest says which split holds which type."""
    data = load_dataset("digits")
    sharded, _ = prepare_dataset("digits", tmp_path / "out", shards=True, shard_images=500)
    assert sharded.train_x.dtype == sharded.test_x.dtype == torch.float32 and "float32" in repr(sharded.train_x)
    assert torch.equal(sharded.train_x.read(), data.train_x) and torch.equal(sharded.test_x.read(), data.test_x)
    assert torch.equal(sharded.train_x.read(torch.tensor([7, 3, 1200])), data.train_x[[7, 3, 1200]])
    manifest = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert manifest["dtypes"] == {"train": "float32", "test": "float32"} and len(manifest["splits"]["train"]) == 3
    assert load_dataset(str(tmp_path / "out")).digest == sharded.digest


@pytest.mark.parametrize(
    "case, message",
    [
        ("foreign files", "holds files that are not shards"),
        ("no workers", "workers must be at least 1"),
        ("workers without shards", "add --shards"),
    ],
)
def test_bad_prepare_input_is_one_line_and_writes_nothing(tmp_path, case, message):
    out = tmp_path / "out"
    kw = {"shards": True}
    name = "mnist5k"
    if case == "foreign files":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    if case == "no workers":
        kw["workers"] = 0
    if case == "workers without shards":
        kw = {"workers": 2}
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    with pytest.raises(RRMError) as err:
        prepare_dataset(name, out, **kw)
    _one_line(err, message)
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == before


# --- augmentation -----------------------------------------------------------------------------------------------


def test_resized_crop_flip_keeps_the_whole_image_at_full_scale_and_crops_otherwise():
    x = torch.rand(3, 3, 8, 8)
    whole = torch.tensor([[1.0] * 3, [0.5] * 3, [0.3] * 3, [0.7] * 3, [0.2, 0.9, 0.2]])  # area 1, ratio 1
    out = _resized_crop_flip(x, whole)
    assert torch.allclose(out[0], x[0].flip(2), atol=1e-6) and torch.allclose(out[1], x[1], atol=1e-6)
    assert torch.allclose(out[2], x[2].flip(2), atol=1e-6)

    solid = torch.full((4, 3, 8, 8), 0.25)  # any crop of a solid image is that image
    batch = augment_batch(solid, "resized-crop-flip", torch.Generator().manual_seed(0))
    assert torch.allclose(batch, solid, atol=1e-6)
    varied = augment_batch(x, "resized-crop-flip", torch.Generator().manual_seed(0))
    assert not torch.allclose(varied, x, atol=1e-2) and varied.min() >= 0 and varied.max() <= 1


def test_resized_crop_flip_of_a_ranks_rows_equals_those_rows_of_the_whole_batch():
    x = torch.rand(5, 3, 12, 12)
    whole = augment_batch(x, "resized-crop-flip", torch.Generator().manual_seed(7))
    part = augment_batch(x[2:4], "resized-crop-flip", torch.Generator().manual_seed(7), within=(2, 5))
    assert torch.equal(part, whole[2:4])


def test_the_augmentation_option_reaches_the_folder_datasets(tmp_path):
    _tree(tmp_path / "tree", per_class=4)
    data = load_dataset("imagefolder", root=tmp_path / "tree", image_size=8, augment="resized-crop-flip")
    assert data.augment == "resized-crop-flip" and data.source["augment"] == "resized-crop-flip"
    with pytest.raises(RRMError, match="unknown augmentation"):
        load_dataset("imagefolder", root=tmp_path / "tree", image_size=8, augment="mixup")


def test_open_descriptors_stay_bounded(tmp_path, mnist_small, monkeypatch):
    monkeypatch.setattr("rrm.data.shards._OPEN_FILES", 3)
    write_shards(mnist_small, tmp_path / "s", shard_images=50)  # 20 training shards
    lazy = open_shards(tmp_path / "s")
    before = len(os.listdir("/proc/self/fd"))
    assert torch.equal(lazy.train_x.read(torch.arange(0, 1000, 7)), mnist_small.train_x[::7])
    assert len(os.listdir("/proc/self/fd")) - before <= 3
