"""The ``rrm`` command line: a thin layer that parses input and calls a job in :mod:`rrm.jobs`.

Every command takes its options from flags or from one section of a params file (``--params params.yaml --section
train_teacher``: the file's values are defaults, flags override them). Errors are one line on stderr
(``Error: ...``) with a non-zero exit code. MLflow is imported only by the commands that track or use the registry.
"""

from __future__ import annotations

import sys
import typing

import click
import cloup

from rrm.errors import RRMError
from rrm.jobs import FAIL_FAST_ENV as _FAIL_FAST_ENV

__all__ = ["_FAIL_FAST_ENV", "cli", "main"]


class _Command(cloup.Command):
    """A command whose one-line summary in its group's listing is never cut off (it wraps instead)."""

    def get_short_help_str(self, limit: int = 45) -> str:
        return super().get_short_help_str(limit=1000)


class _Group(cloup.Group):
    command_class = _Command
    group_class = type  # subgroups are of this class too

    def get_short_help_str(self, limit: int = 45) -> str:
        return super().get_short_help_str(limit=1000)


class _OneLineErrors(_Group):
    """The root group: any :class:`RRMError` or usage error becomes ``Error: ...`` on one line and exit code 1 or 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except RRMError as exc:
            _fail(str(exc), 1)
        except click.exceptions.NoArgsIsHelpError as exc:  # `rrm` or `rrm teacher` alone: the help is the answer
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
            _fail(exc.format_message() + where, exc.exit_code)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            _fail("interrupted", 130)
        sys.exit(result if isinstance(result, int) else 0)


def _fail(message: str, code: int) -> typing.NoReturn:
    click.echo(f"Error: {' '.join(message.split())}", err=True)
    sys.exit(code)


@cloup.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
             show_subcommand_aliases=False)
@click.version_option(package_name="rrm", message="%(prog)s %(version)s")
def cli() -> None:
    """Robust Representation Matching: robust students from a robust teacher at about the cost of natural training.

    \b
    Example, the whole recipe on the embedded MNIST sample:
      rrm data prepare --dataset mnist5k --out data/mnist5k.safetensors
      rrm train --method sat --dataset data/mnist5k.safetensors --out-dir runs/teacher
      rrm evaluate runs/teacher/model.pt
      rrm teacher register runs/teacher/model.pt --evaluation runs/teacher/eval_metrics.json
      rrm teacher promote 1 champion
      rrm train --method rrm --model cnn-bn --teacher models:/rrm-teacher@champion --lambda 0.5

    Runs are recorded in MLflow (MLFLOW_TRACKING_URI, default sqlite:///mlflow.db here); see them with `mlflow ui`.
    """


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="rrm")


from rrm.cli import commands, probe, teacher  # noqa: E402,F401  (registers the commands on `cli`)
