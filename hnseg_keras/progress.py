"""Progress of the long commands (prepare, predict, evaluate, train), written one way.

On a terminal: one bar redrawn in place with items done, elapsed time and time left. Anywhere else
(a log file, CI, a notebook): one line per finished item, so logs stay readable. Either way a
summary line at the end says what was done and how long it took. Everything goes to stderr, so
stdout keeps only the command's results.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

BAR_WIDTH = 24


def format_seconds(seconds: float) -> str:
    """``"42 s"``, ``"3 min 05 s"`` or ``"1 h 02 min"``: short, for a progress line."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def bar(done: int, total: int) -> str:
    """``"[######..................]"``: the share done, the same width in every command."""
    filled = int(BAR_WIDTH * min(max(done / max(total, 1), 0.0), 1.0))
    return "[" + "#" * filled + "." * (BAR_WIDTH - filled) + "]"


def clock_time(seconds_ahead: float, now: float | None = None) -> str:
    """Local clock time ``seconds_ahead`` after ``now`` (``time.time()``): ``"14:32"``, with the date
    when that is not today (a long run's end must not read as this afternoon)."""
    now = time.time() if now is None else now
    end, today = time.localtime(now + max(0.0, seconds_ahead)), time.localtime(now)
    return time.strftime("%H:%M" if end[:3] == today[:3] else "%Y-%m-%d %H:%M", end)


class Progress:
    """Counts finished items of a known total and reports them.

    Args:
        what: the command, first word of every line (``"predict"``).
        total: number of items expected.
        unit: the item's name in the summary (``"case"``).
        stream: where lines go (stderr by default).
        interactive: draw a bar in place; default: whether ``stream`` is a terminal.
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(self, what: str, total: int, unit: str = "case", stream: TextIO | None = None,
                 interactive: bool | None = None, clock=time.monotonic):
        self.what, self.total, self.unit = what, int(total), unit
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.clock = clock
        self.started = clock()
        self.done = 0

    def elapsed(self) -> float:
        return self.clock() - self.started

    def remaining(self) -> float | None:
        """Seconds left at the mean pace so far; None before the first item."""
        if self.done == 0:
            return None
        return self.elapsed() / self.done * max(self.total - self.done, 0)

    def step(self, item: str = "", detail: str = "") -> None:
        """One more item finished: ``item`` names it, ``detail`` says what came of it."""
        self.done += 1
        left = self.remaining()
        eta = f", ~{format_seconds(left)} left" if left and self.done < self.total else ""
        if self.interactive:
            text = (f"\r\x1b[K{self.what} {bar(self.done, self.total)} {self.done}/{self.total} {item} "
                    f"({format_seconds(self.elapsed())}{eta})")
            self.stream.write(text)
        else:
            line = f"{self.what} [{self.done}/{self.total}] {item}"
            line += f": {detail}" if detail else ""
            self.stream.write(f"{line} ({format_seconds(self.elapsed())}{eta})\n")
        self.stream.flush()

    def finish(self, summary: str = "") -> str:
        """Write and return the summary line: items, time, and ``summary`` (what was written where)."""
        plural = "" if self.done == 1 else "s"
        line = f"{self.what}: {self.done} {self.unit}{plural} in {format_seconds(self.elapsed())}"
        line += f"; {summary}" if summary else ""
        self.stream.write(("\r\x1b[K" if self.interactive else "") + line + "\n")
        self.stream.flush()
        return line
