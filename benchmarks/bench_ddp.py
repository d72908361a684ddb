"""Training throughput (images/second) of natural and RRM training: one process against torchrun data parallelism,
and on a GPU with and without autocast, channels_last, torch.compile and a device-resident training set.

Every configuration is a real ``rrm train`` run (``python -m rrm.cli train``, or ``torchrun --standalone
--nproc-per-node N -m rrm.cli train``) on the same data with the same global batch, untracked and without the
per-epoch monitor. Throughput is training images per second of the median epoch after the first (warm-up,
compilation); epoch times are rank 0's, which include waiting for the other ranks. Runs take turns (every
configuration once per round), so drifts in machine load hit all of them alike. Printed side by side in one table
with the ratio to the first column of each method.

    python benchmarks/bench_ddp.py                            # mnist5k, cnn student, 2 processes, 4 epochs
    python benchmarks/bench_ddp.py --dataset digits --epochs 3 --rounds 2 --processes 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def run(out: Path, flags: list[str], *, processes: int, threads: int, device: str) -> float:
    """Median epoch seconds of one ``rrm train`` run, the first epoch (warm-up, compilation) left out."""
    launcher = (
        [sys.executable, "-m", "rrm.cli"]
        if processes == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(processes),
            "-m",
            "rrm.cli",
        ]
    )
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        *launcher,
        "train",
        *flags,
        "--device",
        device,
        "--no-track",
        "--no-progress",
        "--monitor-examples",
        "0",
        "--out-dir",
        str(out),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    history = torch.load(out / "checkpoint.pt", weights_only=True)["history"]
    return statistics.median(h["epoch_seconds"] for h in history[1:] or history)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128, help="the global batch")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()

    from rrm.data import load_dataset

    n_train = len(load_dataset(args.dataset).train_y)
    cuda = torch.cuda.is_available()
    # (label, processes, threads per process, device, extra flags)
    configs = [
        ("1 proc x 1 thread", 1, 1, "cpu", []),
        (f"1 proc x {args.processes} threads", 1, args.processes, "cpu", []),
        (f"{args.processes} procs x 1 thread (DDP)", args.processes, 1, "cpu", []),
    ]
    if cuda:
        configs += [
            ("GPU fp32", 1, 4, "cuda", ["--precision", "fp32", "--no-channels-last"]),
            ("GPU bf16", 1, 4, "cuda", ["--precision", "bf16", "--no-channels-last"]),
            ("GPU bf16+channels_last", 1, 4, "cuda", ["--precision", "bf16", "--channels-last"]),
            (
                "GPU bf16+cl+data on device",
                1,
                4,
                "cuda",
                ["--precision", "bf16", "--channels-last", "--data-on-device"],
            ),
            (
                "GPU bf16+cl+dod+compile",
                1,
                4,
                "cuda",
                ["--precision", "bf16", "--channels-last", "--data-on-device", "--compile"],
            ),
        ]
        if torch.cuda.device_count() >= args.processes:
            configs.append(
                (
                    f"{args.processes} GPUs DDP bf16+cl+dod",
                    args.processes,
                    4,
                    "cuda",
                    ["--precision", "bf16", "--channels-last", "--data-on-device"],
                )
            )

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = [
            "--dataset",
            args.dataset,
            "--model",
            args.model,
            "--epochs",
            str(args.epochs),
            "--batch-size",
            str(args.batch_size),
            "--lr",
            "0.05",
        ]
        teacher = tmp / "teacher"  # a quick natural teacher: throughput does not depend on its robustness
        run(teacher, [*base, "--epochs", "1"], processes=1, threads=args.processes, device="cpu")
        methods = {
            "natural": ["--method", "natural"],
            "rrm": ["--method", "rrm", "--teacher", str(teacher / "model.pt"), "--lambda", "0.5"],
        }
        seconds: dict[tuple[str, str], list[float]] = {}
        for r in range(args.rounds):
            for method, flags in methods.items():
                for label, processes, threads, device, extra in configs:
                    out = tmp / f"{method}-{len(seconds)}-{r}"
                    seconds.setdefault((method, label), []).append(
                        run(out, [*base, *flags, *extra], processes=processes, threads=threads, device=device)
                    )

    print(
        f"dataset={args.dataset} ({n_train} training images) model={args.model} global batch={args.batch_size} "
        f"epochs={args.epochs} rounds={args.rounds} cpus={os.cpu_count()} "
        f"gpu={torch.cuda.get_device_name() if cuda else 'none'} torch={torch.__version__}"
    )
    width = max(len(label) for label, *_ in configs) + 2
    print(f"{'configuration':<{width}}" + "".join(f"{m + ' img/s':>14}{'ratio':>8}" for m in methods))
    for label, *_ in configs:
        row = f"{label:<{width}}"
        for method in methods:
            first = n_train / statistics.median(seconds[(method, configs[0][0])])
            speed = n_train / statistics.median(seconds[(method, label)])
            row += f"{speed:>14.0f}{speed / first:>8.2f}"
        print(row)


if __name__ == "__main__":
    main()
