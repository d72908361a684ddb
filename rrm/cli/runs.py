"""``rrm runs``: an experiment's leaderboard (``rrm runs table``); ``rrm runs clean`` marks the runs that dead
processes left RUNNING."""

from __future__ import annotations

import click
import cloup

from rrm import jobs
from rrm.cli import cli
from rrm.cli.options import ListOf, OneOf
from rrm.errors import unknown
from rrm.tracking.leaderboard import COLUMNS, FORMATS
from rrm.tracking.runs import DEFAULT_EXPERIMENT
from rrm.tracking.uri import tracking_label


@cli.group()
def runs() -> None:
    """MLflow runs: a leaderboard of an experiment's trainings; mark FAILED the runs dead processes left RUNNING."""


@runs.command("table")
@click.option("--experiment", default=DEFAULT_EXPERIMENT, show_default=True, help="MLflow experiment to read.")
@click.option(
    "--filter",
    "where",
    metavar="TEXT",
    help="Only the runs that match, in MLflow's search syntax: \"params.method = 'fast' and params.eps = '0.3'\".",
)
@click.option("--runs", "per_run", is_flag=True, help="One row per run. [default: one per recipe over its seeds]")
@click.option("--sort", type=OneOf("sort column", COLUMNS), default="robust", show_default=True, help="Best first.")
@click.option("--columns", type=ListOf(str), help="Columns to show, comma-separated. [default: all]")
@click.option("--format", "fmt", type=OneOf("format", FORMATS), default="text", show_default=True)
def runs_table(
    experiment: str, where: str | None, per_run: bool, sort: str, columns: tuple[str, ...] | None, fmt: str
) -> None:
    """The experiment's finished trainings as a table: robust accuracy by attack and images, cost, checks, teacher.

    Reads MLflow alone, so it works on a team's server. One row per recipe (runs of one name, method, model, dataset,
    eps, teacher and headline attack), averaged over its seeds as mean ± 95% CI, best first. "robust" is the
    evaluation's headline: the lowest accuracy among the attacks run on the most test images ("attack" says which,
    and on how many); AutoAttack on fewer images has its own column. "checks": the gradient-masking checks. Runs
    need an `rrm evaluate` to have a robust number.

    \b
    Examples:
      rrm runs table
      rrm runs table --filter "params.method = 'fast'" --runs
      rrm runs table --filter "metrics.`robust/apgd` > 0.8"
      rrm runs table --columns run,seeds,natural,robust,attack,tflops --format md > leaderboard.md
    """
    for column in columns or ():
        if column not in COLUMNS:
            raise unknown("column", column, COLUMNS)
    table, rows, view = jobs.runs_table_job(
        experiment, where=where, over_seeds=not per_run, sort=sort, columns=columns, fmt=fmt
    )
    if rows == 0:  # said on stderr; csv and json still get their (empty) table for the scripts that read them
        what = "finished training runs that match --filter" if where else "finished training runs"
        click.echo(f"no {what} in experiment {experiment!r} at {tracking_label()}", err=True)
        if fmt in ("text", "md"):
            return
    click.echo(table, nl=False)
    if fmt == "text":  # the same runs in a browser (stderr: the table stays the output)
        click.echo(f"in mlflow ui: {view}", err=True)


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
