"""The monitor's time accounting: what it spends, on what, and against how much training time.

Every evaluation (scoring, gathering, trust, logging, export) and every curated batch counts. The
first evaluation, at fit start, and the incoming rows scored with it are a burst kept apart from the
share. Seconds are reported (``time/`` keys), never used to decide: the schedule and the pacing count
backward passes.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional

from jepa_monitor.metrics import MetricKeys


class MonitorClock:
    def __init__(self) -> None:
        self.total = 0.0  # all runs (persisted)
        self.evaluation = {"heldout": 0.0, "incoming": 0.0}  # the latest of each (persisted)
        self.start()

    def start(self) -> None:
        self.t0: Optional[float] = time.perf_counter()
        self.run = 0.0
        self.burst = 0.0
        self.curation = 0.0
        self.running_since: Optional[float] = None  # an evaluation in progress counts as it runs
        self.running_burst = False  # ... and belongs to the fit-start burst

    def add(self, seconds: float, curation: bool = False) -> None:
        self.total += seconds
        self.run += seconds
        if curation:
            self.curation += seconds

    def timed(self, kind: str, fn: Callable, *args: Any, burst: bool = False) -> None:
        """Run one evaluation ``fn(*args)``, timed; ``burst``: it belongs to the fit-start burst (the
        first held-out evaluation and the incoming rows scored with it), left out of the share."""
        start = self.running_since = time.perf_counter()
        self.running_burst = burst
        try:
            fn(*args)
        finally:
            self.running_since, self.running_burst = None, False
            seconds = time.perf_counter() - start
            self.evaluation[kind] = seconds
            self.add(seconds)
            if burst:
                self.burst += seconds

    def _running(self) -> float:
        return time.perf_counter() - self.running_since if self.running_since is not None else 0.0

    def total_now(self) -> float:
        """All monitor seconds, the evaluation in progress included."""
        return self.total + self._running()

    def burst_now(self) -> float:
        """Seconds of the fit-start burst, the part of it still running included."""
        return self.burst + (self._running() if self.running_burst else 0.0)

    def _wall(self) -> float:
        return time.perf_counter() - self.t0 - self.burst_now() if self.t0 is not None else 0.0

    def share(self) -> float:
        """Measurement seconds (everything but curation) over wall seconds since fit start, the
        fit-start burst left out of both: what ``Cadence.pass_share`` bounds, in passes (0 while only the burst has run)."""
        wall = self._wall()
        measured = self.run - self.curation + self._running() - self.burst_now()
        return measured / wall if wall > 0 and measured > 0 else 0.0

    def curation_share(self) -> float:
        """Curation seconds over the same wall time: what the policy's ``pass_share`` bounds, in passes (as a share of
        training batches, c/s, rather than of the wall time, c/(s + c + ...))."""
        wall = self._wall()
        return self.curation / wall if wall > 0 else 0.0

    def metrics(self, keys: MetricKeys, seconds: float, *, failures_total: int, measurement_share: Optional[float],
                curation_share: Optional[float], curating: bool, gap: Optional[int]) -> Dict[str, float]:
        """The ``time/`` scalars logged with an evaluation that took ``seconds`` (the monitor's docstring)."""
        metrics = {keys.time("score_seconds"): seconds, keys.time("total_score_seconds"): self.total_now(),
                   keys.time("share"): self.share(), keys.time("fit_start_seconds"): self.burst_now(),
                   keys("monitor", "failures_total"): float(failures_total)}
        if measurement_share is not None:
            metrics[keys.time("measurement_pass_share")] = measurement_share
        if curating:
            metrics[keys.time("curation_share")] = self.curation_share()
            if curation_share is not None:
                metrics[keys.time("curation_pass_share")] = curation_share
        if gap is not None:
            metrics[keys.time("heldout_gap")] = float(gap)
        return metrics

    def state_dict(self) -> Dict[str, Any]:
        return {"total": self.total, "evaluation": dict(self.evaluation)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.total, self.evaluation = float(state["total"]), dict(state["evaluation"])
