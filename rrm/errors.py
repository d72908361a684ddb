"""User-facing errors.

Every problem a user can cause (a bad name, an out-of-range value, a missing or corrupt file, an unreachable
server) is raised as :class:`RRMError` with one line that names the problem and the fix. The command line prints
that line and exits non-zero; library users can catch it.
"""

from __future__ import annotations

from collections.abc import Iterable


class RRMError(Exception):
    """A problem with the user's input or environment, described in one line with its fix."""


def unknown(kind: str, name: object, known: Iterable[str]) -> RRMError:
    """The error for a name that is not in a registry."""
    return RRMError(f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(known))}")


def missing_driver(needs: str, exc: ImportError) -> RRMError:
    """The error for a database URI whose SQLAlchemy driver is not installed; ``needs`` names what asked for it."""
    driver = getattr(exc, "name", None) or str(exc)
    return RRMError(
        f"{needs} needs the database driver {driver!r}, which is not installed; install it (PostgreSQL: pip install "
        "'psycopg[binary]' for postgresql+psycopg://)"
    )


def require(ok: bool, message: str) -> None:
    """Raise :class:`RRMError` with ``message`` (the bad value and the fix) unless ``ok``: a validation rule."""
    if not ok:
        raise RRMError(message)
