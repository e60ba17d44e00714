"""Progress display of the slow export steps: one line per step with its time, bars for loops."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO, TypeVar

T = TypeVar("T")


class Progress:
    """Writes step lines (and tqdm bars when tqdm is installed) to a stream; silent when quiet."""

    def __init__(self, *, quiet: bool = False, stream: TextIO | None = None) -> None:
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.timings: dict[str, float] = {}

    def log(self, message: str) -> None:
        """One line of progress."""
        if not self.quiet:
            print(message, file=self.stream, flush=True)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time a step, announce it, and record its seconds in ``timings``."""
        self.log(f"[export] {name} ...")
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        self.timings[name] = round(self.timings.get(name, 0.0) + dt, 3)
        self.log(f"[export] {name}: done in {dt:.1f}s")

    def counter(self, total: int, desc: str) -> Counter:
        """A progress bar advanced by hand (``update()``), closed with ``close()``."""
        if self.quiet:
            return Counter(None)
        try:
            from tqdm.auto import tqdm
        except ImportError:  # the bar is cosmetic; the step lines still report progress
            return Counter(None)
        return Counter(tqdm(total=total, desc=f"[export] {desc}", file=self.stream, leave=False))

    def bar(self, items: Iterable[T], *, total: int | None = None, desc: str = "") -> Iterable[T]:
        """Iterate with a progress bar (tqdm if installed and not quiet)."""
        if self.quiet:
            return items
        try:
            from tqdm.auto import tqdm
        except ImportError:  # the bar is cosmetic; the step lines still report progress
            return items
        return tqdm(items, total=total, desc=f"[export] {desc}", file=self.stream, leave=False)


class Counter:
    """A hand-advanced progress bar (a no-op without tqdm or when quiet)."""

    def __init__(self, bar: Any) -> None:
        self._bar = bar

    def update(self, n: int = 1) -> None:
        """Advance by ``n``."""
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        """Remove the bar."""
        if self._bar is not None:
            self._bar.close()
