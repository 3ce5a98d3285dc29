"""SIGINT, SIGTERM and SIGUSR2 during training or sampling: the step or batch in flight finishes and is saved, one
line says what is on disk and how to resume, and the command exits 128 + the signal (130 / 143). A second Ctrl-C
stops at once. SIGUSR2 is submitit's "requeue me" (`--signal=USR2@t`): what is safe is said, then submitit's own
handler requeues the job. The Lightning callbacks (lit.Interrupt, lit.SampleInterrupt) and `hiresrun sample` on one
device (run.py) share this."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from hiresrun.errors import DataError

CAUGHT = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


class Interrupted(DataError):
    """Stopped by SIGINT or SIGTERM after the last finished step or batch was saved; exit 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class Signals:
    """Notes the signal instead of dying; `install` / `restore` around the work (main thread only)."""

    def __init__(self):
        self.signum, self._previous = None, {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s in CAUGHT:
            self._previous[s] = signal.getsignal(s)
            signal.signal(s, self._note)

    def _note(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def hand_over(self, signum: int, done: str, first: bool = True) -> None:
        """SIGUSR2 under submitit: say what is safe on disk, then let submitit requeue the job (it exits)."""
        previous = self._previous.get(signum)
        if signum == signal.SIGUSR2 and callable(previous) and first:
            print(f"hiresrun: SIGUSR2 {done}; handing over to the job scheduler's requeue (the requeued job resumes "
                  f"from it)", flush=True)
            previous(signum, None)  # submitit: requeue this job, then exit


class SampleSignals(Signals):
    """Sampling: after each written batch, a noted signal stops the run with the count of images on disk and the
    command that resumes it (the same command into the same folder)."""

    def __init__(self, run_dir: Path, done_before: int, total: int):
        super().__init__()
        self.path, self.made, self.done_before, self.total = Path(run_dir), 0, done_before, total

    def __enter__(self) -> SampleSignals:
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def after_batch(self, images: int, world_size: int = 1, first: bool = True) -> None:
        # Each rank decides on its own signal (a job scheduler signals every task, Ctrl-C the whole process group):
        # ranks may hold different numbers of batches, so a collective here could wait forever.
        self.made += images * world_size
        if self.signum is None:
            return
        signum = self.signum
        done = f"with about {min(self.done_before + self.made, self.total):,} of {self.total:,} images on disk" \
            if world_size > 1 else f"with {self.done_before + self.made:,} of {self.total:,} images on disk"
        self.hand_over(signum, done, first)
        raise Interrupted(f"interrupted by {signal.Signals(signum).name} {done} in {self.path}; resume with the same "
                          f"command plus hydra.run.dir={self.path}", signum)
