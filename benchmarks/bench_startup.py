"""How soon `rrm train` shows life on a terminal: seconds from the process start to its first byte on the terminal, to
its "training ...: loading" line (after torch and the command line load) and to its exit.

Each round runs `rrm train` (tracked, into a SQLite store in a temporary directory) under a pseudo-terminal, as a
user's shell does, and reads the terminal as it writes. Prints every round and the medians.

    python benchmarks/bench_startup.py                 # natural cnn, 1 epoch on digits, 5 rounds
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
    rrm = shutil.which("rrm") or str(Path(sys.executable).with_name("rrm"))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
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
