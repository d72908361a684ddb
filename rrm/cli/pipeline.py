"""``rrm pipeline``: the optional study pipelines of ``pipelines/`` (list, run, link, unlink)."""

from __future__ import annotations

import click
import cloup

from rrm.cli import cli
from rrm.jobs import pipelines


@cli.group()
def pipeline() -> None:
    """The optional DVC pipelines in pipelines/ (the studies): list, run, link, unlink.

    A plain `dvc repro` runs the main pipeline (dvc.yaml) only, and `dvc status` after it says it is up to date. A
    study is committed as pipelines/NAME/pipeline.yaml and enters DVC's view through the link pipelines/NAME/dvc.yaml
    that `rrm pipeline run NAME` (or `link`) makes: from then on `dvc repro pipelines/NAME/dvc.yaml` and `dvc status`
    include it. Run these commands from the repository root.
    """


@pipeline.command("list")
def pipeline_list() -> None:
    """The optional pipelines, whether DVC sees them (linked) and whether a dvc.lock records a run.

    \b
    Example:
      rrm pipeline list
    """
    for found in pipelines.pipelines().values():
        state = "linked" if found.linked else "not linked"
        ran = ", dvc.lock" if (found.directory / "dvc.lock").is_file() else ""
        click.echo(f"{found.name:<10} {state + ran:<20} {found.summary}")


@pipeline.command("run")
@cloup.argument("name", help="The pipeline (`rrm pipeline list`).")
@cloup.argument("stages", nargs=-1, help="Only these stages and what they need (e.g. report@0.3). [default: all]")
@click.option("--dry", is_flag=True, help="Only print the commands that would run.")
@click.option("--force", is_flag=True, help="Rerun the stages even if nothing changed.")
@click.option("--keep-going", is_flag=True, help="Go on with the stages that do not depend on a failed one.")
def pipeline_run(name: str, stages: tuple[str, ...], dry: bool, force: bool, keep_going: bool) -> None:
    """Link pipeline NAME and run `dvc repro` on it: what changed or never ran, and the main pipeline's stages it
    needs (prepare). The exit code is DVC's; Ctrl-C and SIGTERM stop DVC and the stage it runs as Ctrl-C does.

    \b
    Examples:
      rrm pipeline run stem
      rrm pipeline run variants report@0.3     # one eps of the variants study
      rrm pipeline run tune --dry
    """
    found = pipelines.find(name)
    flags = {"--dry": dry, "--force": force, "--keep-going": keep_going}
    code = pipelines.repro(found, stages, tuple(flag for flag, on in flags.items() if on))
    if code:
        raise SystemExit(code)


@pipeline.command("link")
@cloup.argument("name", help="The pipeline (`rrm pipeline list`).")
def pipeline_link(name: str) -> None:
    """Put pipeline NAME in DVC's view (pipelines/NAME/dvc.yaml -> pipeline.yaml) without running it.

    \b
    Example:
      rrm pipeline link variants && dvc status pipelines/variants/dvc.yaml
    """
    found = pipelines.find(name)
    made = pipelines.link(found)
    click.echo(f"{found.dvcfile} -> {pipelines.DEFINITION}" + ("" if made else " (already linked)"))


@pipeline.command("unlink")
@cloup.argument("name", help="The pipeline (`rrm pipeline list`).")
def pipeline_unlink(name: str) -> None:
    """Take pipeline NAME out of DVC's view (`dvc status` no longer lists it); its outputs and dvc.lock stay.

    \b
    Example:
      rrm pipeline unlink variants
    """
    found = pipelines.find(name)
    removed = pipelines.unlink(found)
    click.echo(f"removed {found.dvcfile}" if removed else f"{found.dvcfile} was not linked")
