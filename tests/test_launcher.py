"""`python -m deployment.simulate` stops every process of its run on SIGTERM and on its --timeout: the SuperLink,
`flwr run`, Flower's simulation runtime (`flwr-simulation`) and Ray's processes. The test marks the launcher's
environment (deployment.procs.MARKER), which every process of the run inherits, and also snapshots the launcher's
process tree before stopping it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from common.data.demo import make_demo
from deployment.local import format_run_config
from deployment.procs import MARKER, descendants, marked_pids

from helpers import make_tiny_encoder

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ["garden", "kitchen"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("launcher")
    enc = make_tiny_encoder(root / "enc")
    make_demo(root / "data", n_domains=2, n_items=80, n_users=100, seed=3)
    return root, enc


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def start_launcher(root: Path, enc: Path, tmp: Path, *extra: str, benchmark: bool = False
                   ) -> tuple[subprocess.Popen, str]:
    """A run that would fine-tune for a long time (many epochs, no early stop); `benchmark`: the same run under
    the pipeline benchmark's driver (benchmarks/pipeline.py) instead of the launcher."""
    places = {} if benchmark else {"cache-dir": str(root / "cache"), "silo-state-root": str(tmp / "state")}
    rc = format_run_config({"encoder": str(enc), **places, "epochs": 5000, "patience": 5000,
                            "coef-steps": 5, "teacher-top-k": 8, "baselines": "task_arithmetic",
                            "granularities": "task"})  # the benchmark driver sets both places itself
    run_id = "test-" + uuid.uuid4().hex[:12]
    env = {**os.environ, MARKER: run_id, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "deployment.simulate", "--data-root", str(root / "data"), "--domains",
           ",".join(DOMAINS), "--run-dir", str(tmp / "run"), "--run-config", rc, *extra]
    if benchmark:
        cmd = [sys.executable, "-m", "benchmarks.pipeline", "--data-root", str(root / "data"), "--domains",
               ",".join(DOMAINS), "--work", str(tmp / "work"), "--runs", "warm", "--cache-dir", str(root / "cache"),
               "--run-config", rc, "--out", str(tmp / "pipeline.json"), *extra]
    log = open(tmp / "launcher.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, run_id


def wait_for_runtime(proc: subprocess.Popen, run_id: str, timeout: float = 240.0) -> set[int]:
    """Wait until Flower's simulation runtime and a Ray worker of this run are up; returns the run's pids."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, f"launcher exited early with {proc.returncode}"
        pids = set(marked_pids(run_id)) | set(descendants([proc.pid]))
        cmds = [_cmdline(p) for p in pids]
        if any("flwr-simulation" in c for c in cmds) and any("ray" in c.lower() for c in cmds):
            time.sleep(3)  # let the workers start their actors
            return set(marked_pids(run_id)) | set(descendants([proc.pid]))
        time.sleep(1)
    raise AssertionError("the simulation runtime and Ray did not start")


def assert_all_gone(run_id: str, before: set[int], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    left: list = []
    while time.monotonic() < deadline:
        left = sorted(set(marked_pids(run_id)) | {p for p in before if Path(f"/proc/{p}").exists()
                                                    and _cmdline(p) and not _zombie(p)})
        if not left:
            return
        time.sleep(0.5)
    for p in left:  # do not leave them to the next test
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    raise AssertionError(f"processes of the run left behind: {[(p, _cmdline(p)[:80]) for p in left]}")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_signal_stops_every_process(world, tmp_path, sig):
    root, enc = world
    proc, run_id = start_launcher(root, enc, tmp_path)
    try:
        before = wait_for_runtime(proc, run_id)
        assert len(before) >= 4, [_cmdline(p)[:80] for p in before]
        proc.send_signal(sig)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 128 + sig, (tmp_path / "launcher.log").read_text()[-2000:]
    assert_all_gone(run_id, before)


def test_timeout_stops_every_process(world, tmp_path):
    root, enc = world
    proc, run_id = start_launcher(root, enc, tmp_path, "--timeout", "120")
    try:
        before = wait_for_runtime(proc, run_id)
        code = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = (tmp_path / "launcher.log").read_text()
    assert code == 1 and "did not finish within --timeout 120" in out, out[-2000:]
    assert_all_gone(run_id, before)


def test_pipeline_benchmark_sigterm_stops_every_process(world, tmp_path):
    """The benchmark driver runs the same launcher code; SIGTERM to it stops its run's processes too."""
    root, enc = world
    proc, run_id = start_launcher(root, enc, tmp_path, benchmark=True)
    try:
        before = wait_for_runtime(proc, run_id)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 128 + signal.SIGTERM, (tmp_path / "launcher.log").read_text()[-2000:]
    assert_all_gone(run_id, before)
