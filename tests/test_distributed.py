"""Data-parallel training under torchrun on CPU (gloo, 2 processes) against one process with the same global batch.

Tolerance: per-epoch loss terms and accuracy within a relative 1e-5 of the single-process run, final weights within
1e-4 of each tensor's largest magnitude. The two runs compute the same sums in another order (two half-batch
gradients added by all_reduce instead of one full-batch gradient), so they differ by float32 rounding (~1e-7
relative per step, measured 1e-7 on these settings) which SGD with momentum amplifies slowly; 12 steps of batch 256
stay two orders of magnitude inside the tolerance, while any real error (a rank on other data, a gradient not
averaged, a rank that skipped the checkpoint on resume) moves the loss by 1e-3 or more.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _helpers import copy_store, digits_file, one_torch_thread, worker_env

from rrm.data import batches, load_dataset
from rrm.data.core import shard_bounds
from rrm.errors import RRMError
from rrm.models import load_model
from rrm.train import Callback, TrainConfig, train

LOSS_TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 1e-4
# 1500 training digits in batches of 256: 6 steps an epoch, the last one a short batch of 220 (110 per rank).
COMMON = dict(dataset="digits", model="cnn", epochs=2, lr=0.05, batch_size=256, monitor_examples=0, progress=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The single-process run uses one thread like each torchrun worker, so both sum in the same kernels."""
    with one_torch_thread():
        yield


def _flags(values: dict) -> list[str]:
    """The command line of ``values``; the digits come from their prepared file (see :func:`_helpers.digits_file`)."""
    if values.get("dataset") == "digits":
        values = {**values, "dataset": digits_file()}
    flags = []
    for key, value in values.items():
        flag = "--" + ("lambda" if key == "lam" else key.replace("_", "-"))
        flags += [flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, str(value)]
    return flags


def torchrun(cwd: Path, *args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m rrm.cli ARGS`` (a free rendezvous port; one thread each)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "rrm.cli",
        *args,
    ]
    return subprocess.run(
        command, cwd=cwd, env=worker_env(**(env or {})), capture_output=True, text=True, timeout=timeout
    )


def _history(out_dir: Path) -> list[dict]:
    return torch.load(out_dir / "checkpoint.pt", weights_only=True)["history"]


def assert_same_trajectory(distributed: list[dict], single: list[dict]) -> None:
    assert len(distributed) == len(single)
    for epoch, (d, s) in enumerate(zip(distributed, single), start=1):
        terms = [k for k in s if k in ("loss", "ce", "representation", "kd", "alignment", "train_accuracy")]
        assert "loss" in terms
        for key in terms:
            assert d[key] == pytest.approx(s[key], rel=LOSS_TOLERANCE), (epoch, key, d[key], s[key])


def assert_same_weights(model_file: Path, model: torch.nn.Module) -> None:
    trained, _ = load_model(model_file)
    mine = model.state_dict()
    for key, value in trained.state_dict().items():
        scale = float(mine[key].abs().max()) or 1.0
        assert float((value - mine[key]).abs().max()) <= WEIGHT_TOLERANCE * scale, key


@pytest.fixture(scope="module")
def single_natural(tmp_path_factory, digits):
    return train(TrainConfig(**COMMON, out_dir=str(tmp_path_factory.mktemp("single-natural"))), data=digits)


