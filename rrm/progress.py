"""Progress of long work: tqdm's bar on a terminal, and a plain line a minute where the bar is hidden.

A bar is hidden when progress is off (``--no-progress``, ``progress: false`` in ``params.yaml``) or, by default, when
stderr is not a terminal (a DVC stage's log, CI). Hidden, :class:`Bar` still says where the work is, once a minute,
as a line of its own on stderr (``robustify:  40% 2000/5000 [01:00<01:30, 33.3img/s]``), so that a stage that
runs for an hour is never silent. Work shorter than a minute prints nothing more than before.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

__all__ = ["HEARTBEAT_SECONDS", "Bar"]

HEARTBEAT_SECONDS = 60.0


class _Lines:
    """A stream for tqdm that turns its carriage-return redraws into whole lines on stderr."""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            sys.stderr.write(line + "\n")

    def flush(self) -> None:
        sys.stderr.flush()


class Bar(tqdm):
    """:class:`tqdm.tqdm` with its ``disable`` (True, False, or None for "on a terminal"); where that hides the bar
    and ``heartbeat`` is true (say, on the main process only), a line every ``every`` seconds instead, the first
    after ``every`` seconds."""

    def __init__(self, *args, disable: bool | None = None, heartbeat: bool = True, every: float | None = None, **kw):
        every = HEARTBEAT_SECONDS if every is None else every
        hidden = disable is True or (disable is None and not sys.stderr.isatty())
        if hidden and heartbeat:
            # ncols 0: the numbers without the bar
            kw.update(file=_Lines(), mininterval=every, maxinterval=every, delay=every, ncols=0)
            disable = False
        super().__init__(*args, disable=disable, **kw)
        if hidden and heartbeat:  # a plain line, not a bar among bars: it takes no screen position from later bars
            with self.get_lock():
                self._instances.discard(self)
