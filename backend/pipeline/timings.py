"""Stage durations of one request or job."""

from __future__ import annotations

import collections


class Timings:
    """Stage durations of one request, reported in a Server-Timing header (the bench reads it)."""

    def __init__(self):
        self.stages: dict[str, float] = collections.defaultdict(float)

    def add(self, stage: str, seconds: float) -> None:
        self.stages[stage] += seconds

    def header(self) -> str:
        return ", ".join(f"{name};dur={seconds * 1000:.2f}" for name, seconds in self.stages.items())
