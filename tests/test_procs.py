"""deployment/procs.py with plain Python processes (no Flower, about a second each): a run's processes are found by
their marker after leaving their group and parent, SIGTERM escalates to SIGKILL within a bounded time, a launcher
leaves its wait on Ctrl-C even when it inherited SIGINT ignored (as a background job of a non-interactive shell
does: the cause of the launcher that sat through Ctrl-C), and a SIGKILLed launcher takes its children with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deployment.procs import MARKER, ProcessSet, alive, marked_pids, new_run_id

ROOT = Path(__file__).resolve().parents[1]

# ignores SIGTERM, starts a grandchild in a session of its own that ignores SIGTERM too, prints its pid, then exits
# (orphan=1) or sleeps
PARENT = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
g = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
print(g.pid, flush=True)
if sys.argv[1] == "0":
    time.sleep(60)
"""


def _pid_from(log: Path, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text().strip()
        if text:
            return int(text.split()[0])
        time.sleep(0.05)
    raise AssertionError(f"no pid in {log}")


@pytest.mark.parametrize("orphan", [False, True], ids=["in-tree", "orphaned"])
def test_stop_escalates_to_sigkill_and_finds_marked_processes(tmp_path, orphan):
    """Both processes ignore SIGTERM; the grandchild left the group (own session) and, orphaned, its parent too:
    stop() still finds it by the marker and SIGKILLs everything soon after the grace."""
    ps = ProcessSet()
    parent = ps.spawn([sys.executable, "-c", PARENT, str(int(orphan))], env=dict(os.environ), log=tmp_path / "log")
    grandchild = _pid_from(tmp_path / "log")
    assert grandchild in marked_pids(ps.run_id)
    if orphan:
        assert parent.wait(10) == 0 and alive(grandchild)
    t0 = time.monotonic()
    assert ps.stop(grace=0.5) == []
    took = time.monotonic() - t0
    assert not alive(grandchild) and parent.poll() is not None
    assert took < 0.5 + 3.0, f"stop took {took:.1f} s"
    assert marked_pids(ps.run_id) == []


def test_run_ids_nest_below_the_inherited_marker(monkeypatch):
    monkeypatch.setenv(MARKER, "outer")
    assert new_run_id("x-").startswith("outer/x-") and ProcessSet().run_id.startswith("outer/")
    assert ProcessSet("explicit").run_id == "explicit"
    monkeypatch.delenv(MARKER)
    assert "/" not in new_run_id()


# a launcher in miniature: the signal handling and the wait of deployment.simulate, a child that runs "forever"
LAUNCHER = """
import sys, time
from deployment.procs import ProcessSet, exit_on_signals, wait
exit_on_signals()
ps = ProcessSet()
child = ps.spawn([sys.executable, "-c", "import time; time.sleep(60)"], env={}, log=sys.argv[1])
print("ready", flush=True)
try:
    wait(child)
except KeyboardInterrupt:
    sys.exit(130 if ps.stop() == [] else 1)
finally:
    ps.stop()
"""


@pytest.mark.parametrize("inherited", [signal.SIG_DFL, signal.SIG_IGN], ids=["SIGINT-default", "SIGINT-ignored"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
def test_launcher_leaves_its_wait_on_a_signal(tmp_path, inherited, sig):
    """Exit 128 + signal within a second or two, its child gone, whatever SIGINT disposition it inherited."""
    run_id = new_run_id("mini-launcher-")
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path / "child.log")], cwd=ROOT,
                            env={**os.environ, MARKER: run_id}, stdout=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, inherited))
    try:
        assert proc.stdout.readline().strip() == "ready"
        child = [p for p in marked_pids(run_id) if p != proc.pid]
        assert len(child) == 1
        t0 = time.monotonic()
        proc.send_signal(sig)
        code = proc.wait(timeout=10)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ProcessSet(run_id).stop(grace=0)
    assert code == 128 + sig and took < 5, (code, took)
    assert not alive(child[0])


def test_children_die_with_a_killed_launcher(tmp_path):
    """A launcher SIGKILLed (no teardown can run) takes the processes it spawned with it (PR_SET_PDEATHSIG)."""
    run_id = new_run_id("pdeathsig-")
    code = ("import sys, time; from deployment.procs import ProcessSet; ps = ProcessSet(); "
            "ps.spawn([sys.executable, '-c', 'import time; time.sleep(60)'], env={}, log=sys.argv[1]); "
            "print('ready', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "child.log")], cwd=ROOT,
                            env={**os.environ, MARKER: run_id}, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        child = [p for p in marked_pids(run_id) if p != proc.pid]
        assert len(child) == 1
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 5
        while alive(child[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child[0])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ProcessSet(run_id).stop(grace=0)
