"""`python -m deployment.simulate` stops every process of its run within seconds on SIGTERM, on Ctrl-C and on its
--timeout, with every core busy: the SuperLink, `flwr run`, Flower's simulation runtime (`flwr-simulation`) and Ray's
processes. Two busy loops (`cpu_hog`) start beside the run once its runtime and Ray's workers are up and load every
core while the run is stopped (the start-up needs no load: what failed under load was the stop). The launcher runs
under a run id of the test's (deployment.procs.MARKER), which every process of the run inherits; the test also
snapshots the launcher's process tree before stopping it. Every wait is a poll with a short deadline."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deployment.local import format_run_config
from deployment.procs import MARKER, ProcessSet, alive, cmdline, descendants, marked_pids, new_run_id

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ["garden", "kitchen"]
START_S = 90.0  # deadline for the run to reach Flower's simulation runtime and Ray's workers (~15 s on 2 cores)
EXIT_S = 10.0  # the launcher's exit after a signal or its --timeout (grace 3 s, then SIGKILL)
GONE_S = 3.0  # after the launcher's exit: nothing of the run may be left by then
RUN_TIMEOUT_S = 45  # the --timeout test's limit: Ray's workers must be up before it
HOG_LEAD_S = 5.0  # the --timeout test loads every core from this many seconds before the limit


@pytest.fixture
def cpu_hog():
    """`start()`: two busy loops, one per core of the test machine, from then to the end of the test (unmarked,
    own session)."""
    env = {k: v for k, v in os.environ.items() if k != MARKER}
    hogs = []

    def start() -> None:
        assert not hogs, "already busy"
        hogs.extend(subprocess.Popen([sys.executable, "-c", "while True: pass"], env=env, start_new_session=True)
                    for _ in range(2))

    yield start
    for h in hogs:
        h.kill()
        h.wait()


@pytest.fixture
def launch(world, tmp_path):
    """start_launcher(world, tmp_path, ...); whatever a failed test left of the run is killed at teardown."""
    started = []

    def _launch(*extra: str, **kw) -> tuple[subprocess.Popen, str]:
        started.append(start_launcher(world, tmp_path, *extra, **kw))
        return started[-1]

    yield _launch
    for proc, run_id in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ProcessSet(run_id).stop(grace=0)


def start_launcher(world, tmp: Path, *extra: str, benchmark: bool = False, sigint_ignored: bool = False
                   ) -> tuple[subprocess.Popen, str]:
    """A run that would fine-tune for a long time (many epochs, no early stop); `benchmark`: the same run under the
    pipeline benchmark's driver (benchmarks/pipeline.py) instead of the launcher. `sigint_ignored`: the launcher
    inherits SIGINT ignored, as every background job of a non-interactive shell (CI, `make test &`) does."""
    root, enc, _ = world
    places = {} if benchmark else {"cache-dir": str(root / "cache"), "silo-state-root": str(tmp / "state")}
    rc = format_run_config({"encoder": str(enc), **places, "epochs": 5000, "patience": 5000,
                            "coef-steps": 5, "teacher-top-k": 8, "baselines": "task_arithmetic",
                            "granularities": "task"})  # the benchmark driver sets both places itself
    run_id = new_run_id("launcher-")  # below the test session's marker (tests/conftest.py)
    env = {**os.environ, MARKER: run_id, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "deployment.simulate", "--data-root", str(root / "data"), "--domains",
           ",".join(DOMAINS), "--run-dir", str(tmp / "run"), "--run-config", rc, *extra]
    if benchmark:
        cmd = [sys.executable, "-m", "benchmarks.pipeline", "--data-root", str(root / "data"), "--domains",
               ",".join(DOMAINS), "--work", str(tmp / "work"), "--runs", "warm", "--cache-dir", str(root / "cache"),
               "--run-config", rc, "--out", str(tmp / "pipeline.json"), *extra]
    with open(tmp / "launcher.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored
                                else None)
    return proc, run_id


def _log(tmp: Path) -> str:
    return (tmp / "launcher.log").read_text()[-3000:]


def wait_for_runtime(proc: subprocess.Popen, run_id: str, tmp: Path, deadline: float) -> set[int]:
    """Poll until Flower's simulation runtime and Ray's workers (actors) of this run are up; returns the run's pids."""
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"launcher exited early with {proc.returncode}:\n{_log(tmp)}"
        pids = set(marked_pids(run_id)) | set(descendants([proc.pid]))
        cmds = [cmdline(p) for p in pids]
        if any("flwr-simulation" in c for c in cmds) and any(c.startswith("ray::") for c in cmds):
            return pids
        time.sleep(0.5)
    raise AssertionError(f"the simulation runtime and Ray's workers did not start:\n{_log(tmp)}")


