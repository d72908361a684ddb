"""The ``rrm`` command line: a thin layer that parses input and calls a job in :mod:`rrm.jobs`.

Every command takes its options from flags or from one section of a params file (``--params params.yaml --section
train_teacher``: the file's values are defaults, flags override them). Errors are one line on stderr
(``Error: ...``) with a non-zero exit code. MLflow is imported only by the commands that track or use the registry.

SIGTERM (schedulers, ``timeout``, Docker, Kubernetes) stops a command as Ctrl-C does: the MLflow run ends KILLED, a
training keeps its last checkpoint for ``--resume``, and the exit code is 143 (128 + SIGTERM) with one line.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import typing
from collections.abc import Iterator

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
    SIGTERM ends the command as Ctrl-C does, with exit code 143."""

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


from rrm.cli import commands, pipeline, probe, runs, teacher  # noqa: E402,F401  (registers the commands on `cli`)