def test_two_processes_follow_the_single_process_trajectory_and_write_one_run(
    tmp_path, single_natural, migrated_mlflow_db
):
    copy_store(migrated_mlflow_db, tmp_path / "mlflow.db")
    result = torchrun(
        tmp_path,
        "train",
        *_flags(COMMON),
        "--out-dir",
        "ddp",
        "--experiment",
        "ddp",
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("natural cnn on digits: test accuracy") == 1, "only rank 0 reports"

    assert_same_trajectory(_history(tmp_path / "ddp"), single_natural.history)
    assert_same_weights(tmp_path / "ddp" / "model.pt", single_natural.model)
    # mlflow_run.json: the run's id, so that --resume continues the same MLflow run
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == [
        "checkpoint.pt",
        "mlflow_run.json",
        "model.pt",
        "train_metrics.headline.json",
        "train_metrics.json",
    ]

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("ddp")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["batch_size"] == "256" and run.data.tags["rrm.processes"] == "2"
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
    assert losses == pytest.approx([h["loss"] for h in single_natural.history], rel=LOSS_TOLERANCE)
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert artifacts.count("checkpoint.pt") == artifacts.count("model.pt") == 1
    (logged,) = client.search_logged_models([experiment.experiment_id])  # one logged model, rank 0's
    assert logged.source_run_id == run.info.run_id


def test_rrm_with_a_replicated_teacher_follows_the_single_process_trajectory(tmp_path, digits, digits_teacher):
    values = dict(COMMON, method="rrm", lam=0.5, teacher=str(digits_teacher.model_path))
    single = train(TrainConfig(**values, out_dir=str(tmp_path / "single")), data=digits)
    result = torchrun(tmp_path, "train", *_flags(values), "--out-dir", "ddp", "--no-track")
    assert result.returncode == 0, result.stderr[-3000:]
    distributed = _history(tmp_path / "ddp")
    assert {"ce", "representation"} <= set(distributed[0])
    assert_same_trajectory(distributed, single.history)
    assert_same_weights(tmp_path / "ddp" / "model.pt", single.model)


class _StopAfter(Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        if epoch == self.epoch:
            raise KeyboardInterrupt


def test_two_processes_resume_a_checkpoint_to_the_uninterrupted_result(tmp_path, digits, single_natural):
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        # named as the command line names the digits: a resumed run must have the same settings
        cfg = TrainConfig(**{**COMMON, "dataset": digits_file()}, out_dir=str(cut))
        train(cfg, data=digits, callbacks=[_StopAfter(1)])
    assert len(_history(cut)) == 1 and not (cut / "model.pt").exists()
    result = torchrun(tmp_path, "train", *_flags(COMMON), "--out-dir", str(cut), "--resume", "--no-track")
    assert result.returncode == 0, result.stderr[-3000:]
    # Both ranks must load weights and momentum from the checkpoint, or the second epoch diverges.
    assert_same_trajectory(_history(cut), single_natural.history)
    assert_same_weights(cut / "model.pt", single_natural.model)


def test_a_global_batch_that_does_not_divide_among_the_processes_is_refused(tmp_path):
    result = torchrun(tmp_path, "train", *_flags({**COMMON, "batch_size": 255}), "--out-dir", "bad", "--no-track")
    assert result.returncode != 0
    assert (
        "batch_size 255 is the global batch and must be divisible by the 2 processes; use --batch-size 254"
        in result.stderr
    ), result.stderr[-3000:]
    assert not (tmp_path / "bad" / "checkpoint.pt").exists()


@pytest.mark.parametrize("augment", ["crop-flip", "none"])
def test_shards_of_a_batch_are_the_batch_split_and_augmented_alike(augment):
    x = torch.rand(10, 3, 16, 16)
    y = torch.arange(10)

    def run(shard):
        gen = torch.Generator().manual_seed(3)
        return list(batches(x, y, 4, shuffle=True, generator=gen, augment=augment, shard=shard))

    whole = run(None)
    parts = [run((rank, 3)) for rank in range(3)]
    assert [len(yb) for _, yb in whole] == [4, 4, 2]
    for i, (xb, yb) in enumerate(whole):
        bounds = [shard_bounds(len(yb), rank, 3) for rank in range(3)]
        real = [parts[rank][i] for rank, (start, stop) in enumerate(bounds) if stop > start]
        assert torch.equal(torch.cat([xs for xs, _ in real]), xb) and torch.equal(torch.cat([ys for _, ys in real]), yb)
        for rank, (start, stop) in enumerate(bounds):
            if stop == start:  # the last batch of 2 has no share for rank 2: a stand-in, weighted 0 by the trainer
                assert torch.equal(parts[rank][i][1], yb[:1]) and torch.equal(parts[rank][i][0], xb[:1])


def test_gpu_only_options_are_refused_on_a_single_cpu_process(tmp_path, digits):
    with pytest.raises(RRMError, match="--sync-batchnorm needs torchrun"):
        train(TrainConfig(**COMMON, sync_batchnorm=True, out_dir=str(tmp_path)), data=digits)


def test_data_on_device_trains_the_same_model(tmp_path, digits, single_natural):
    result = train(TrainConfig(**COMMON, data_on_device=True, device="cpu", out_dir=str(tmp_path)), data=digits)
    for key, value in result.model.state_dict().items():
        assert torch.equal(value, single_natural.model.state_dict()[key]), key


@pytest.mark.slow
def test_compiled_features_train_the_same_model(tmp_path, digits, single_natural):
    """torch.compile on CPU (inductor, a C compiler): about a minute on 2 cores, hence slow."""
    result = train(TrainConfig(**COMMON, compile=True, out_dir=str(tmp_path)), data=digits)
    assert "features" not in vars(result.model), "the compiled wrapper is dropped after training"
    assert_same_trajectory(result.history, single_natural.history)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_path_with_autocast_channels_last_and_data_on_device(tmp_path):
    data = load_dataset("digits")
    result = train(
        TrainConfig(
            **COMMON, device="cuda", precision="bf16", channels_last=True, data_on_device=True, out_dir=str(tmp_path)
        ),
        data=data,
    )
    assert result.summary["device"].startswith("cuda") and result.history[-1]["loss"] < result.history[0]["loss"]
