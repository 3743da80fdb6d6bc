"""Progress bars for long operations, on stderr and only when stderr is a terminal."""

from __future__ import annotations

import sys
from types import TracebackType

from tqdm import tqdm


class LoadProgress:
    """A byte-counting bar usable as a ``(done, total)`` callback, e.g. for model loading."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._bar: tqdm | None = None

    def __enter__(self) -> LoadProgress:
        return self

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            self._bar = tqdm(
                total=total,
                desc=self.label,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=sys.stderr,
                disable=not sys.stderr.isatty(),
                leave=False,
            )
        self._bar.update(done - self._bar.n)

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.close()