def wait_exit(proc: subprocess.Popen, deadline: float) -> int | None:
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return proc.poll()


def assert_all_gone(run_id: str, before: set[int]) -> None:
    """No process carrying the run's marker, nor any process of the launcher's tree seen before, is alive."""
    deadline = time.monotonic() + GONE_S
    while True:
        left = sorted(set(marked_pids(run_id)) | {p for p in before if alive(p)})
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if left:
        described = [(p, cmdline(p)[:80]) for p in left]
        for p in left:  # do not leave them to the next test (marked ones: the `launch` fixture)
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        raise AssertionError(f"processes of the run left behind: {described}")


def assert_resumable(run_dir: Path, log: str) -> None:
    """The launcher said so, no survivor holds the run directory's lock, the checkpoint (if any) is intact."""
    assert "the same --run-dir resumes" in log, log
    lock = run_dir / ".lock"
    if lock.exists():
        with open(lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if a process of the run still holds it
    if (run_dir / "checkpoint.json").exists():
        json.loads((run_dir / "checkpoint.json").read_text())


def _stop_run(proc: subprocess.Popen, sig: int, run_id: str, tmp: Path, busy) -> tuple[int | None, float, set[int]]:
    """Wait for the runtime, load every core (`busy`), send `sig`; (exit code, seconds to exit, the run's pids)."""
    before = wait_for_runtime(proc, run_id, tmp, time.monotonic() + START_S)
    assert len(before) >= 4, [cmdline(p)[:80] for p in before]
    busy()
    t0 = time.monotonic()
    proc.send_signal(sig)
    code = wait_exit(proc, t0 + EXIT_S)
    return code, time.monotonic() - t0, before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_signal_stops_every_process(launch, cpu_hog, tmp_path, sig):
    """Ctrl-C: SIGINT to a launcher that inherited SIGINT ignored (how it once sat through Ctrl-C with the run
    going on; tests/test_procs.py covers both dispositions in miniature)."""
    proc, run_id = launch(sigint_ignored=sig == signal.SIGINT)
    code, took, before = _stop_run(proc, sig, run_id, tmp_path, cpu_hog)
    assert code == 128 + sig, f"exit {code} {took:.1f} s after the signal:\n{_log(tmp_path)}"
    assert_all_gone(run_id, before)
    assert_resumable(tmp_path / "run", _log(tmp_path))
    print(f"\nlauncher exited {took:.1f} s after {signal.Signals(sig).name}")


def test_timeout_stops_every_process(launch, cpu_hog, tmp_path):
    t0 = time.monotonic()
    # one silo at a time: the run waits out the limit on one core, not on every core (the hogs load them at the end)
    proc, run_id = launch("--timeout", str(RUN_TIMEOUT_S), "--silos-at-once", "1")
    before = wait_for_runtime(proc, run_id, tmp_path, t0 + RUN_TIMEOUT_S)
    time.sleep(max(0.0, t0 + RUN_TIMEOUT_S - HOG_LEAD_S - time.monotonic()))
    cpu_hog()  # every core busy from a little before the timeout to the end
    code = wait_exit(proc, t0 + RUN_TIMEOUT_S + EXIT_S)
    took = time.monotonic() - t0
    out = _log(tmp_path)
    assert code == 1 and f"did not finish within --timeout {RUN_TIMEOUT_S}" in out, f"exit {code}:\n{out}"
    assert_all_gone(run_id, before)
    assert_resumable(tmp_path / "run", out)
    print(f"\nlauncher exited {took:.1f} s after it started (--timeout {RUN_TIMEOUT_S}, counted from a little later)")


def test_pipeline_benchmark_sigterm_stops_every_process(launch, cpu_hog, tmp_path):
    """The benchmark driver runs the same launcher code; SIGTERM to it stops its run's processes too."""
    proc, run_id = launch(benchmark=True)
    code, took, before = _stop_run(proc, signal.SIGTERM, run_id, tmp_path, cpu_hog)
    assert code == 128 + signal.SIGTERM, f"exit {code} {took:.1f} s after SIGTERM:\n{_log(tmp_path)}"
    assert_all_gone(run_id, before)
    print(f"\nbenchmark driver exited {took:.1f} s after SIGTERM")
