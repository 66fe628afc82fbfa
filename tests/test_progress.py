"""The sweep's progress line (flows/progress.py); a real sweep's lines are checked in tests/test_flows.py."""

from flows.points import PointResult
from flows.progress import Progress, duration


class Log:
    def __init__(self):
        self.lines = []

    def info(self, line):
        self.lines.append(line)


def test_each_ended_point_is_a_line_with_the_counts_so_far():
    log = Log()
    progress = Progress("sweep grid", 3, log)
    progress.ended(PointResult({}, "failed", "a"), log=False)  # refused before it ran: its own line says so
    progress.ended(PointResult({}, "ok", "b", cached=True))
    progress.ended(PointResult({}, "ok", "c"))
    assert [line.split(" in ")[0] for line in log.lines] == [
        "sweep grid: 2 of 3 points done (0 computed, 1 reused, 1 failed)",
        "sweep grid: 3 of 3 points done (1 computed, 1 reused, 1 failed)"]
    assert log.lines[-1].endswith(" in 0 min 0 s")


def test_on_end_sees_every_ended_point_before_its_line():
    log, seen = Log(), []
    progress = Progress("study s", 2, log, on_end=lambda r: seen.append((r.exp_name, len(log.lines))))
    progress.ended(PointResult({}, "failed", "a"), log=False)
    progress.ended(PointResult({}, "ok", "b"))
    assert seen == [("a", 0), ("b", 0)] and len(log.lines) == 1


def test_durations_read_as_minutes_then_hours():
    assert duration(59.9) == "0 min 59 s"
    assert duration(61) == "1 min 1 s"
    assert duration(3725) == "1 h 02 min"
    assert duration(11 * 3600 + 59 * 60) == "11 h 59 min"
