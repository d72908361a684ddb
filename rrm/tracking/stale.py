"""Runs whose process died: every run is tagged with the host and process that own it, so a run left RUNNING by a
process that is gone (SIGKILL, out of memory, power loss) is found and marked FAILED."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run

from rrm.tracking.connection import mlflow_errors, store_client, warn
from rrm.tracking.environment import owner_pid
from rrm.tracking.uri import tracking_uri

__all__ = ["PROCESS_TAGS", "StaleRuns", "check_store", "clean_stale_runs", "process_alive", "process_tags"]

PROCESS_TAGS = ("rrm.host", "rrm.pid", "rrm.process_start")


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, Linux), so that a reused pid is not taken for it; None
    where ``/proc`` does not say. A zombie (killed, not yet reaped) counts as gone: "Z"."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return "Z" if fields[0] == "Z" else fields[19]


def process_tags() -> dict[str, str]:
    """The process that owns a run: a run left RUNNING after it is gone was never ended (SIGKILL, power loss)."""
    pid = owner_pid()
    tags = {"rrm.host": socket.gethostname(), "rrm.pid": str(pid)}
    started = _process_start(pid)
    if started:
        tags["rrm.process_start"] = started
    return tags


def process_alive(tags: Mapping[str, str]) -> bool | None:
    """Whether the process named by a run's tags is alive; None when it ran on another host (cannot be checked)."""
    if tags.get("rrm.host") != socket.gethostname() or not tags.get("rrm.pid", "").isdigit():
        return None
    pid = int(tags["rrm.pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    started, recorded = _process_start(pid), tags.get("rrm.process_start")
    if started == "Z":
        return False
    return not (started and recorded and started != recorded)  # a reused pid is another process


@dataclass
class StaleRuns:
    """What a clean-up found: runs it marked FAILED (id, reason), runs it left (id, why)."""

    marked: list[tuple[str, str]] = field(default_factory=list)
    left: list[tuple[str, str]] = field(default_factory=list)


def clean_stale_runs(
    run_ids: tuple[str, ...] | list[str] = (), *, dry_run: bool = False, client: MlflowClient | None = None
) -> StaleRuns:
    """Mark FAILED, with the reason in tag ``rrm.error``, the runs left RUNNING by a process that died.

    Without ``run_ids``: every RUNNING run of an rrm process on this host that is gone (rrm tags each run with its
    host and pid); runs of other hosts cannot be checked from here and are listed in ``left``. With ``run_ids``:
    those runs wherever they ran, unless one is not RUNNING or its process on this host is alive.
    """
    with mlflow_errors("cleaning up stale MLflow runs"):
        client = client or store_client()
        if run_ids:
            runs = [client.get_run(run_id) for run_id in run_ids]
        else:
            experiments = [e.experiment_id for e in client.search_experiments()]
            runs = (
                list(client.search_runs(experiments, "attributes.status = 'RUNNING'", max_results=1000))
                if experiments
                else []
            )
        found = _stale(runs, explicit=bool(run_ids))
        if not dry_run:
            for run_id, reason in found.marked:
                client.set_tag(run_id, "rrm.error", reason)
                client.set_terminated(run_id, "FAILED")
    return found


def _stale(runs: list[Run], explicit: bool) -> StaleRuns:
    """Which of ``runs`` to mark FAILED and why; ``explicit``: asked for by id, so marked unless known alive."""
    found = StaleRuns()
    for run in runs:
        tags, run_id = run.data.tags, run.info.run_id
        alive = process_alive(tags) if "rrm.pid" in tags else None
        where = f"pid {tags['rrm.pid']} on host {tags['rrm.host']}" if "rrm.pid" in tags else "an unknown process"
        if run.info.status != "RUNNING":
            found.left.append((run_id, f"it is {run.info.status}, not RUNNING"))
        elif alive:
            found.left.append((run_id, f"its process ({where}) is still running"))
        elif alive is None and not explicit:
            if "rrm.pid" in tags:
                found.left.append(
                    (
                        run_id,
                        f"its process ({where}) cannot be checked from this host: run `rrm runs "
                        "clean` there, or pass the run id",
                    )
                )
        elif alive is False:
            found.marked.append(
                (
                    run_id,
                    f"left RUNNING by {where}, which is gone (killed by SIGKILL or out of "
                    "memory, a power loss, or a tracking store that did not answer at its end)",
                )
            )
        else:
            found.marked.append((run_id, f"left RUNNING by {where}; marked FAILED by `rrm runs clean`"))
    return found


_cleaned: set[str] = set()  # stores whose stale runs this process has marked


def check_store(action: str) -> MlflowClient:
    """The store's client once it answered (one line, in seconds, when it does not); on the first call per store,
    runs left RUNNING by dead rrm processes of this host are marked FAILED, each with a warning."""
    with mlflow_errors(action):
        client = store_client()
        uri = tracking_uri()
        if uri in _cleaned:
            return client
        stale = clean_stale_runs(client=client)
        _cleaned.add(uri)
    for run_id, reason in stale.marked:
        warn(f"marked MLflow run {run_id} FAILED: {reason}")
    return client
