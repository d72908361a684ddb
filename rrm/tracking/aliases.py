"""MLflow's rule for registry aliases, without MLflow: a bad alias is refused before anything loads or is written."""

from __future__ import annotations

import re

from rrm.errors import RRMError

__all__ = ["check_alias"]

# letters, digits, "_" and "-"; not "latest" nor "v3", which MLflow reserves for versions
_ALIAS = re.compile(r"^[\w\-]{1,255}$")
_RESERVED_ALIAS = re.compile(r"^(latest|[vV]\d+)$", re.IGNORECASE)


def check_alias(alias: str) -> str:
    """``alias`` if MLflow accepts it as an alias, else a one-line error naming the rule."""
    if not _ALIAS.match(alias) or _RESERVED_ALIAS.match(alias):
        raise RRMError(
            f"invalid alias {alias!r}: use letters, digits, '_' and '-' (not 'latest' nor 'v' and a number), "
            "e.g. champion"
        )
    return alias
