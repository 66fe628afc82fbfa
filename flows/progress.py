"""A sweep's progress in its log, one line as each point ends: how many of how many are done, how many of those
were computed, reused from an earlier run or failed, and the time since the sweep started. A study of 90 points
runs for hours; this is the line that says how far it is (the Prefect UI shows the same as task runs)."""

from __future__ import annotations

import time
from typing import Any, Callable


def duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min {int(seconds % 60)} s"


class Progress:
    def __init__(self, what: str, total: int, logger: Any, on_end: Callable[[Any], None] | None = None):
        """`what`: how the line starts, e.g. "sweep NAME" or "study NAME". `on_end(result)`: called as each point
        ends, before its line (e.g. to keep a record of it)."""
        self.what, self.total, self.logger, self.on_end = what, total, logger, on_end
        self.counts = {"computed": 0, "reused": 0, "failed": 0}
        self.start = time.perf_counter()

    def line(self) -> str:
        c = self.counts
        done = sum(c.values())
        return (f"{self.what}: {done} of {self.total} points done ({c['computed']} computed, {c['reused']} "
                f"reused, {c['failed']} failed) in {duration(time.perf_counter() - self.start)}")

    def ended(self, result, log: bool = True) -> None:
        """One more point ended with `result` (a PointResult: failed, reused or computed), and (`log`) the line."""
        self.counts["failed" if result.status != "ok" else "reused" if result.cached else "computed"] += 1
        if self.on_end:
            self.on_end(result)
        if log:
            self.logger.info(self.line())
