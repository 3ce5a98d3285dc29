"""Progress of a long phase, said as it goes: a line every so many items without a terminal (a log file, a SLURM job),
a tqdm bar in one. Sampling (run.py), training (lit.TrainProgress) and feature extraction (metrics) use it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable


class Progress:
    """One line every `every` images (rank 0): how many of the run's images exist, the pace, the time left.
    Under DDP the pace is rank 0's times the number of ranks."""

    def __init__(self, total: int, already: int, todo: int, every: int, world: int = 1, rank: int = 0,
                 label: str = "sampling", clock=time.monotonic, unit: str = "images", per_second: str = "img/s"):
        self.total, self.already, self.todo, self.world, self.rank = total, already, todo, world, rank
        self.every = every if every > 0 else max(1, todo // 20)
        self.label, self.clock, self.start, self.made, self.shown = label, clock, clock(), 0, 0
        self.unit, self.per_second = unit, per_second

    def line(self) -> str:
        seconds = max(self.clock() - self.start, 1e-9)
        made = min(self.made * self.world, self.todo)
        rate = made / seconds
        left = (self.todo - made) / rate if rate > 0 else float("inf")
        return (f"hiresrun: {self.label} {self.already + made:,}/{self.total:,} {self.unit}, {rate:.3g} "
                f"{self.per_second}, ETA {duration(left)}")

    def __call__(self, n: int) -> None:
        self.made += n
        if self.rank == 0 and (self.made - self.shown >= self.every or self.made * self.world >= self.todo):
            self.shown = self.made
            print(self.line(), flush=True)


def duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "unknown"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def reporter(total: int, label: str, unit: str = "images") -> Callable[[int], None]:
    """`say(n)` after each n items of a phase of `total`: a tqdm bar in a terminal (closed at the total), else a line
    every 5% (Progress)."""
    if os.isatty(1):
        from tqdm import tqdm

        bar = tqdm(total=total, desc=label, unit=unit[:3] if unit == "images" else unit, dynamic_ncols=True)

        def say(n: int) -> None:
            bar.update(n)
            if bar.n >= total:
                bar.close()

        return say
    return Progress(total, 0, total, 0, label=label, unit=unit, per_second="img/s" if unit == "images" else f"{unit}/s")
