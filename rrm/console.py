"""The ``rrm`` command: shows life, and starts what a tracked training will need, before torch loads.

Importing a command that trains or evaluates takes seconds (torch). On a terminal, ``rrm COMMAND`` says it is
starting at once, on a line that the command's own output then replaces. A tracked ``rrm train`` also forks its MLflow
worker now (:func:`rrm.tracking.worker.prestart`), so that MLflow loads on another core while torch does. ``python -m
rrm.cli`` and ``torchrun -m rrm.cli`` come here too, after the command line has loaded.
"""

from __future__ import annotations

import os
import sys

_HELP = {"--help", "-h"}


def _tracked_training(args: list[str]) -> bool:
    """A training that records a run: ``train`` with options (alone it prints its help), without --no-track or help,
    on torchrun's first rank (or alone)."""
    first_rank = os.environ.get("RANK", "0") == "0"
    return first_rank and len(args) > 1 and args[0] == "train" and not ({"--no-track"} | _HELP) & set(args)


def main() -> None:
    """Console-script entry point (``rrm``)."""
    args = sys.argv[1:]
    shown = bool(args) and not args[0].startswith("-") and not _HELP & set(args) and sys.stderr.isatty()
    if shown:
        sys.stderr.write(f"rrm {args[0]}: starting\r")
        sys.stderr.flush()
    if _tracked_training(args):
        from rrm.tracking.worker import prestart

        prestart()
    from rrm.cli import main as cli_main

    if shown:
        sys.stderr.write("\033[K")  # the line is cleared: the command speaks for itself from here
        sys.stderr.flush()
    cli_main()
