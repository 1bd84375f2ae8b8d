"""Processes a launcher starts, and how they are all stopped on every way out.

Every child is started in its own session (so a terminal's Ctrl-C reaches only the launcher, which then stops
the rest in order) with a marker in its environment. Flower's simulation runtime (`flwr-simulation`, started by
the SuperLink's SuperExec in a session of its own) and Ray's processes (raylet, GCS, workers) inherit that
environment, so `stop()` finds them by the marker even when they left the process groups and their parents:
first SIGTERM to every group and every marked or descendant process, then SIGKILL to whatever is still alive.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

MARKER = "MERGEREC_RUN_ID"
#: every Flower process the project starts: no telemetry, no update check, no pip install at run time, no
#: model download, unbuffered logs
FLWR_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
            # numpy's OpenBLAS thread pool hung the ServerApp inside np.dot in flwr-simulation on a busy machine;
            # torch keeps its own threads, numpy does no heavy work in these processes
            "OPENBLAS_NUM_THREADS": "1"}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (loopback by default)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def flwr_env(home: str | Path, **extra: str) -> dict[str, str]:
    """This process's environment for a Flower process or CLI call: FLWR_ENV, FLWR_HOME = `home`, this
    interpreter's bin folder first on PATH (Flower starts its helpers by name), then `extra`."""
    env = dict(os.environ)
    env.update(FLWR_ENV)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_HOME"] = str(home)
    env.update(extra)
    return env


def die_with_parent() -> None:
    """preexec_fn: the kernel SIGKILLs the child if the launcher itself is SIGKILLed."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) of a live process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return fields[0].decode(), int(fields[1]), int(fields[2])


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def marked_pids(run_id: str) -> list[int]:
    """Live processes whose environment carries MARKER=run_id."""
    needle = f"{MARKER}={run_id}".encode()
    found = []
    for pid in _pids():
        if pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if _alive(pid):
            found.append(pid)
    return found


def descendants(roots: list[int]) -> list[int]:
    """Live descendants of `roots` (a /proc walk over parent links)."""
    children: dict[int, list[int]] = {}
    for pid in _pids():
        st = _stat(pid)
        if st is not None and st[0] not in ("Z", "X"):
            children.setdefault(st[1], []).append(pid)
    out, todo = [], list(roots)
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.append(c)
                todo.append(c)
    return out


class ProcessSet:
    """The processes of one launcher run: spawn() them, stop() them all (idempotent)."""

    def __init__(self, run_id: str | None = None):
        """run_id: the marker's value; default: the one this process inherited (a test or a wrapper that wants
        to find the run's processes itself sets MERGEREC_RUN_ID), else a new one."""
        self.run_id = run_id or os.environ.get(MARKER) or uuid.uuid4().hex[:16]
        self.procs: list[subprocess.Popen] = []

    def env(self, base: dict) -> dict:
        return {**base, MARKER: self.run_id}

    def spawn(self, cmd: list[str], *, env: dict, log: Path, cwd: Path | None = None) -> subprocess.Popen:
        with open(log, "a") as out:  # a resumed run appends to the first run's log
            proc = subprocess.Popen(cmd, env=self.env(env), cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
        self.procs.append(proc)
        return proc

    def leftovers(self) -> list[int]:
        """Every live process of this run: marked ones, the started ones, their descendants and groups."""
        roots = [p.pid for p in self.procs if p.poll() is None]
        found = set(marked_pids(self.run_id)) | set(roots)
        found |= set(descendants(sorted(found | {p.pid for p in self.procs})))
        groups = {p.pid for p in self.procs}
        for pid in _pids():
            st = _stat(pid)
            if st is not None and st[2] in groups and st[0] not in ("Z", "X"):
                found.add(pid)
        found.discard(os.getpid())
        return sorted(pid for pid in found if _alive(pid))

    def _signal_all(self, sig: int) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, sig)
        for pid in self.leftovers():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def stop(self, grace: float = 10.0) -> list[int]:
        """SIGTERM everything, SIGKILL what is left after `grace` s; returns pids that survived (none). A second
        Ctrl-C or SIGTERM while stopping does not interrupt the teardown."""
        with _signals_ignored():
            return self._stop(grace)

    def _stop(self, grace: float) -> list[int]:
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.leftovers() and time.monotonic() < deadline:
            for p in self.procs:
                p.poll()  # reap
            time.sleep(0.2)
        for _ in range(3):
            if not self.leftovers():
                break
            self._signal_all(signal.SIGKILL)
            time.sleep(0.3)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        return self.leftovers()


@contextlib.contextmanager
def _signals_ignored():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class Terminated(SystemExit):
    """SIGTERM/SIGHUP turned into an exception, so that `finally` blocks stop every child."""


def exit_on_signals() -> dict:
    """Install SIGTERM/SIGHUP handlers raising Terminated (main thread only); returns the previous handlers."""
    def _raise(signum, _frame):
        raise Terminated(128 + signum)

    return {s: signal.signal(s, _raise) for s in (signal.SIGTERM, signal.SIGHUP)}


def restore_signals(previous: dict) -> None:
    for s, h in previous.items():
        signal.signal(s, h)
