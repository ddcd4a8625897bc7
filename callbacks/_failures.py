"""Consecutive failures of one kind of work, and when to give up on it.

The monitor keeps two counters: one for measurements (every rank learns of a failure through the
gather, so all ranks count alike and disable together) and one for curation (no collective call,
so each rank counts its own). They differ only in that meaning, which ``scope`` names in the
messages; the mechanism is this one class.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Optional


class FailureCounter:
    """Warn on each failure; after ``limit`` consecutive ones, disable (and say so once)."""

    def __init__(self, tag: str, noun: str, what: str, consequence: str, disabled_means: str, limit: int) -> None:
        self.tag, self.noun, self.what, self.limit = tag, noun, what, limit
        self.consequence, self.disabled_means = consequence, disabled_means
        self.consecutive = 0
        self.total = 0
        self.disabled = False

    @classmethod
    def for_scoring(cls, tag: str, limit: int) -> "FailureCounter":
        return cls(tag, "scoring", "scoring", "the measurement is skipped and training continues",
                   "no more scores are measured or logged and no batch is curated in this run; fix the cause and "
                   "restart (the state is in the checkpoint).", limit)

    @classmethod
    def for_curation(cls, tag: str, limit: int) -> "FailureCounter":
        return cls(tag, "curation", "curating training batch", "the batch trains unfiltered",
                   "curation is off and batches train unfiltered from now on on this rank (monitoring continues).", limit)

    def succeeded(self) -> None:
        self.consecutive = 0

    def failed(self, where: str, err: Optional[BaseException]) -> None:
        self.consecutive += 1
        self.total += 1
        reason = f"{type(err).__name__}: {err}" if err is not None else "it failed on another rank"
        warnings.warn(
            f"{self.tag}: {self.what} {where} failed ({reason}); {self.consequence} "
            f"({self.consecutive}/{self.limit} in a row).",
            RuntimeWarning, stacklevel=3,
        )
        if self.consecutive >= self.limit and not self.disabled:
            self.disabled = True
            warnings.warn(
                f"{self.tag}: DISABLED after {self.consecutive} consecutive {self.noun} failures (last: {reason}); "
                f"{self.disabled_means}",
                RuntimeWarning, stacklevel=3,
            )

    def state_dict(self) -> Dict[str, Any]:
        return {"consecutive": self.consecutive, "total": self.total, "disabled": self.disabled}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.consecutive = int(state["consecutive"])
        self.total = int(state["total"])
        self.disabled = bool(state["disabled"])
