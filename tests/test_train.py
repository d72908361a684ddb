"""The trainer: every method runs, checkpoints resume exactly, bad input fails cleanly."""

import json
import math
import re

import pytest
import torch

from rrm.data import load_dataset
from rrm.errors import RRMError
from rrm.models import load_model
from rrm.stats import mean_ci
from rrm.train import METHODS, Callback, TrainConfig, train
from rrm.train.trainer import lr_factor


def _cfg(tmp_path, **kw):
    base = dict(
        dataset="digits",
        model="cnn",
        epochs=2,
        lr=0.05,
        eps=0.1,
        monitor_examples=64,
        progress=False,
        out_dir=str(tmp_path),
    )
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def robust_digits(tmp_path_factory, digits_teacher, digits):
    from rrm.robustify import robustify

    path = tmp_path_factory.mktemp("robust") / "digits-robust.safetensors"
    robustify(digits_teacher.model, digits.subset(n_train=256), path, steps=20, progress=False)
    return path


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_and_writes_its_files(tmp_path, method, digits, digits_teacher, robust_digits):
    teacher = str(digits_teacher.model_path)
    dataset = str(robust_digits) if method == "rdt" else "digits"
    cfg = _cfg(tmp_path, method=method, model="cnn-bn", teacher=teacher, dataset=dataset, replays=2)
    result = train(cfg, data=None if method == "rdt" else digits)
    assert len(result.history) == (1 if method == "free" else 2)
    assert result.summary["epochs"] == 2
    for name in ("model.pt", "checkpoint.pt", "train_metrics.json"):
        assert (tmp_path / name).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    _model, meta = load_model(tmp_path / "model.pt")
    assert meta["method"] == method and meta["dataset_digest"] == result.data.digest
    summary = json.loads((tmp_path / "train_metrics.json").read_text())
    assert summary["epoch_seconds_mean"] > 0 and 0 <= summary["test_accuracy"] <= 1
    assert 0 <= summary["monitor_robust_accuracy"] <= 1
    headline = json.loads((tmp_path / "train_metrics.headline.json").read_text())  # what `dvc metrics show` lists
    assert headline == {k: summary[k] for k in ("test_accuracy", "train_loss", "epochs", "total_flops")}


def test_free_counts_epochs_as_the_paper_does(tmp_path, digits):
    result = train(_cfg(tmp_path, method="free", epochs=8, replays=4), data=digits)
    assert len(result.history) == 2  # 2 passes x 4 replays = 8 paper epochs
    assert result.summary["epochs"] == 8
    per_pass = [h["epoch_seconds"] for h in result.history]
    assert result.summary["epoch_seconds_mean"] == pytest.approx(sum(per_pass) / 2 / 4)
    assert result.summary["total_seconds"] == pytest.approx(sum(per_pass))


class _StopAfter(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, epoch, metrics):
        if epoch == self.epoch:
            raise KeyboardInterrupt


@pytest.mark.parametrize("method", ["sat", "natural"])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, digits, method):
    kw = dict(method=method, epochs=3, deterministic=True, schedule="cosine", monitor_examples=32)
    full = train(_cfg(tmp_path / "full", **kw), data=digits)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path / "cut", **kw), data=digits, callbacks=[_StopAfter(2)])
    assert not (tmp_path / "cut" / "model.pt").exists()
    resumed = train(_cfg(tmp_path / "cut", resume=True, **kw), data=digits)
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path, digits):
    train(_cfg(tmp_path, epochs=1), data=digits)
    with pytest.raises(RRMError, match=r"other settings.*lr"):
        train(_cfg(tmp_path, epochs=2, lr=0.2, resume=True), data=digits)


def test_nan_loss_stops_with_a_clear_error_and_keeps_no_final_model(tmp_path, digits):
    with pytest.raises(RRMError, match=r"loss became nan.*lower --lr"):
        train(_cfg(tmp_path, lr=1e30, momentum=0.0, epochs=3, monitor_examples=0), data=digits)
    assert not (tmp_path / "model.pt").exists()


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(method="magic"), "unknown method"),
        (dict(dataset="imagenet22k"), "unknown dataset"),
        (dict(model="transformer"), "unknown model"),
        (dict(method="rrm", lam=0.0, teacher="t.pt"), "lambda must be > 0"),
        (dict(method="rrm", lam=-1.0, teacher="t.pt"), "lambda must be > 0"),
        (dict(eps=-0.1), "eps must be >= 0"),
        (dict(eps=3.0), "exceeds the"),
        (dict(norm="l1"), "unknown norm"),
        (dict(method="rrm"), "needs a teacher"),
        (dict(method="kd", teacher="missing.pt"), "does not exist"),
        (dict(method="rdt"), "not robustified|is not"),
        (dict(schedule="exponential"), "unknown schedule"),
    ],
)
def test_bad_input_raises_one_line_errors(tmp_path, kw, match):
    with pytest.raises(RRMError, match=match) as info:
        train(_cfg(tmp_path / "run", **kw))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run" / "model.pt").exists()


