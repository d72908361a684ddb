"""Many clients on one MLflow server: trainings per second, and the latency each client sees, at 1, 4 and 16 clients.

For each client count N, against one local ``mlflow server`` (SQLite backend, artifacts proxied, as a team runs it):

- N tracked ``rrm train`` processes start at once (the smallest real training: one epoch of ``cnn`` on digits). It
  prints their wall time and runs per second, and checks that every run ended FINISHED with its final metrics, its
  artifacts (model, checkpoint, metrics JSON) and its logged model;
- N probe processes start at once, each timing 40 rounds of the calls a training makes of the server (an epoch's
  metrics in one ``log_batch``, a ``get_run``). It prints the median and 99th percentile over all calls.

The machine's state matters: with 2 cores, 16 trainings queue for the CPU, so runs/second measures the machine as
much as the server; the probes, which do no training, measure the server.

    python benchmarks/bench_load.py                       # 1, 4 and 16 clients, 2 server workers
    python benchmarks/bench_load.py --clients 1 4 --server-workers 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from mlflow import MlflowClient

PROBE = """
import json, sys, time
from mlflow import MlflowClient
from mlflow.entities import Metric
client = MlflowClient()
run = client.create_run(client.get_experiment_by_name("probe").experiment_id).info.run_id
times = []
for step in range(40):
    now = int(time.time() * 1000)
    metrics = [Metric(f"m{i}", float(step), now, step) for i in range(12)]
    start = time.perf_counter()
    client.log_batch(run, metrics=metrics)
    times.append(time.perf_counter() - start)
    start = time.perf_counter()
    client.get_run(run)
    times.append(time.perf_counter() - start)
client.set_terminated(run)
print("LATENCIES", json.dumps(times))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _server(root: Path, workers: int):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db"]
    command += ["--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--workers", str(workers)]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(root / "server.log", "w") as log:
        proc = subprocess.Popen(
            command, cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.status == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _all_at_once(commands: list[list[str]], env: dict, cwd: Path) -> tuple[float, list[subprocess.CompletedProcess]]:
    start = time.perf_counter()
    procs = [
        subprocess.Popen(c, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in commands
    ]
    done = [subprocess.CompletedProcess(p.args, p.wait(), *p.communicate()) for p in procs]
    return time.perf_counter() - start, done


def _check_runs(client: MlflowClient, experiment: str, expected: int) -> list[str]:
    """What is wrong with the experiment's training runs: each must be FINISHED with its metrics, files and model."""
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    problems = [f"{len(runs)} runs, not {expected}"] if len(runs) != expected else []
    for run in runs:
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        missing = {"model.pt", "checkpoint.pt", "train_metrics.json"} - artifacts
        missing |= {"test_accuracy", "total_flops", "loss"} - set(run.data.metrics)
        if run.info.status != "FINISHED" or missing or not (run.outputs and run.outputs.model_outputs):
            problems.append(f"run {run.info.run_id}: {run.info.status}, missing {sorted(missing)}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--server-workers", type=int, default=2)
    args = parser.parse_args()
    rrm = str(Path(sys.executable).with_name("rrm"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with _server(root, args.server_workers) as url:
            env = {**os.environ, "MLFLOW_TRACKING_URI": url, "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1"}
            client = MlflowClient(url)
            client.create_experiment("probe")
            print(f"mlflow server, {args.server_workers} workers, SQLite; {os.cpu_count()} cores; {time.ctime()}")
            for n in args.clients:
                experiment = f"load-{n}"
                commands = [
                    [rrm, "train", "--dataset", "digits", "--model", "cnn", "--epochs", "1", "--monitor-examples", "0"]
                    + ["--no-progress", "--experiment", experiment, "--seed", str(i), "--out-dir", f"{experiment}/{i}"]
                    for i in range(n)
                ]
                wall, done = _all_at_once(commands, env, root)
                failed = [d.stderr.strip().splitlines()[-1:] for d in done if d.returncode != 0]
                problems = _check_runs(client, experiment, n) + [f"exit: {f}" for f in failed]
                print(
                    f"{n:2d} trainings at once: {wall:6.1f} s, {n / wall:.2f} runs/s; "
                    + ("every run FINISHED with its metrics, files and model" if not problems else "; ".join(problems))
                )
                wall, done = _all_at_once([[sys.executable, "-c", PROBE]] * n, env, root)
                latencies = sorted(
                    t
                    for d in done
                    for line in d.stdout.splitlines()
                    if line.startswith("LATENCIES ")  # MLflow prints lines of its own
                    for t in json.loads(line.split(" ", 1)[1])
                )
                if len(latencies) < 80 * n:
                    print(f"   probes: {sum(d.returncode != 0 for d in done)} failed: {done[0].stderr[-500:]}")
                if latencies:
                    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
                    print(
                        f"{n:2d} probes at once: {len(latencies)} calls, p50 {1000 * statistics.median(latencies):.0f} "
                        f"ms, p99 {1000 * p99:.0f} ms"
                    )


if __name__ == "__main__":
    main()
