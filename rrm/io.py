"""File helpers shared by every writer: nothing half-written is ever left under the final name, and a path that
cannot be written is one :class:`~rrm.errors.RRMError` line naming the path and the fix."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from rrm.errors import RRMError


class OutputError(RRMError, OSError):
    """An output that cannot be written: one line for the user (an :class:`RRMError`), and still an
    :class:`OSError` with the cause's ``errno`` for callers that handle file-system failures."""


def _file_in_the_way(directory: Path) -> Path | None:
    """The first of ``directory`` and its parents that exists and is not a directory, if any."""
    for candidate in (directory, *directory.parents):
        with contextlib.suppress(PermissionError):  # a parent this user may not search: not a file in the way
            if candidate.exists():
                return None if candidate.is_dir() else candidate
    return None


# A full disk, or a full quota (where the platform has one)
DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def output_error(path: str | os.PathLike, exc: OSError | None = None, *, directory: bool = False) -> OutputError:
    """The one-line error for an output ``path`` that cannot be written, from the cause in ``exc``."""
    path = Path(path)
    where = f"cannot write {str(path)!r}"
    blocker = _file_in_the_way(path if directory else path.parent)
    if blocker is not None:
        return _with_errno(
            OutputError(
                f"{where}: {str(blocker)!r} is a file, not a directory; choose another path, or move that file away"
            ),
            errno.ENOTDIR,
        )
    code = getattr(exc, "errno", None)
    if code == errno.EROFS:
        fix = "the file system is read-only; choose a path on a writable one"
    elif code in (errno.EACCES, errno.EPERM):
        fix = "permission denied; choose a directory you may write to, or change its permissions"
    elif code in DISK_FULL:
        fix = "no space left on the device; free some space, or choose another path"
    elif code == errno.EISDIR:
        fix = "it is a directory; pass a file path"
    elif code == errno.ENAMETOOLONG:
        fix = "the name is too long; choose a shorter path"
    else:
        reason = (exc.strerror if exc is not None and exc.strerror else str(exc or "unknown cause")).splitlines()[0]
        fix = f"{reason}; choose another path"
    return _with_errno(OutputError(f"{where}: {fix}"), code)


def _with_errno(error: OutputError, code: int | None) -> OutputError:
    error.errno = code
    return error


def check_writable(path: str | os.PathLike, *, directory: bool = False) -> None:
    """Fail now, creating nothing, if ``path`` (a file, or a directory with ``directory=True``) could not be written.

    Jobs call it before their work, so a bad output path costs seconds, not a whole run; the writers report any
    failure they still meet (:func:`atomic_path`, :func:`ensure_dir`).
    """
    path = Path(path)
    try:  # as an ordinary user, even looking at a path under a directory it may not search is refused
        if not directory and path.is_dir():
            raise output_error(path, OSError(errno.EISDIR, "is a directory"))
        target = path if directory else path.parent
        existing = next((p for p in (target, *target.parents) if p.exists()), Path("."))
    except PermissionError as exc:
        raise output_error(path, exc, directory=directory) from None
    if not existing.is_dir():
        raise output_error(path, directory=directory)
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        raise output_error(
            path, OSError(errno.EROFS if read_only else errno.EACCES, "not writable"), directory=directory
        )


def ensure_dir(path: str | os.PathLike) -> Path:
    """``mkdir -p path``, or the one-line error saying why it cannot be made."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(path, exc, directory=True) from None
    return path


def missing_parents(path: str | os.PathLike) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, innermost first: what :func:`ensure_dir` would make."""
    path = Path(path)
    try:
        return [p for p in (path, *path.parents) if not p.exists() and p != Path(".")]
    except PermissionError as exc:
        raise output_error(path, exc, directory=True) from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename, on error it is removed.

    A file-system failure (the directory cannot be made, the file cannot be created, written or renamed) is raised
    as one :class:`RRMError` naming ``path``; removing the temporary file never raises over the first error.
    """
    final = Path(path)
    ensure_dir(final.parent)
    if final.is_dir():
        raise output_error(final, OSError(errno.EISDIR, "is a directory"))
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        tmp.touch()  # writers such as torch.save report a file they cannot open as a RuntimeError without a cause
        yield tmp
        os.replace(tmp, final)
    except OSError as exc:
        raise output_error(final, exc) from None
    except Exception as exc:  # writers that report a file-system failure in a type of their own
        code = _wrapped_errno(exc, final.parent)
        if code is None:
            raise
        raise output_error(final, OSError(code, str(exc).splitlines()[0])) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


# What torch's writer says when the file system fails under it: it cannot open the file, a write failed, or (a full
# disk) its stream broke or came up short.
_TORCH_WRITE_FAILURES = (
    "PytorchStreamWriter",
    "cannot be opened",
    "file write failed",
    "iostream error",
    "unexpected pos",
)


def _wrapped_errno(exc: Exception, directory: Path) -> int | None:
    """The OS error behind a writer's own exception, or None where ``exc`` is not a file-system failure: safetensors
    (Rust) names it ("... (os error 28)"); torch does not, so a device with under 1 MiB left means it filled up."""
    named = re.search(r"\(os error (\d+)\)", str(exc))
    if named:
        return int(named.group(1))
    if not isinstance(exc, RuntimeError) or not any(sign in str(exc) for sign in _TORCH_WRITE_FAILURES):
        return None
    with contextlib.suppress(OSError):
        stats = os.statvfs(directory)
        if stats.f_bavail * stats.f_frsize < 1 << 20:
            return errno.ENOSPC
    return errno.EIO


def write_json(path: str | os.PathLike, data: object) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def headline_path(path: str | os.PathLike) -> Path:
    """Where a record's headline numbers go, beside it: ``x.json`` -> ``x.headline.json``. The pipelines declare the
    headline files as DVC metrics, so ``dvc metrics show`` lists a few numbers a stage, not every setting."""
    path = Path(path)
    return path.with_name(f"{path.stem}.headline.json")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
