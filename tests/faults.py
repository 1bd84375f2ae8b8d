"""Fault injection for the loopback stack (deployment.local.Stack), used only by tests: kill a SuperNode as a crash
would, start it again, freeze every SuperNode for a while, ask the SuperLink for its health."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator

from deployment.local import Stack, StackError, tail
from deployment.procs import group_members
from deployment.procs import wait as wait_exit


def kill_supernode(stack: Stack, domain: str, sig: int = signal.SIGKILL) -> None:
    """Signal a SuperNode's whole process group (SuperNode, its SuperExec, ClientApps) at once, as a crash (SIGKILL)
    or an operator (SIGTERM) would; returns once the group is gone (at most ~10 s)."""
    proc = stack.procs[f"supernode-{domain}"]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.popen.pid, sig)
    wait_exit(proc.popen, 10)
    deadline = time.monotonic() + 10
    while group_members(proc.popen.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    stack.say(f"killed {proc.name} (signal {sig})")


@contextlib.contextmanager
def frozen_supernodes(stack: Stack) -> Iterator[None]:
    """SIGSTOP every SuperNode's process group (SuperNode, SuperExec, ClientApps) for the `with` block, SIGCONT
    after it: the silos stay connected but answer nothing, so a ServerApp waiting for their replies stays exactly
    where it is (keep the block well under a heartbeat interval, 30 s, or the SuperLink counts them offline)."""
    groups = [p.popen.pid for name, p in stack.procs.items() if name.startswith("supernode-") and p.alive]
    stopped = []
    try:
        for g in groups:
            os.killpg(g, signal.SIGSTOP)
            stopped.append(g)
        stack.say(f"froze {len(stopped)} SuperNode(s)")
        yield
    finally:
        for g in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(g, signal.SIGCONT)
        stack.say(f"thawed {len(stopped)} SuperNode(s)")


def restart_supernode(stack: Stack, domain: str, timeout: float = 150.0, retry_s: float = 5.0) -> float:
    """Start a stopped SuperNode again and wait until it is connected; returns the seconds it took.

    After a crash (SIGKILL) the SuperLink keeps the node "online" until two heartbeat intervals pass (2 x 30 s in
    flwr 1.41) and refuses to activate the same key meanwhile: the SuperNode then exits with Flower exit code 305.
    This retries until the SuperLink accepts it. After SIGTERM the SuperNode deactivated itself and the first
    attempt succeeds."""
    name = f"supernode-{domain}"
    t0 = time.monotonic()
    while True:
        proc = stack.start_supernode(domain)
        while proc.alive and "SuperNode ID:" not in proc.output() and time.monotonic() - t0 < timeout:
            time.sleep(0.3)
        if "SuperNode ID:" in proc.output():
            stack.say(f"{name} back after {time.monotonic() - t0:.1f} s")
            return time.monotonic() - t0
        if proc.alive or time.monotonic() - t0 > timeout:
            stack.processes.terminate(proc.popen)
            raise StackError(f"{name} did not reconnect within {timeout:.0f} s:\n{tail(proc.log)}")
        time.sleep(retry_s)


def superlink_healthy(stack: Stack) -> bool:
    """The SuperLink answers /health over TLS verified against the CA."""
    proc = stack.procs.get("superlink")
    return bool(proc) and stack._wait_healthy(proc, 2.0)
