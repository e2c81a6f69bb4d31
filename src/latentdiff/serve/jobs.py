"""The generation queue: FIFO, bounded, one job at a time on one worker thread.

A job is a function of a :class:`Progress` (which it reports steps to and which tells it to
stop); the worker runs jobs in submission order, so the pipeline is never used by two at
once. A full queue refuses at once (:class:`QueueFull`, a 503). A job that fails (bad input
found late, out of memory) records its error and the next one runs normally. ``cancel``
drops a waiting job or stops a running one at its next step (a client that disconnects);
``interrupt`` / ``skip`` act on the running job as A1111's buttons do.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

from torch import Tensor


class QueueFull(Exception):
    """The queue holds its maximum of waiting jobs."""


class Progress:
    """What a running job reports and is told: steps, the latest x0 prediction, stop flags."""

    def __init__(self) -> None:
        self.step = 0
        self.total = 0
        self.x0: Tensor | None = None
        self.started = time.monotonic()
        self.cancelled = False  # stop the whole job (its client left)
        self.interrupted = False  # A1111's Interrupt: stop, return what there is
        self.skipped = False  # A1111's Skip: end the current image batch, go on with the next
        self.job_no = 0  # which of the job's n_iter batches runs

    def callback(self, step: int, total: int, x0: Tensor) -> bool:
        """A step callback for the pipeline: True stops sampling."""
        self.step, self.total, self.x0 = step + 1, total, x0
        return self.cancelled or self.interrupted or self.skipped

    def fraction(self, n_iter: int) -> float:
        if not self.total:
            return 0.0
        return min(1.0, (self.job_no + self.step / self.total) / max(1, n_iter))


class Job:
    """One queued request: ``run(progress)`` gives its result or raises."""

    _ids = itertools.count(1)

    def __init__(self, run: Callable[[Progress], Any], *, n_iter: int = 1, label: str = "") -> None:
        self.id = next(self._ids)
        self.run = run
        self.n_iter = n_iter
        self.label = label
        self.progress = Progress()
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.timestamp = time.strftime("%Y%m%d%H%M%S")

    def cancel(self) -> None:
        self.progress.cancelled = True


class JobQueue:
    """FIFO of :class:`Job` with at most ``max_waiting`` waiting; one worker thread runs them."""

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self.current: Job | None = None
        self.history: collections.deque[int] = collections.deque(maxlen=1000)  # ids of the jobs run, in order
        self._worker = threading.Thread(target=self._work, name="latentdiff-queue", daemon=True)
        self._worker.start()

    # ---- submitting -------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        with self._cond:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"the queue is full ({self.max_waiting} jobs waiting); try again later")
            self._waiting.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Drop ``job`` if it waits, stop it at its next step if it runs."""
        job.cancel()
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                job.error = CancelledJob("cancelled before it started")
                job.done.set()

    # ---- state ------------------------------------------------------------------------
    @property
    def job_count(self) -> int:
        """Jobs waiting plus the one running (A1111's ``state.job_count``)."""
        with self._cond:
            return len(self._waiting) + (self.current is not None)

    def interrupt(self) -> None:
        job = self.current
        if job is not None:
            job.progress.interrupted = True

    def skip(self) -> None:
        job = self.current
        if job is not None:
            job.progress.skipped = True

    # ---- the worker -------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting:
                    self._cond.wait()
                job = self._waiting.popleft()
                self.current = job
                self.history.append(job.id)
            try:
                job.result = job.run(job.progress)
            except BaseException as err:  # noqa: BLE001 - a failed job answers its error; the queue goes on
                job.error = err
            finally:
                with self._cond:
                    self.current = None
                job.done.set()


class CancelledJob(Exception):
    """The job's client went away."""
