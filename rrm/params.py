"""Reading one section of a params file (DVC's ``params.yaml``), so every command can take its options from it."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from rrm.errors import RRMError


def read_section(path: str | os.PathLike, section: str) -> dict:
    """The mapping at ``section`` of the YAML file ``path``; a dotted section (``students.rrm``) walks nested keys."""
    path = Path(path)
    if not path.is_file():
        raise RRMError(f"params file {str(path)!r} does not exist; check --params")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise RRMError(f"params file {str(path)!r} is not valid YAML{line}; fix its syntax") from None
    walked: list[str] = []
    for key in section.split("."):
        if not isinstance(values, dict) or key not in values:
            known = sorted(values) if isinstance(values, dict) else []
            raise RRMError(
                f"params file {str(path)!r} has no section {'.'.join(walked + [key])!r}; "
                f"choose one of: {', '.join(map(str, known)) or '(none)'}"
            )
        values = values[key]
        walked.append(key)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise RRMError(f"section {section!r} of {str(path)!r} must be a mapping of option: value")
    return values
