"""MLflow runs: the leaderboard of an experiment, and the runs that processes which died left RUNNING."""

from __future__ import annotations

from rrm.jobs.common import tracking

__all__ = ["clean_runs_job", "runs_table_job"]


def clean_runs_job(run_ids: tuple[str, ...] | list[str] = (), *, dry_run: bool = False):
    """Mark FAILED the runs left RUNNING by processes that died (``run_ids``: those runs, wherever they ran); returns
    the :class:`rrm.tracking.StaleRuns` found (marked, and left with why)."""
    return tracking().clean_stale_runs(run_ids, dry_run=dry_run)


def runs_table_job(
    experiment: str,
    *,
    where: str | None = None,
    over_seeds: bool = True,
    sort: str = "robust",
    columns: tuple[str, ...] | None = None,
    fmt: str = "text",
) -> tuple[str, int, str]:
    """The finished training runs of ``experiment`` as a table in ``fmt`` (text, md, csv, json), how many rows, and
    the link to the experiment's Robustness view in ``mlflow ui``
    (:func:`rrm.tracking.leaderboard.leaderboard` and :func:`~rrm.tracking.leaderboard.render`)."""
    module = tracking().leaderboard
    board = module.leaderboard(experiment, where=where, over_seeds=over_seeds, sort=sort)
    return module.render(board, columns, fmt), len(board.entries), board.view
