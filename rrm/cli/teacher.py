"""``rrm teacher``: the model registry of robust teachers (register, list, show, pull, promote)."""

from __future__ import annotations

from pathlib import Path

import click
import cloup

from rrm import jobs
from rrm.cli import cli
from rrm.cli.options import from_params


@cli.group()
def teacher() -> None:
    """Robust teachers in the MLflow model registry: register, list, show, pull, promote."""


@teacher.command("register")
@from_params("register")
@cloup.argument(
    "source", required=False, help="A training run id or a model file (required; or `source:` in the params section)."
)
@click.option("--name", default="rrm-teacher", show_default=True, help="Registered model name.")
@click.option(
    "--evaluation",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Metrics JSON from `rrm evaluate`. [default: the newest evaluation run of the training run]",
)
@click.option(
    "--force",
    is_flag=True,
    help="Register despite a refusal (no adversarial training; no evaluation, or one of another model, "
    "dataset or threat model, or without passed masking checks); the card and the `forced` tag say "
    "what was overridden.",
)
@click.option(
    "--experiment",
    default="rrm",
    show_default=True,
    help="Experiment for the import run of a model file that no tracked run produced.",
)
@click.option("--alias", help="Point this alias (e.g. champion) at the new version. [default: none]")
@click.option(
    "--min-examples",
    type=int,
    default=100,
    show_default=True,
    help="Fewest test images the headline accuracy (the lowest among the attacks on the most images) may be on.",
)
def teacher_register(
    source: str | None,
    name: str,
    evaluation: Path | None,
    force: bool,
    experiment: str,
    alias: str | None,
    min_examples: int,
) -> None:
    """Register SOURCE (a training run id or a model.pt) as a new teacher version with a model card.

    The evaluation must be of this model file (its sha256 and architecture), on the test split of the data it was
    trained on, at the norm and eps it was trained for, with passed gradient-masking checks, and its headline accuracy
    on at least --min-examples test images; --force overrides that and the card says so.

    \b
    Examples:
      rrm teacher register 3f2a9c...                      # a tracked run, evaluated by `rrm evaluate`
      rrm teacher register runs/teacher/model.pt --evaluation runs/teacher/eval_metrics.json --alias champion
    """
    jobs.require(source, "SOURCE (a run id or a model file)")
    if alias is not None:
        jobs.check_alias(alias)
    version = jobs.register_teacher_job(
        source, name, evaluation=evaluation, force=force, experiment=experiment, alias=alias, min_examples=min_examples
    )
    natural, adversarial = version.tags["natural_accuracy"], version.tags["adversarial_accuracy"]
    if "examples" in version.tags:
        adversarial += f" by {version.tags['attack']} on {version.tags['examples']} test images"
    then = (
        f"models:/{name}@{alias} -> version {version.version}"
        if alias
        else f"promote it with `rrm teacher promote {version.version} champion --name {name}`"
    )
    click.echo(f"registered {version.uri} (natural {natural}, adversarial {adversarial}); {then}")
    if "forced" in version.tags:
        click.echo(f"forced, overriding: {version.tags['forced']}")


@teacher.command("list")
@from_params("list")
@click.option("--name", help="Only versions of this registered model. [default: all teachers]")
def teacher_list(name: str | None) -> None:
    """List registered teachers, newest version first.

    \b
    Example:
      rrm teacher list --name rrm-teacher
    """
    found = jobs.list_teachers_job(name)
    if not found:
        click.echo("no teachers registered; add one with `rrm teacher register`")
        return
    columns = (
        "uri",
        "aliases",
        "method",
        "architecture",
        "norm",
        "eps",
        "natural_accuracy",
        "adversarial_accuracy",
        "dataset",
    )
    rows = [[t.uri, ",".join(t.aliases) or "-", *(_short(t.tags.get(c, "?")) for c in columns[2:])] for t in found]
    widths = [max(len(str(r[i])) for r in [list(columns), *rows]) for i in range(len(columns))]
    for row in [list(columns), *rows]:
        click.echo("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())


def _short(value: str) -> str:
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value


@teacher.command("show")
@from_params("show")
@cloup.argument("uri", required=False, help="models:/NAME@ALIAS or models:/NAME/VERSION (required).")
def teacher_show(uri: str | None) -> None:
    """Show the model card, aliases and tags of a registered teacher.

    \b
    Example:
      rrm teacher show models:/rrm-teacher@champion
    """
    jobs.require(uri, "URI (models:/NAME@ALIAS or models:/NAME/VERSION)")
    found = jobs.show_teacher_job(uri)
    click.echo(f"{found.uri}  aliases: {', '.join(found.aliases) or '-'}\n")
    click.echo(found.description.rstrip() or "(no model card)")
    click.echo("\ntags:")
    for key, value in sorted(found.tags.items()):
        click.echo(f"  {key}: {value}")


@teacher.command("pull")
@from_params("pull")
@cloup.argument("uri", required=False, help="models:/NAME@ALIAS or models:/NAME/VERSION (required).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Model file to write.")
def teacher_pull(uri: str | None, out: Path | None) -> None:
    """Download a registered teacher to a model file (features and head intact).

    \b
    Example:
      rrm teacher pull models:/rrm-teacher@champion --out teachers/champion.pt
    """
    jobs.require(uri, "URI (models:/NAME@ALIAS or models:/NAME/VERSION)")
    jobs.require(out, "--out")
    path, meta = jobs.pull_teacher_job(uri, out)
    click.echo(
        f"wrote {path}: {meta.get('model')} trained with {meta.get('method')} on {meta.get('dataset')} "
        f"({meta.get('norm')}, eps {meta.get('eps')})"
    )


@teacher.command("promote")
@from_params("promote")
@cloup.argument("version", required=False, help="The version to point ALIAS at (required).")
@cloup.argument("alias", required=False, help="The alias, e.g. champion (required).")
@click.option("--name", default="rrm-teacher", show_default=True, help="Registered model name.")
def teacher_promote(version: str | None, alias: str | None, name: str) -> None:
    """Point ALIAS (champion, candidate, ...) at VERSION; students use models:/NAME@ALIAS.

    \b
    Example:
      rrm teacher promote 3 champion
    """
    jobs.require(version, "VERSION")
    jobs.require(alias, "ALIAS")
    jobs.check_alias(alias)
    found = jobs.promote_teacher_job(name, version, alias)
    click.echo(f"models:/{name}@{alias} -> version {found.version}")
