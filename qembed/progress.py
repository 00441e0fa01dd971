"""Progress of long steps, the same way in every verb: a tqdm bar on a terminal; otherwise (output going
to a file or a pipe) a plain line at most every `QEMBED_PROGRESS_INTERVAL` seconds (default 30) with the
stage, done/total, rate and ETA. `--progress` forces bars, `--no-progress` shows nothing (`forced_mode`)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

DEFAULT_INTERVAL = 30.0
_mode: bool | None = None  # set by the CLI's --progress/--no-progress; None: bar on a terminal, lines otherwise
_clock = time.monotonic


def interval() -> float:
    """Seconds between plain progress lines (`QEMBED_PROGRESS_INTERVAL`, default 30)."""
    try:
        return max(0.0, float(os.environ.get("QEMBED_PROGRESS_INTERVAL", DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


@contextlib.contextmanager
def forced_mode(mode: bool | None) -> Iterator[None]:
    """Within the block, progress with `enabled=None` is a bar (True), nothing (False) or automatic (None)."""
    global _mode
    previous, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = previous


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class PlainProgress:
    """The tqdm subset qembed uses (`update`, `set_postfix`, iteration, `close`, context manager), printing
    `qembed: STAGE: done/total unit (pct%), rate unit/s, elapsed, ETA` at most every `every` seconds and a
    last line at the end of a step that printed any."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, every: float | None = None, file=None) -> None:  # fmt: skip
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self._start = initial
        self.every = interval() if every is None else every
        self.file = file
        self.postfix = ""
        self._t0 = self._last = _clock()
        self._printed_at: int | None = None

    def __iter__(self) -> Iterator:
        assert self.iterable is not None
        for item in self.iterable:
            yield item
            self.update(1)

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = _clock()
        if now - self._last >= self.every:
            self._emit(now)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in {**(ordered_dict or {}), **kwargs}.items())

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def line(self, now: float) -> str:
        elapsed = max(now - self._t0, 1e-9)
        rate = (self.n - self._start) / elapsed
        parts = [f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{rate:.3g} {self.unit}/s")
        parts.append(f"elapsed {_duration(elapsed)}")
        if self.total and self.n < self.total:
            parts.append(f"ETA {_duration((self.total - self.n) / rate)}" if rate > 0 else "ETA ?")
        if self.postfix:
            parts.append(self.postfix)
        return f"qembed: {self.desc}: " + ", ".join(parts)

    def _emit(self, now: float) -> None:
        print(self.line(now), file=self.file or sys.stderr, flush=True)
        self._last, self._printed_at = now, self.n

    def close(self) -> None:
        if self._printed_at is not None and self._printed_at != self.n:
            self._emit(_clock())
        self._printed_at = self.n if self._printed_at is not None else None


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
                 initial: int = 0, enabled: bool | None = None, **tqdm_options: Any):  # fmt: skip
    """A progress object with tqdm's interface. `enabled`: True a tqdm bar, False nothing, None the CLI's
    `--progress/--no-progress` choice, else a bar on a terminal and plain lines (`PlainProgress`) otherwise."""
    from tqdm.auto import tqdm

    mode = _mode if enabled is None else enabled
    if mode is None and not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        return PlainProgress(iterable, total=total, desc=desc, unit=unit, initial=initial)
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=mode is False,
                dynamic_ncols=True, **tqdm_options)  # fmt: skip
