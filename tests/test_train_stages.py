"""run_concurrently: stages start once their needs are done, at most `jobs` at once; failures are contained."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from latentdiff.train.stages import StageFailed, run_concurrently


def stage_launcher(log: Path, seconds: float = 0.3, fail: dict[str, int] | None = None,
                   durations: dict[str, float] | None = None):
    """A stage is a process that logs its start and end (with times), sleeping ``durations[stage]``
    (else ``seconds``), and exits with ``fail[stage]`` or 0."""
    fail, durations = fail or {}, durations or {}

    def launch(stage: str) -> subprocess.Popen:
        code = (f"import time; f = open({str(log)!r}, 'a'); f.write('start {stage} %f\\n' % time.time()); f.flush(); "
                f"time.sleep({durations.get(stage, seconds)}); f.write('end {stage} %f\\n' % time.time()); f.close(); "
                f"raise SystemExit({fail.get(stage, 0)})")
        return subprocess.Popen([sys.executable, "-c", code])

    return launch


def events(log: Path) -> dict[tuple[str, str], float]:
    return {(kind, stage): float(t) for kind, stage, t in (line.split() for line in log.read_text().splitlines())}


NEEDS = {"clip": (), "vae": (), "unet": ("clip", "vae"), "decoder": ("vae",), "anneal": ("unet",), "sharpen": ("decoder",)}


def test_stages_wait_for_their_needs_and_run_at_most_jobs_at_once(tmp_path: Path) -> None:
    log, finished = tmp_path / "log", []
    launch = stage_launcher(log, durations={"clip": 1.0, "vae": 0.2})  # vae ends first: unet must still wait
    seconds = run_concurrently(NEEDS, launch, jobs=2, on_done=finished.append, poll_seconds=0.02)
    t = events(log)
    assert set(seconds) == set(NEEDS) == set(finished)
    for stage, needs in NEEDS.items():
        for need in needs:
            assert t["end", need] <= t["start", stage], (need, stage)
    for stage in NEEDS:  # never more than 2 running: at each start, fewer than 2 others are running
        others = [s for s in NEEDS if s != stage and t["start", s] <= t["start", stage] < t["end", s]]
        assert len(others) <= 1, (stage, others)
    assert t["start", "vae"] < t["end", "clip"]  # the two independent stages did overlap


def test_one_job_runs_the_stages_one_after_another_in_priority_order(tmp_path: Path) -> None:
    log = tmp_path / "log"
    run_concurrently(NEEDS, stage_launcher(log, 0.05), jobs=1, poll_seconds=0.01)
    starts = sorted((t, stage) for (kind, stage), t in events(log).items() if kind == "start")
    assert [stage for _, stage in starts] == list(NEEDS)


def test_a_failed_stage_stops_only_what_needs_it(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with pytest.raises(StageFailed, match=r"vae \(exit status 3\).*unet, decoder, anneal, sharpen") as err:
        run_concurrently(NEEDS, stage_launcher(log, 0.05, fail={"vae": 3}), jobs=2, poll_seconds=0.01)
    assert err.value.failed == {"vae": 3}
    assert {stage for kind, stage in events(log) if kind == "start"} == {"clip", "vae"}  # clip still ran to its end
    assert ("end", "clip") in events(log)


def test_on_done_runs_before_any_dependent_starts(tmp_path: Path) -> None:
    log, marks = tmp_path / "log", {}
    run_concurrently({"vae": (), "decoder": ("vae",)}, stage_launcher(log, 0.05), jobs=2,
                     on_done=lambda stage: marks.setdefault(stage, time.time()), poll_seconds=0.01)
    assert marks["vae"] <= events(log)["start", "decoder"]


def test_an_error_in_this_process_terminates_the_running_stages(tmp_path: Path) -> None:
    log, processes = tmp_path / "log", []
    slow, fast = stage_launcher(log, 60), stage_launcher(log, 0.05)

    def launch(stage: str) -> subprocess.Popen:
        processes.append((slow if stage == "long" else fast)(stage))
        return processes[-1]

    def fail(stage: str) -> None:
        raise KeyboardInterrupt

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_concurrently({"long": (), "short": ()}, launch, jobs=2, on_done=fail, poll_seconds=0.01)
    assert time.monotonic() - started < 30 and all(p.poll() is not None for p in processes)


def test_bad_schedules_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        run_concurrently({"a": ()}, stage_launcher(tmp_path / "unused"), jobs=0)
    with pytest.raises(ValueError, match="needs itself"):
        run_concurrently({"a": ("a",)}, stage_launcher(tmp_path / "unused"), jobs=1)
    with pytest.raises(ValueError, match="need each other"):
        run_concurrently({"a": ("b",), "b": ("a",)}, stage_launcher(tmp_path / "unused"), jobs=1)
