"""``rrm runs``: MLflow runs that need care; ``rrm runs clean`` marks the runs that dead processes left RUNNING."""

from __future__ import annotations

import click
import cloup

from rrm import jobs
from rrm.cli import cli
from rrm.tracking.uri import tracking_label


@cli.group()
def runs() -> None:
    """MLflow runs: mark FAILED the runs that processes which died left RUNNING."""


@runs.command("clean")
@cloup.argument(
    "run_ids",
    nargs=-1,
    metavar="[RUN_ID]...",
    help="Runs to mark FAILED wherever they ran (a host that is gone, say). [default: every run whose "
    "process on this host is gone]",
)
@click.option("--dry-run", is_flag=True, help="Only list what would be marked.")
def runs_clean(run_ids: tuple[str, ...], dry_run: bool) -> None:
    """Mark FAILED, with the reason in tag rrm.error, the runs left RUNNING by processes that died.

    A process killed by SIGKILL, out of memory or a power loss cannot end its MLflow run; rrm tags every run with
    its host and pid, so a run whose process is gone is found. The next `rrm train`, `rrm evaluate` or `rrm tune`
    does this too. Runs of other hosts are listed, not touched: clean them there, or pass their ids.

    \b
    Examples:
      rrm runs clean --dry-run
      rrm runs clean
      rrm runs clean 3f2a9c0d1e...          # a run of a host that is gone
    """
    found = jobs.clean_runs_job(run_ids, dry_run=dry_run)
    verb = "would mark" if dry_run else "marked"
    for run_id, reason in found.marked:
        click.echo(f"{verb} run {run_id} FAILED: {reason}")
    for run_id, why in found.left:
        click.echo(f"left run {run_id}: {why}")
    click.echo(f"{verb} {len(found.marked)} run(s) FAILED in {tracking_label()}")
