"""A progress bar for long scoring jobs: tqdm when installed (it comes with lightning), else a
plain line on stderr every 10 %."""

from __future__ import annotations

import sys
import time
from typing import Any


def progress_bar(total: int, desc: str) -> Any:
    """An object with ``update(n)`` and ``close()`` showing rows done and rows/s."""
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="row", file=sys.stderr, leave=False)
    except ImportError:
        return _PlainProgress(total, desc)


class _PlainProgress:
    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done, self._next = total, desc, 0, 0.1
        self._t0 = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        if self.total and self.done / self.total >= self._next - 1e-9:
            rate = self.done / max(time.perf_counter() - self._t0, 1e-9)
            print(f"{self.desc}: {self.done}/{self.total} rows ({rate:.1f} rows/s)", file=sys.stderr)
            while self.done / self.total >= self._next - 1e-9:  # one line however many marks were passed
                self._next += 0.1

    def close(self) -> None:
        pass
