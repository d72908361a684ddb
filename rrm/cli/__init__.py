"""The ``rrm`` command line: a thin layer that parses input and calls a job in :mod:`rrm.jobs`.

Every command takes its options from flags or from one section of a params file (``--params params.yaml --section
train_teacher``: the file's values are defaults, flags override them). Errors are one line on stderr
(``Error: ...``) with a non-zero exit code. A command's module is imported when that command runs or shows its help,
so ``rrm --help`` and ``rrm pipeline ...`` load no torch; MLflow is imported only by the commands that track or use the
registry.

SIGTERM (schedulers, ``timeout``, Docker, Kubernetes) stops a command as Ctrl-C does: the MLflow run ends KILLED, a
training keeps its last checkpoint for ``--resume``, and the exit code is 143 (128 + SIGTERM) with one line.
"""

from __future__ import annotations

import contextlib
import importlib
import signal
import sys
import threading
import typing
from collections.abc import Iterator

import click
import cloup

from rrm.errors import RRMError
from rrm.tracking.environment import FAIL_FAST_ENV as _FAIL_FAST_ENV

__all__ = ["COMMANDS", "_FAIL_FAST_ENV", "cli", "main"]

# Each command: the module that defines it (on `cli`), and its line in `rrm --help`, which must not import it.
COMMANDS = {
    "data": ("rrm.cli.commands", "Datasets: prepare one versionable file, or directory of shards, per dataset."),
    "evaluate": (
        "rrm.cli.commands",
        "Natural and adversarial accuracy of MODEL (a model file or registry URI) with gradient-masking checks.",
    ),
    "pipeline": (
        "rrm.cli.pipeline",
        "The optional DVC pipelines in pipelines/ (the studies): list, run, link, unlink.",
    ),
    "probe": (
        "rrm.cli.probe",
        "Where MODEL's robustness sits: its first-layer thresholds and, with --teacher, where it agrees with the "
        "teacher.",
    ),
    "report": (
        "rrm.cli.commands",
        "The paper's Table 1 and Table 2 and an accuracy-against-training-time plot from a pipeline's metrics.",
    ),
    "robustify": (
        "rrm.cli.commands",
        "Write Ilyas et al.'s robustified dataset D_R (the input of method rdt); resumable.",
    ),
    "runs": (
        "rrm.cli.runs",
        "MLflow runs: a leaderboard of an experiment's trainings; mark FAILED the runs dead processes left RUNNING.",
    ),
    "teacher": (
        "rrm.cli.teacher",
        "Robust teachers in the MLflow model registry: register, list, show, pull, promote.",
    ),
    "train": (
        "rrm.cli.commands",
        "Train a model with one method; the run (params, metrics, model) is recorded in MLflow.",
    ),
    "tune": (
        "rrm.cli.commands",
        "Tune a transfer method's knobs with Optuna on a validation split; evaluate the best trials on the test split.",
    ),
}


class _Command(cloup.Command):
    """A command whose one-line summary in its group's listing is never cut off (it wraps instead)."""

    def get_short_help_str(self, limit: int = 45) -> str:
        return super().get_short_help_str(limit=1000)


class _Group(cloup.Group):
    command_class = _Command
    group_class = type  # subgroups are of this class too

    def get_short_help_str(self, limit: int = 45) -> str:
        return super().get_short_help_str(limit=1000)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it unwinds as Ctrl-C does: runs end KILLED (every handler of
    KeyboardInterrupt applies), files written atomically stay whole."""


class _Stopped(Exception):
    """Terminated, carried past click (which would print a blank line for a KeyboardInterrupt) to the exit."""


def _raise_terminated(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not break the clean-up of the first
    raise Terminated("SIGTERM")


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_KEPT = "a training keeps its last checkpoint (continue it with --resume)"


class _OneLineErrors(_Group):
    """The root group: any :class:`RRMError` or usage error becomes ``Error: ...`` on one line and exit code 1 or 2;
    SIGTERM ends the command as Ctrl-C does, with exit code 143. Its commands load when named (:data:`COMMANDS`)."""

    group_class = _Group  # the command groups under it list their own commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *COMMANDS})

    def get_command(self, ctx: click.Context | None, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            importlib.import_module(COMMANDS[cmd_name][0])  # its decorators add it to this group
        return super().get_command(ctx, cmd_name)  # type: ignore[arg-type]

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The listing from :data:`COMMANDS`, without importing a command."""
        with formatter.section("Commands"):
            formatter.write_dl([(name, summary) for name, (_, summary) in sorted(COMMANDS.items())])

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Terminated as exc:
            raise _Stopped(getattr(exc, "kept", None)) from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            with _sigterm_as_interrupt():
                result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except (_Stopped, Terminated) as exc:
            kept = exc.args[0] if isinstance(exc, _Stopped) and exc.args and exc.args[0] else None
            _fail(f"terminated by SIGTERM; {kept or _KEPT}", 128 + signal.SIGTERM)
        except RRMError as exc:
            _fail(str(exc), 1)
        except PermissionError as exc:  # a path this user may not read or write, met past the checks
            where = f" {exc.filename!r}" if exc.filename else ""
            _fail(f"permission denied{where}; run as a user who may use it, or change its permissions", 1)
        except click.exceptions.NoArgsIsHelpError as exc:  # `rrm` or `rrm teacher` alone: the help is the answer
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
            _fail(exc.format_message() + where, exc.exit_code)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except click.Abort as exc:
            if isinstance(exc.__context__, Terminated):  # SIGTERM outside a command (while parsing, say)
                _fail("terminated by SIGTERM", 128 + signal.SIGTERM)
            kept = getattr(exc.__cause__ or exc.__context__, "kept", None)  # what an interrupted training kept
            _fail(f"interrupted; {kept}" if kept else "interrupted", 130)
        sys.exit(result if isinstance(result, int) else 0)


def _fail(message: str, code: int) -> typing.NoReturn:
    click.echo(f"Error: {' '.join(message.split())}", err=True)
    sys.exit(code)


@cloup.group(
    cls=_OneLineErrors,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
    show_subcommand_aliases=False,
)
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
