"""Processes a launcher starts, and how they are all stopped on every way out. The only module that knows the run
marker and reads /proc.

Every child is started in its own session (so a terminal's Ctrl-C reaches only the launcher, which then stops
the rest) with a marker in its environment, MERGEREC_RUN_ID=<run id>. Flower's simulation runtime
(`flwr-simulation`, started by the SuperLink's SuperExec in a session of its own) and Ray's processes (raylet,
GCS, workers) inherit that environment, so `ProcessSet.stop()` finds them by the marker even when they left the
process groups and their parents. Run ids nest: a ProcessSet made in a process that carries a marker gets
`<inherited>/<new>`, and `marked_pids(x)` finds `x` and everything below it, so a test (or a test session) that
starts a launcher under its own id finds every process of the launcher's run, while the launcher stops only its
own.

Stopping is bounded: SIGTERM to every process group and every marked or descendant process, at most GRACE_S
seconds for them to go, then SIGKILL sweeps (re-scanning: Ray may start a worker meanwhile) for at most KILL_S
seconds. No step waits without a deadline.
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
from collections.abc import Iterable
from pathlib import Path

MARKER = "MERGEREC_RUN_ID"
#: seconds between SIGTERM and SIGKILL when a run is stopped
GRACE_S = 3.0
#: seconds of SIGKILL sweeps after the grace (a process stuck in the kernel cannot die sooner; it is reported)
KILL_S = 5.0
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


def new_run_id(label: str = "") -> str:
    """A fresh run id, below the marker this process inherited if it has one (`<inherited>/<label><hex>`)."""
    mine = f"{label}{uuid.uuid4().hex[:12]}"
    inherited = os.environ.get(MARKER)
    return f"{inherited}/{mine}" if inherited else mine


def _resolve_prctl():
    """libc's prctl, looked up once here: a preexec_fn runs between fork and exec, where importing or loading a
    library could deadlock on a lock another thread of the parent held at fork time."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _resolve_prctl() if sys.platform == "linux" else None


def die_with_parent() -> None:
    """preexec_fn: the kernel SIGKILLs the child if the launcher itself dies (PR_SET_PDEATHSIG)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)


# ------------------------------------------------------------------------------------------------------ /proc


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) of a process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
        return None
    return fields[0].decode(), int(fields[1]), int(fields[2])


def _table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, pgid) of every live (not zombie) process."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None and st[0] not in ("Z", "X"):
                out[int(entry)] = (st[1], st[2])
    return out


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def cmdline(pid: int) -> str:
    """The process's command line ('' if it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def rss_kb(pid: int) -> int:
    """Resident set size of a process in kB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _carries(pid: int, run_id: str) -> bool:
    """The process's environment has MARKER=run_id or MARKER=run_id/..."""
    exact, below = f"{MARKER}={run_id}".encode(), f"{MARKER}={run_id}/".encode()
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            entries = f.read().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    return any(e == exact or e.startswith(below) for e in entries)


def _protected(table: dict[int, tuple[int, int]]) -> set[int]:
    """This process and its ancestors: never stopped, even when they carry the marker."""
    out, pid = set(), os.getpid()
    while pid > 1 and pid not in out:
        out.add(pid)
        pid = table.get(pid, (0, 0))[0]
    return out | {1}


