"""What MLflow tracking adds to a training, measured side by side: `rrm train` with and without `--no-track`.

Each round runs the same command twice, tracked and untracked (the order alternating between rounds, so drifts in
machine load hit both alike), as separate processes from start to exit, the way a user or a DVC stage runs it:
imports, data, training, the MLflow run and its artifacts. The store is a SQLite file in a temporary directory,
created by one tracked run before the rounds (a project's store exists after its first command). Prints every wall
and CPU time, the medians, and the median tracked wall time as a ratio of the untracked one. Tracking runs in a
worker process forked at the command's start (rrm.console, rrm.tracking.worker), so the wall-time ratio depends on a
free core: on a machine whose cores are all busy, the CPU seconds say what tracking costs.

    python benchmarks/bench_tracking.py                         # natural cnn-bn on mnist5k, 3 epochs, 3 rounds
    python benchmarks/bench_tracking.py --method sat --rounds 5
    python benchmarks/bench_tracking.py --dataset digits --model cnn
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _train(work: Path, args: argparse.Namespace, out_dir: str, tracked: bool) -> tuple[float, float]:
    """Wall and CPU seconds of one `rrm train` process."""
    rrm = shutil.which("rrm") or str(Path(sys.executable).with_name("rrm"))
    command = [
        rrm,
        "train",
        *("--method", args.method, "--model", args.model, "--dataset", args.dataset),
        *("--epochs", str(args.epochs), "--eps", "0.2", "--lr", "0.05", "--monitor-examples", "0"),
        *("--no-progress", "--out-dir", out_dir),
        *(() if tracked else ("--no-track",)),
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "MLFLOW_DISABLE_TELEMETRY": "true"}
    started, cpu = time.perf_counter(), _children_cpu()
    subprocess.run(command, cwd=work, env=env, check=True, capture_output=True)
    return time.perf_counter() - started, _children_cpu() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--model", default="cnn-bn")
    parser.add_argument("--method", default="natural", help="a method that needs no teacher")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _train(work, args, "warmup", tracked=True)  # creates the store
        wall: dict[bool, list[float]] = {True: [], False: []}
        cpu: dict[bool, list[float]] = {True: [], False: []}
        for i in range(args.rounds):
            for tracked in (True, False) if i % 2 == 0 else (False, True):
                seconds, cpu_seconds = _train(work, args, f"run{i}-{tracked}", tracked)
                wall[tracked].append(seconds)
                cpu[tracked].append(cpu_seconds)
                print(
                    f"round {i + 1}: {'tracked  ' if tracked else 'untracked'} {seconds:6.2f} s wall, "
                    f"{cpu_seconds:6.2f} s CPU",
                    flush=True,
                )
    with_tracking, without = statistics.median(wall[True]), statistics.median(wall[False])
    print(
        f"{args.method} {args.model} on {args.dataset}, {args.epochs} epochs, median of {args.rounds}: "
        f"tracked {with_tracking:.2f} s, untracked {without:.2f} s; tracked / untracked = "
        f"{with_tracking / without:.3f} (overhead {100 * (with_tracking / without - 1):+.1f}%); CPU seconds "
        f"{statistics.median(cpu[True]):.2f} / {statistics.median(cpu[False]):.2f}"
    )


if __name__ == "__main__":
    main()
