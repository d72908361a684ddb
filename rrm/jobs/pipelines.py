"""The optional DVC pipelines in ``pipelines/``: the studies, which a plain ``dvc repro`` never runs.

DVC reads every ``dvc.yaml`` of a repository for ``dvc status``, so a study committed as a ``dvc.yaml`` would list its
hundreds of never-run stages after every clean ``dvc repro`` of the main pipeline. A study is committed as
``pipelines/NAME/pipeline.yaml`` instead, and enters DVC's view through a link in this checkout, ``pipelines/NAME/
dvc.yaml -> pipeline.yaml``, which :func:`link` (``rrm pipeline link`` or ``run``) makes. From then on it is a DVC
pipeline like any other: ``dvc repro pipelines/NAME/dvc.yaml``, ``dvc status`` and its ``dvc.lock`` include it.
:func:`unlink` takes it out of DVC's view again; its outputs and ``dvc.lock`` stay.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

from rrm.errors import RRMError

FOLDER = "pipelines"
DEFINITION = "pipeline.yaml"
DVCFILE = "dvc.yaml"


@dataclasses.dataclass(frozen=True)
class Pipeline:
    name: str
    directory: Path

    @property
    def definition(self) -> Path:
        return self.directory / DEFINITION

    @property
    def dvcfile(self) -> Path:
        return self.directory / DVCFILE

    @property
    def linked(self) -> bool:
        return self.dvcfile.is_symlink() and os.readlink(self.dvcfile) == DEFINITION

    @property
    def summary(self) -> str:
        """The first line of the definition's header comment."""
        for line in self.definition.read_text().splitlines():
            if line.startswith("#"):
                return line.lstrip("# ").strip()
        return ""


def pipelines(root: str | os.PathLike = ".") -> dict[str, Pipeline]:
    """The optional pipelines under ``root``, by name."""
    folder = Path(root) / FOLDER
    if not folder.is_dir():
        raise RRMError(f"no {FOLDER}/ folder in {Path(root).resolve()}: run rrm pipeline from the repository root")
    return {p.parent.name: Pipeline(p.parent.name, p.parent) for p in sorted(folder.glob(f"*/{DEFINITION}"))}


def find(name: str, root: str | os.PathLike = ".") -> Pipeline:
    found = pipelines(root)
    if name not in found:
        raise RRMError(f"unknown pipeline '{name}': choose from {', '.join(found) or 'none'} ({FOLDER}/*/{DEFINITION})")
    return found[name]


def link(pipeline: Pipeline) -> bool:
    """Put ``pipeline`` in DVC's view; False if it already was."""
    if pipeline.linked:
        return False
    if pipeline.dvcfile.exists() or pipeline.dvcfile.is_symlink():
        raise RRMError(
            f"{pipeline.dvcfile} exists and is not a link to {DEFINITION}: move it away (the pipeline is "
            f"{pipeline.definition}) and rerun"
        )
    pipeline.dvcfile.symlink_to(DEFINITION)
    return True


def unlink(pipeline: Pipeline) -> bool:
    """Take ``pipeline`` out of DVC's view (its outputs and dvc.lock stay); False if it was not in it."""
    if not pipeline.linked:
        return False
    pipeline.dvcfile.unlink()
    return True


def repro(pipeline: Pipeline, stages: tuple[str, ...] = (), options: tuple[str, ...] = ()) -> int:
    """Link ``pipeline`` and run ``dvc repro`` on it (or on ``stages`` of it); DVC's exit code. A dry run
    (``--dry``) leaves DVC's view as it found it: a pipeline it linked is unlinked again.

    DVC runs in a session of its own: an interrupt of this process (Ctrl-C, or SIGTERM, which rrm's command line
    raises as one) reaches DVC and the stage it runs as one Ctrl-C, and this process waits for them to stop, so a
    training ends its MLflow run and keeps its checkpoint, and DVC its lock.
    """
    linked_here = link(pipeline)
    dvcfile = f"{FOLDER}/{pipeline.name}/{DVCFILE}"  # from the repository root, where DVC runs
    targets = [f"{dvcfile}:{stage}" for stage in stages] or [dvcfile]
    process = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", *options, *targets],
        cwd=pipeline.directory.parents[1],
        start_new_session=True,
    )
    try:
        return process.wait()
    except KeyboardInterrupt:
        os.killpg(process.pid, signal.SIGINT)
        process.wait()
        raise
    finally:
        if linked_here and "--dry" in options:
            unlink(pipeline)
