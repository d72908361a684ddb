"""MLflow runs that need care: the runs that processes which died left RUNNING."""

from __future__ import annotations

from rrm.jobs.common import tracking

__all__ = ["clean_runs_job"]


def clean_runs_job(run_ids: tuple[str, ...] | list[str] = (), *, dry_run: bool = False):
    """Mark FAILED the runs left RUNNING by processes that died (``run_ids``: those runs, wherever they ran); returns
    the :class:`rrm.tracking.StaleRuns` found (marked, and left with why)."""
    return tracking().clean_stale_runs(run_ids, dry_run=dry_run)
