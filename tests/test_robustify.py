"""Robustified data: starts from other images, moves toward the target's teacher features, resumes after a crash."""

import pytest
import torch

import rrm.robustify as rb
from rrm.data import load_dataset, read_dataset, to_float
from rrm.data.shards import ShardedImages
from rrm.errors import RRMError
from rrm.train import TrainConfig, train


@pytest.fixture(scope="module")
def small(digits):
    return digits.subset(n_train=96, n_test=32)


def crash_on_call(monkeypatch, n: int) -> dict:
    """``match_features`` raises KeyboardInterrupt on its ``n``-th call; returns the call counter."""
    real, calls = rb.match_features, {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(rb, "match_features", crashing)
    return calls


def test_partners_are_always_other_images():
    partners = rb._partners(500, seed=3)
    assert (partners != torch.arange(500)).all()
    assert torch.equal(partners, rb._partners(500, seed=3))


def test_robustified_images_match_teacher_features_and_keep_labels(tmp_path, digits_teacher, small):
    teacher = digits_teacher.model
    out = tmp_path / "robust.safetensors"
    robust = rb.robustify(teacher, small, out, steps=30, step_size=0.1, batch_size=40, progress=False)
    assert robust.train_x.dtype == torch.float32
    assert robust.train_x.min() >= 0 and robust.train_x.max() <= 1
    assert torch.equal(robust.train_y, small.train_y) and torch.equal(robust.test_x, small.test_x)
    assert robust.source["kind"] == "robustified" and robust.source["from_digest"] == small.digest
    with torch.no_grad():
        goal = teacher.features(to_float(small.train_x))
        start = teacher.features(to_float(small.train_x[rb._partners(96, 0)]))
        reached = teacher.features(robust.train_x)
    before = (start - goal).norm(dim=1)
    after = (reached - goal).norm(dim=1)
    assert (after < before).float().mean() > 0.95
    assert after.mean() < 0.5 * before.mean()
    loaded = read_dataset(out)
    assert loaded.digest == robust.digest
    assert not (tmp_path / "robust.safetensors.partial.pt").exists()


def test_interrupted_robustify_resumes_to_the_same_result(tmp_path, digits_teacher, small, monkeypatch):
    teacher = digits_teacher.model
    full = rb.robustify(teacher, small, tmp_path / "full.safetensors", steps=5, batch_size=32, progress=False)

    calls = crash_on_call(monkeypatch, 3)  # the third batch
    out = tmp_path / "cut.safetensors"
    with pytest.raises(KeyboardInterrupt):
        rb.robustify(teacher, small, out, steps=5, batch_size=32, progress=False, save_every_s=0)
    assert not out.exists() and (tmp_path / "cut.safetensors.partial.pt").exists()
    calls["n"] = 10  # past the crash: count only the batches the resumed run still computes
    resumed = rb.robustify(teacher, small, out, steps=5, batch_size=32, progress=False, save_every_s=0)
    assert calls["n"] == 11  # two of three batches were kept from before the crash
    assert torch.equal(resumed.train_x, full.train_x)


def test_teacher_of_other_images_is_rejected(tmp_path, digits_teacher):
    from rrm.data import load_dataset

    with pytest.raises(RRMError, match="use a teacher trained on it"):
        rb.robustify(digits_teacher.model, load_dataset("mnist5k").subset(8, 8), tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


def test_streamed_into_shards_it_equals_the_file_and_resumes_after_its_last_shard(
    tmp_path, digits_teacher, small, monkeypatch
):
    """One batch a shard, float32 pixels: the same images as the one-file output, bit for bit; an interruption keeps
    the finished shards, and the same call finishes the rest; training reads the directory."""
    teacher = digits_teacher.model
    whole = rb.robustify(teacher, small, tmp_path / "whole.safetensors", steps=5, batch_size=32, progress=False)

    calls = crash_on_call(monkeypatch, 4)  # the third shard: the first call counts one image's FLOPs
    out = tmp_path / "robust"
    with pytest.raises(KeyboardInterrupt):
        rb.robustify(teacher, small, out, steps=5, batch_size=32, progress=False, shards=True)
    assert sorted(p.name for p in out.glob("train-*")) == ["train-00000.safetensors", "train-00001.safetensors"]
    assert not (out / "dataset.json").exists(), "no manifest: nothing reads a half-written set as whole"
    calls["n"] = 10
    streamed = rb.robustify(teacher, small, out, steps=5, batch_size=32, progress=False, shards=True)
    assert calls["n"] == 12, "one image's count and the one shard left"
    assert isinstance(streamed.train_x, ShardedImages) and streamed.train_x.dtype == torch.float32
    assert torch.equal(streamed.train_x.read(), whole.train_x) and torch.equal(streamed.test_x.read(), small.test_x)
    assert streamed.source == whole.source and torch.equal(streamed.train_y, whole.train_y)
    assert load_dataset(str(out)).digest == streamed.digest
    result = train(
        TrainConfig(
            dataset=str(out),
            model="cnn",
            method="rdt",
            epochs=1,
            monitor_examples=0,
            progress=False,
            out_dir=str(tmp_path / "student"),
        )
    )
    assert result.summary["epochs"] == 1 and (tmp_path / "student" / "model.pt").is_file()
