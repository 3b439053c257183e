"""Progress for long work: a live bar on a terminal, whole log lines anywhere else.

A bar redraws one line with carriage returns; written to a log file, a CI log or `nohup`,
that is one unreadable line of every redraw. So when stderr is not a terminal the same
counts, rate and ETA come as plain lines, at most one every LINE_INTERVAL_S and one at the end.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

LINE_INTERVAL_S = 30.0  # a line per half minute reads well in a log and costs nothing


class _Lines(tqdm):
    """tqdm's bookkeeping, shown as one full line: at the start, then at most once every
    LINE_INTERVAL_S (a postfix change asks for a redraw each time; a log needs no such
    thing), and the last state once, at the end."""

    def __init__(self, *args, **kwargs):
        self._last_line, self._final = float("-inf"), False
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):  # tqdm's hook for every redraw
        now = time.monotonic()
        if msg is None and not self._final and now - self._last_line < LINE_INTERVAL_S:
            return True
        self._last_line = now
        self.fp.write((msg if msg is not None else self.__str__()) + "\n")
        self.fp.flush()
        return True

    def clear(self, nolock=False):  # nothing to erase: lines are never redrawn
        pass

    def moveto(self, n):
        pass

    def close(self):
        if not self.disable and not self._final:
            self._final = True
            self.display()
        self.disable = True  # tqdm's own close would draw the same line again
        super().close()


def progress_bar(iterable=None, *, disable: bool = False, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)`` on a terminal; plain lines otherwise (see above)."""
    if disable or sys.stderr.isatty():
        return tqdm(iterable, disable=disable, **kwargs)
    kwargs.pop("dynamic_ncols", None)
    return _Lines(iterable, disable=False, ascii=True, **kwargs)
