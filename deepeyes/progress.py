"""Progress bars for a person at a terminal, one log line per interval everywhere else.

tqdm redraws its bar with carriage returns: in a Slurm log (not a terminal) every redraw lands on
one endless line. `progress_bar` gives tqdm's bar when stderr is a terminal, and otherwise a bar
that logs its state as an INFO line at most every `LOG_INTERVAL_S` seconds, and once at the end.
"""

from __future__ import annotations

import logging
import math
import sys
import time

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0

log = logging.getLogger(__name__)


class _Nowhere:
    """tqdm's output file when the bar logs instead of drawing."""

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


class LoggedProgress(tqdm):
    """A tqdm bar that logs a line per interval instead of drawing (see the module docstring)."""

    def __init__(self, *args, interval_s: float = LOG_INTERVAL_S, **kwargs):
        self._interval_s = interval_s
        self._logged_at = -math.inf
        kwargs.setdefault("bar_format", "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}{postfix}]")
        super().__init__(*args, file=_Nowhere(), **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        now = time.monotonic()
        if now - self._logged_at >= self._interval_s:
            self._logged_at = now
            log.info("%s", self)
        return True

    def close(self) -> None:
        if not self.disable:
            log.info("%s", self)  # the final state, whatever the interval
            self._interval_s = math.inf  # and nothing more from tqdm's own last redraw
        super().close()


def progress_bar(**kwargs) -> tqdm:
    """`tqdm(**kwargs)` at a terminal, else a bar that logs one line per interval."""
    return tqdm(**kwargs) if sys.stderr.isatty() else LoggedProgress(**kwargs)
