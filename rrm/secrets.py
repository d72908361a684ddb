"""Passwords out of anything rrm prints, tags or writes: one masking function for every URL form.

A URL's password is hidden wherever it sits: in the user info (``postgresql://rrm:PASSWORD@db/mlflow``, also when
the password holds ``/``, ``@`` or ``:``, percent-encoded or not) and in the query (``?password=...``,
``&password=...``, and other secret-named keys). The user name, host, port and path stay, so a label still says
which store it is. The function takes any text, so an error message that quotes a URL is masked as a whole.
"""

from __future__ import annotations

import re

MASK = "***"
# scheme://[user]:SECRET@: the secret runs to the last @ of the URL (a password may hold @, / and : unencoded), so a
# URL with an @ further on (rare in store URLs) loses more than its password, never less.
_USER_INFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@'\"<>]*:)(?P<secret>[^\s'\"<>]+)@")
# password=SECRET as a URL query item or a libpq keyword (host=db password=...), up to the next & or space.
_KEYWORD = re.compile(
    r"(?P<head>(?<![\w.\-])(?:password|passwd|pwd|sslpassword|secret|token|access_token|api_key|"
    r"apikey)=)(?P<secret>[^&\s'\"<>]+)",
    re.IGNORECASE,
)


def mask_url(text: str) -> str:
    """``text`` (a URL, or a message that quotes URLs) with every password replaced by ``***``."""
    text = _USER_INFO.sub(lambda m: m["head"] + MASK + "@", str(text))
    return _KEYWORD.sub(lambda m: m["head"] + MASK, text)