def test_feature_size_mismatch_names_the_fix(tmp_path, digits, digits_teacher):
    cfg = _cfg(tmp_path, method="rrm", model="resnet8", teacher=str(digits_teacher.model_path))
    with pytest.raises(RRMError, match="--feature-dim 128"):
        train(cfg, data=digits)
    result = train(cfg.replace(feature_dim=128, epochs=1), data=digits)
    assert result.model.feature_dim == 128


def test_teacher_for_another_dataset_is_rejected(tmp_path, digits_teacher):
    mnist = load_dataset("mnist5k").subset(256, 64)
    with pytest.raises(RRMError, match="use a teacher trained on this dataset"):
        train(_cfg(tmp_path, method="kd", teacher=str(digits_teacher.model_path)), data=mnist)


def test_learning_rate_schedules():
    assert lr_factor("cosine", 0.0, 0, (), 0.1) == pytest.approx(1.0)
    assert lr_factor("cosine", 0.5, 0, (), 0.1) == pytest.approx(0.5)
    assert lr_factor("cyclic", 0.4, 0, (), 0.1) == pytest.approx(1.0)
    assert lr_factor("cyclic", 0.2, 0, (), 0.1) == pytest.approx(0.5)
    assert lr_factor("cyclic", 1.0, 0, (), 0.1) == pytest.approx(0.0)
    assert lr_factor("step", 0.0, 49.9, (50, 100), 0.1) == pytest.approx(1.0)
    assert lr_factor("step", 0.0, 50, (50, 100), 0.1) == pytest.approx(0.1)
    assert lr_factor("step", 0.0, 120, (50, 100), 0.1) == pytest.approx(0.01)


def test_mean_ci_uses_the_t_quantile():
    mean, half = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert mean == pytest.approx(2.5)
    # t_{0.975, 3} = 3.182446, sd = 1.290994, n = 4
    assert half == pytest.approx(3.182446 * 1.290994 / 2, rel=1e-5)
    assert mean_ci([7.0]) == (7.0, 0.0)


def test_progress_shows_running_accuracy_a_whole_run_bar_and_a_line_per_epoch(tmp_path, digits, capsys):
    result = train(_cfg(tmp_path, method="natural", epochs=3, batch_size=256, progress=True), data=digits)
    err = capsys.readouterr().err
    steps = 3 * math.ceil(len(digits.train_y) / 256)
    assert f"/{steps} [" in err, "one bar over every step of every epoch, so its ETA is the whole run's"
    assert re.search(r"acc=[01]\.\d{3}, loss=", err), "running accuracy beside the loss"
    lines = [line.rsplit("\r", 1)[-1] for line in err.splitlines() if line.rsplit("\r", 1)[-1].startswith("epoch ")]
    assert len(lines) == 3
    for k, (line, h) in enumerate(zip(lines, result.history), start=1):
        assert line.startswith(f"epoch {k}/3: loss {h['loss']:.4f}, train acc {h['train_accuracy']:.4f}, ")
        assert f"test acc {h['test_accuracy']:.4f}, monitor robust acc {h['monitor_robust_accuracy']:.4f}, " in line
        assert line.endswith(f"{h['epoch_seconds']:.1f} s")


def test_no_progress_prints_nothing(tmp_path, digits, capsys):
    train(_cfg(tmp_path, method="natural", epochs=1, progress=False), data=digits)
    out = capsys.readouterr()
    assert out.err == "" and out.out == ""


def test_a_seed_gives_the_same_weights_again_and_the_run_records_its_thread_count(digits, tmp_path):
    """Seeded training is bit-for-bit repeatable on the same thread count, which the summary records: torch orders
    CPU float sums by its threads, so another count gives other weights from the same seed (docs/methods.md)."""

    def run(name: str, threads: int):
        cfg = _cfg(tmp_path / name, method="natural", epochs=1, seed=3, monitor_examples=0)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return train(cfg, data=digits)
        finally:
            torch.set_num_threads(previous)

    first, again, two = run("first", 1), run("again", 1), run("two", 2)
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()))
    assert (first.summary["threads"], two.summary["threads"]) == (1, 2)
    assert json.loads((tmp_path / "two" / "train_metrics.json").read_text())["threads"] == 2
