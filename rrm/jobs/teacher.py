"""The teacher, resolved once: a model file or a registry URI becomes one :class:`rrm.models.Teacher` (the frozen
model, its file and sha256, the registry version it came from), checked against a pinned copy where given; and the
teacher registry's jobs (register, list, show, pull, promote)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from rrm.errors import RRMError
from rrm.io import sha256_file
from rrm.jobs.common import is_registry_uri, tracking
from rrm.models import Classifier, Teacher, load_teacher

__all__ = [
    "list_teachers_job",
    "load_model_ref",
    "promote_teacher_job",
    "pull_teacher_job",
    "register_teacher_job",
    "resolve_teacher",
    "show_teacher_job",
    "teacher_file",
]


def resolve_teacher(
    ref: str | os.PathLike, directory: str | os.PathLike, device="cpu", pin: str | os.PathLike | None = None
) -> Teacher:
    """Teacher ``ref`` (a model file, or a registry URI pulled into ``directory``), checked against ``pin``
    (:func:`teacher_file`), loaded frozen on ``device``: the one value the trainer and the tracking callback get."""
    path, version = teacher_file(ref, directory, pin)
    model = load_teacher(path, device)
    return Teacher(ref=str(ref), path=path, sha256=sha256_file(path), model=model, registry=version)


def load_model_ref(ref: str | os.PathLike, device) -> Classifier:
    """A frozen model (a transfer source, a probed model) from a model file or a registry URI."""
    with tempfile.TemporaryDirectory() as tmp:
        return resolve_teacher(ref, tmp, device).model


def teacher_file(ref: str | os.PathLike, directory: str | os.PathLike, pin: str | os.PathLike | None = None):
    """The model file of teacher ``ref`` (a file, or a registry URI pulled into ``directory``) and the registry
    version it came from (None for a file), checked against ``pin``.

    ``pin`` (``--teacher-pin``) is a model file the teacher must equal, byte for byte: a DVC stage names the copy a
    pull stage wrote as its dependency, so ``dvc repro`` reruns it when the champion changes, and the stage fails
    here, before any work, when the alias has moved since that copy was pulled.
    """
    version = None
    if is_registry_uri(ref):
        path, _, version = tracking().pull_teacher_version(str(ref), Path(directory) / "teacher.pt")
    else:
        path = Path(ref)
    if pin is None or not path.is_file():  # a missing teacher file: loading it says so
        return path, version
    if not Path(pin).is_file():
        raise RRMError(
            f"the pinned teacher file {str(pin)!r} does not exist; pull it: rrm teacher pull {ref} --out {pin}"
        )
    found, pinned = sha256_file(path), sha256_file(pin)
    if found != pinned:
        which = f" (version {version.version} of {version.name!r})" if version is not None else ""
        raise RRMError(
            f"the teacher {ref}{which} has sha256 {found[:12]}, not that of the pinned file {str(pin)!r} "
            f"({pinned[:12]}): the alias moved since the file was pulled; pull it again (rrm teacher pull {ref} "
            f"--out {pin}, or dvc repro --force on the pull stage) and rerun"
        )
    return path, version


def register_teacher_job(
    source: str | os.PathLike,
    name: str,
    *,
    evaluation: str | os.PathLike | Mapping | None = None,
    force: bool = False,
    experiment: str = "rrm",
    alias: str | None = None,
    min_examples: int = 100,
):
    """Register ``source`` (a training run id or a model file) as a new version of teacher ``name``
    (:func:`rrm.tracking.register_teacher`); returns its :class:`rrm.tracking.TeacherVersion`."""
    if min_examples < 1:
        raise RRMError(f"--min-examples must be >= 1, got {min_examples}")
    return tracking().register_teacher(
        source, name, evaluation=evaluation, force=force, experiment=experiment, alias=alias, min_examples=min_examples
    )


def list_teachers_job(name: str | None = None) -> list:
    """Registered teachers (all, or the versions of ``name``), newest first."""
    return tracking().list_teachers(name)


def show_teacher_job(uri: str):
    """The registered version behind ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    return tracking().show_teacher(uri)


def pull_teacher_job(uri: str, out: str | os.PathLike) -> tuple[Path, dict]:
    """Write the teacher at ``uri`` to the model file ``out``; returns the path and the model's meta."""
    return tracking().pull_teacher(uri, out)


def promote_teacher_job(name: str, version: str | int, alias: str):
    """Point ``alias`` of registered model ``name`` at ``version``; returns the version."""
    return tracking().promote(name, version, alias)
