"""How soon `rrm` answers: the commands that need no model against importing torch, and how soon `rrm train` shows
life on a terminal.

First, side by side in each round (the order rotating, so drifts in machine load hit all alike): the wall time of
`rrm --help`, `rrm pipeline list` and `rrm train --help` to their exit, and of `python -c "import torch"` as the
yardstick; prints the medians and each as a ratio of the torch import. Then `rrm train` (tracked, into a SQLite store
in a temporary directory) under a pseudo-terminal, as a user's shell runs it: seconds to its first byte on the
terminal, to its "training ...: loading" line (after torch and the command line load) and to its exit.

    python benchmarks/bench_startup.py                 # 5 rounds of each
    python benchmarks/bench_startup.py --rounds 10
"""

from __future__ import annotations

import argparse
import os
import pty
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _round(work: Path, out_dir: str) -> tuple[float, float, float]:
    """Seconds to the first byte, to the start line and to the exit of one `rrm train` on a terminal."""
    rrm = os.path.abspath(shutil.which("rrm") or Path(sys.executable).with_name("rrm"))
    command = [rrm, "train", "--dataset", "digits", "--model", "cnn", "--epochs", "1", "--out-dir", out_dir]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "MLFLOW_DISABLE_TELEMETRY": "true"}
    main, terminal = pty.openpty()
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)
    os.close(terminal)
    first = line = None
    seen = b""
    while True:
        ready, _, _ = select.select([main], [], [], 0.01)
        if ready:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # the terminal closed: the process is gone
                break
            if not chunk:
                break
            now = time.perf_counter() - started
            first = first if first is not None else now
            seen += chunk
            if line is None and b": loading" in seen:
                line = now
        elif proc.poll() is not None:
            break
    proc.wait()
    os.close(main)
    if proc.returncode != 0:
        raise SystemExit(f"rrm train failed ({proc.returncode}): {seen.decode(errors='replace')[-500:]}")
    return first, line, time.perf_counter() - started


def _commands(rounds: int) -> None:
    rrm = os.path.abspath(shutil.which("rrm") or Path(sys.executable).with_name("rrm"))
    root = Path(__file__).resolve().parents[1]  # where pipelines/ is
    commands = {
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "rrm --help": [rrm, "--help"],
        "rrm pipeline list": [rrm, "pipeline", "list"],
        "rrm train --help": [rrm, "train", "--help"],
    }
    seconds: dict[str, list[float]] = {name: [] for name in commands}
    names = list(commands)
    for i in range(rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            started = time.perf_counter()
            subprocess.run(commands[name], cwd=root, check=True, capture_output=True)
            seconds[name].append(time.perf_counter() - started)
    torch_import = statistics.median(seconds[names[0]])
    for name in names:
        median = statistics.median(seconds[name])
        print(f"{name:26s} median of {rounds}: {median:.2f} s, {median / torch_import:.2f}x the torch import")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    _commands(args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _round(work, "warmup")  # creates the store
        rounds = []
        for i in range(args.rounds):
            first, line, total = _round(work, f"run{i}")
            rounds.append((first, line, total))
            print(f"round {i + 1}: first byte {first:.2f} s, start line {line:.2f} s, exit {total:.2f} s", flush=True)
    first, line, total = (statistics.median(r[k] for r in rounds) for k in range(3))
    print(
        f"rrm train (natural cnn, 1 epoch on digits, tracked), median of {args.rounds}: first byte on the terminal "
        f"{first:.2f} s, start line {line:.2f} s, exit {total:.2f} s"
    )


if __name__ == "__main__":
    main()