def _descendants(roots: Iterable[int], table: dict[int, tuple[int, int]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: set[int] = set()
    todo = list(roots)
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def marked_pids(run_id: str) -> list[int]:
    """Live processes whose environment carries MARKER=run_id (or a run id below it), this process and its
    ancestors excepted."""
    table = _table()
    return sorted(p for p in set(table) - _protected(table) if _carries(p, run_id))


def descendants(roots: list[int]) -> list[int]:
    """Live descendants of `roots` (a /proc walk over parent links)."""
    return sorted(_descendants(roots, _table()))


def group_members(pgid: int) -> list[int]:
    """Live processes of a process group."""
    return sorted(pid for pid, (_, g) in _table().items() if g == pgid)


def _send(pids: Iterable[int], groups: Iterable[int], sig: int) -> None:
    for g in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(g, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


# ------------------------------------------------------------------------------------------------------ runs


def wait(proc: subprocess.Popen, timeout: float | None = None) -> int | None:
    """proc's exit code, or None after `timeout` s (None: no limit). Polls rather than blocking in waitpid(), so a
    signal handled on another thread of this process (the kernel may pick any) still raises here at once."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        step = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
        if step <= 0:
            return proc.poll()
        with contextlib.suppress(subprocess.TimeoutExpired):
            return proc.wait(timeout=step)  # Popen.wait with a timeout polls (sleeps of at most 50 ms)


class ProcessSet:
    """The processes of one launcher run: spawn() them, stop() them all (bounded, idempotent)."""

    def __init__(self, run_id: str | None = None):
        """run_id: the marker's value; default: a new one below the marker this process inherited (a test or a
        wrapper that wants to find the run's processes itself runs the launcher under its own MERGEREC_RUN_ID)."""
        self.run_id = run_id or new_run_id()
        self.procs: list[subprocess.Popen] = []

    def env(self, base: dict) -> dict:
        """`base` with this run's marker."""
        return {**base, MARKER: self.run_id}

    def spawn(self, cmd: list[str], *, env: dict, log: Path, cwd: Path | None = None) -> subprocess.Popen:
        """Start `cmd` in a session of its own, marked, stdout and stderr appended to `log`."""
        with open(log, "ab") as out:  # a resumed run or a restarted process appends to the earlier log
            proc = subprocess.Popen(cmd, env=self.env(env), cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
        self.procs.append(proc)
        return proc

    def _groups(self) -> set[int]:
        """Process groups of spawned processes not yet reaped (a reaped leader's pid may be reused)."""
        return {p.pid for p in self.procs if p.poll() is None}

    def leftovers(self) -> list[int]:
        """Every live process of this run: the marked ones, the spawned ones and their groups, their descendants."""
        table = _table()
        groups = self._groups()
        found = {pid for pid in table if _carries(pid, self.run_id)}
        found |= {pid for pid in groups if pid in table}
        found |= {pid for pid, (_, g) in table.items() if g in groups}
        found |= _descendants(found, table)
        return sorted(found - _protected(table))

    def _reap(self) -> None:
        for p in self.procs:
            p.poll()

    def terminate(self, proc: subprocess.Popen, grace: float = GRACE_S) -> int | None:
        """Stop one spawned process and its process group: SIGTERM, SIGKILL after `grace` s; returns its exit code
        (None if it could not be reaped within grace + KILL_S)."""
        group = proc.pid
        deadline = time.monotonic() + grace
        sig = signal.SIGTERM
        while True:
            members = group_members(group)
            if proc.poll() is not None and not members:
                return proc.returncode
            if time.monotonic() >= deadline:
                if sig == signal.SIGKILL:
                    return proc.poll()
                sig, deadline = signal.SIGKILL, time.monotonic() + KILL_S
            if proc.returncode is None or members:  # the group id is still held: it cannot be another's
                _send([], [group], sig)
            time.sleep(0.1)

    def stop(self, grace: float = GRACE_S) -> list[int]:
        """SIGTERM everything of this run, SIGKILL what is left after `grace` s; returns the pids still alive after
        KILL_S s of SIGKILL sweeps (none unless a process is stuck in the kernel). A second Ctrl-C or SIGTERM while
        stopping does not interrupt the teardown."""
        with _signals_ignored():
            left = self.leftovers()
            _send(left, self._groups(), signal.SIGTERM)
            deadline = time.monotonic() + grace
            while left and time.monotonic() < deadline:
                time.sleep(0.1)
                self._reap()
                left = self.leftovers()
            deadline = time.monotonic() + KILL_S
            while left and time.monotonic() < deadline:
                _send(left, self._groups(), signal.SIGKILL)
                time.sleep(0.1)
                self._reap()
                left = self.leftovers()
            self._reap()
            return left


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


# ------------------------------------------------------------------------------------------------------ signals


class Terminated(SystemExit):
    """SIGTERM/SIGHUP turned into an exception (exit status 128 + signal), so that `finally` blocks stop every
    child."""


def exit_on_signals() -> dict:
    """In the main thread: SIGINT raises KeyboardInterrupt, SIGTERM and SIGHUP raise Terminated; returns the
    previous handlers (for restore_signals).

    SIGINT's handler is installed whatever this process inherited: a process started in the background of a
    non-interactive shell (`make test &`, a CI runner's script, nohup) inherits SIGINT *ignored*, and Python then
    never installs its KeyboardInterrupt handler, so a launcher would sit in its wait through every Ctrl-C. An
    inherited SIGHUP that is ignored (nohup) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def _raise(signum, _frame):
        raise Terminated(128 + signum)

    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
                signal.SIGTERM: signal.signal(signal.SIGTERM, _raise)}
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, _raise)
    return previous


def restore_signals(previous: dict) -> None:
    for s, h in previous.items():
        signal.signal(s, h)
