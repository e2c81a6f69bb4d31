"""Run a recipe's stages as concurrent processes, each once the stages it needs have finished.

    times = run_concurrently({"clip": (), "vae": (), "unet": ("clip", "vae")}, launch, jobs=2)

``launch(stage)`` starts the stage's process and returns its :class:`subprocess.Popen`; the
mapping's order is the priority (put the critical path first): whenever fewer than ``jobs``
stages run, the first waiting stage whose needs are all done starts. A need that is not a key
of the mapping counts as done (the caller left it out because it is finished or not wanted).
A stage that fails does not stop the others: every stage that does not depend on it still runs
to its end, then :class:`StageFailed` names the failed stages. On an interrupt the running
processes are terminated (the trainers resume exactly from their last checkpoint).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Mapping, Sequence


class StageFailed(RuntimeError):
    """One or more stages exited with an error (``failed`` maps stage to exit status)."""

    def __init__(self, failed: Mapping[str, int], skipped: Sequence[str]) -> None:
        self.failed, self.skipped = dict(failed), list(skipped)
        names = ", ".join(f"{stage} (exit status {code})" for stage, code in self.failed.items())
        tail = f"; not started, as they need a failed stage: {', '.join(self.skipped)}" if self.skipped else ""
        super().__init__(f"stage(s) failed: {names}{tail}")


def run_concurrently(stages: Mapping[str, Sequence[str]], launch: Callable[[str], subprocess.Popen],
                     *, jobs: int, on_done: Callable[[str], None] | None = None,
                     poll_seconds: float = 0.5) -> dict[str, float]:
    """Run every stage of ``stages`` (stage -> the stages it needs), at most ``jobs`` at once.

    ``on_done(stage)`` runs in this process after a stage succeeds and before any stage that
    needs it starts. Returns each stage's wall-clock seconds; raises :class:`StageFailed`.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    for stage, needs in stages.items():
        if stage in needs:
            raise ValueError(f"stage {stage!r} needs itself")
    waiting, done, failed = list(stages), set[str](), dict[str, int]()
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    seconds: dict[str, float] = {}

    def blocked(stage: str) -> bool:
        """True when a need of ``stage`` failed or can no longer run."""
        return any(need in failed or (need in stages and need not in done and need not in running
                                      and need not in waiting) for need in stages[stage])

    try:
        while waiting or running:
            while any(blocked(s) for s in waiting):  # drop what needs a failed stage, transitively
                waiting = [s for s in waiting if not blocked(s)]
            for stage in list(waiting):
                if len(running) >= jobs:
                    break
                if all(need not in stages or need in done for need in stages[stage]):
                    waiting.remove(stage)
                    running[stage] = (launch(stage), time.monotonic())
            if not running:
                if waiting:  # every waiting stage needs one that never finishes: a cycle
                    raise ValueError(f"stages {waiting} need each other")
                break
            time.sleep(poll_seconds)
            for stage, (process, started) in list(running.items()):
                code = process.poll()
                if code is None:
                    continue
                del running[stage]
                seconds[stage] = time.monotonic() - started
                if code:
                    failed[stage] = code
                    continue
                if on_done is not None:
                    on_done(stage)
                done.add(stage)
    except BaseException:
        for process, _ in running.values():
            process.terminate()
        for process, _ in running.values():
            process.wait()
        raise
    if failed:
        raise StageFailed(failed, [s for s in stages if s not in done and s not in failed])
    return seconds
