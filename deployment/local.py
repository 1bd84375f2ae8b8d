"""A real Flower deployment on loopback: one SuperLink (TLS + SuperNode authentication), one SuperNode per domain.

Command line (from the repository root):

    python -m deployment.local --smoke                       # the tiny check app in deployment/smoke
    python -m deployment.local --app . --data-root DIR [--domains garden,kitchen,outdoor]
                               [--run-config 'epochs=2 max-users=200'] [--timeout S (0: none)] [--run-dir DIR]

What it does: makes certificates and node keys (deployment/certs.py), starts `flower-superlink` with
--ssl-* and --enable-supernode-auth on a free 127.0.0.1 port, writes a `flwr` connection into a private
FLWR_HOME, registers every domain's public key with `flwr supernode register`, starts one `flower-supernode`
per domain (--root-certificates, --auth-supernode-private-key, its own runtime port, --node-config
'domain="X" data-path="Y"'), submits `flwr run APP <connection> --stream`, waits for the run's final status
(`flwr ls --run-id`), and always stops every process it started (deployment/procs.py: process groups and
every process carrying the stack's run marker, SIGTERM then SIGKILL after a short grace), also on Ctrl-C,
SIGTERM/SIGHUP and at interpreter exit. Each process logs to RUN_DIR/logs/<name>.log; on failure the tails are
printed. Exit status 0 only if the run completed, 130 on Ctrl-C, 143 on SIGTERM.

As a library (the end-to-end tests; their fault injection lives in tests/faults.py):

    from deployment.local import start_stack
    with start_stack(["garden", "kitchen", "outdoor"], data_root) as stack:
        res = stack.run_app(".", run_config={"epochs": 1}, timeout=600, wait=False)
        ...                                      # e.g. kill a SuperNode (tests/faults.py)
        res = stack.wait_run(res, timeout=600)
        assert res.ok, stack.log_tails()
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import math
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from deployment import certs
from deployment.procs import ProcessSet, Terminated, exit_on_signals, flwr_env, free_port, restore_signals
from deployment.procs import wait as wait_exit

REPO = Path(__file__).resolve().parents[1]
SMOKE_APP = REPO / "deployment" / "smoke"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class StackError(RuntimeError):
    """The stack could not be started (the message carries the relevant log tails)."""


def _bin(name: str) -> str:
    """A Flower executable from this interpreter's environment (the venv), else from PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise StackError(f"{name} not found next to {sys.executable} nor on PATH")
    return found


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string


def format_run_config(run_config: str | Mapping | None) -> str | None:
    """`flwr run --run-config` text from a dict (strings quoted, numbers and booleans bare) or pass a string on."""
    if run_config is None or isinstance(run_config, str):
        return run_config or None
    return " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items()) or None


def node_config(domain: str, data_path: Path, extra: Mapping | None = None) -> str:
    items = {"domain": domain, "data-path": str(data_path), **(extra or {})}
    return " ".join(f"{k}={_toml_value(v)}" for k, v in items.items())


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = _ANSI.sub("", Path(path).read_text(errors="replace"))
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    cmd: list[str]
    offset: int = 0  # the log is appended to across restarts: this process's output starts here

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        """What this process (not an earlier one of the same name) wrote to its log, without colours."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self.offset)
                return _ANSI.sub("", f.read().decode(errors="replace"))
        except FileNotFoundError:
            return ""


@dataclass
class RunResult:
    run_id: int | None
    status: str                  # e.g. finished:completed, finished:failed, timeout, not-started
    details: str
    elapsed_s: float
    log: Path
    _stream: Proc | None = field(default=None, repr=False)
    _t0: float = field(default=0.0, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


class Stack:
    """A running loopback deployment. Create it with `start_stack` (a context manager)."""

    def __init__(self, run_dir: Path, secrets: Path, domains: list[str], data_paths: dict[str, Path],
                 connection: str = "mergerec-local", threads_per_node: int | None = 1,
                 node_config_extra: Mapping[str, Mapping] | None = None, verbose: bool = True):
        self.processes = ProcessSet()  # a run id below the inherited one, if any (deployment/procs.py)
        self.id = self.processes.run_id
        self.run_dir = Path(run_dir).resolve()
        self.secrets = Path(secrets).resolve()
        self.domains = list(domains)
        self.data_paths = {d: Path(p).resolve() for d, p in data_paths.items()}
        self.connection = connection
        self.threads_per_node = threads_per_node
        self.node_config_extra = dict(node_config_extra or {})
        self.verbose = verbose
        self.logs = self.run_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.cli_home = self.run_dir / "cli-home"
        self.procs: dict[str, Proc] = {}
        self.node_ids: dict[str, int] = {}
        self.port: int | None = None
        self.timings: dict[str, float] = {}
        self._stopped = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ basics
    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.secrets / "ca.crt"

    def env(self, home: Path | None = None, **extra: str) -> dict[str, str]:
        """Environment for a Flower process or CLI call of this stack (FLWR_HOME = `home` or the CLI home), with
        the stack's run marker."""
        return self.processes.env(flwr_env(home or self.cli_home, **extra))

    def say(self, msg: str) -> None:
        if self.verbose:
            print(f"[local] {msg}", file=sys.stderr, flush=True)

    def _spawn(self, name: str, cmd: list[str], cwd: Path, env: dict[str, str]) -> Proc:
        log = self.logs / f"{name}.log"
        cwd.mkdir(parents=True, exist_ok=True)
        offset = log.stat().st_size if log.exists() else 0
        popen = self.processes.spawn(cmd, env=env, log=log, cwd=cwd)
        proc = Proc(name, popen, log, cmd, offset)
        self.procs[name] = proc
        return proc

    def flwr(self, *args: str, timeout: float = 120.0, check: bool = False) -> subprocess.CompletedProcess:
        """Run the `flwr` CLI against this stack's FLWR_HOME (its connection is the default one)."""
        r = subprocess.run([_bin("flwr"), *args], env=self.env(), capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL, start_new_session=True)
        if check and r.returncode != 0:
            raise StackError(f"flwr {' '.join(args)} failed ({r.returncode}):\n{_ANSI.sub('', r.stdout + r.stderr)}")
        return r

    # ------------------------------------------------------------------------------------------ superlink
    def write_cli_config(self) -> Path:
        self.cli_home.mkdir(parents=True, exist_ok=True)
        cfg = self.cli_home / "config.toml"
        cfg.write_text(
            "[superlink]\n"
            f'default = "{self.connection}"\n\n'
            f"[superlink.{self.connection}]\n"
            f'address = "{self.address}"\n'
            f'root-certificates = "{self.ca}"\n'
        )
        return cfg

    def start_superlink(self, timeout: float = 60.0, attempts: int = 3) -> None:
        t0 = time.monotonic()
        for attempt in range(attempts):
            self.port = free_port()
            home = self.run_dir / "superlink"
            cmd = [_bin("flower-superlink"), "--ssl-ca-certfile", str(self.ca),
                   "--ssl-certfile", str(self.secrets / "server.pem"), "--ssl-keyfile", str(self.secrets / "server.key"),
                   "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(self.port),
                   "--disable-runtime-dependency-installation"]
            proc = self._spawn("superlink", cmd, home, self.env(home / "home"))
            if self._wait_healthy(proc, timeout):
                break
            if proc.alive or "address already in use" not in tail(proc.log, 200).lower() or attempt == attempts - 1:
                raise StackError(f"SuperLink did not become healthy on {self.address}:\n{tail(proc.log)}")
            self.say(f"port {self.port} was taken, retrying")
        self.write_cli_config()
        self.timings["superlink_start_s"] = time.monotonic() - t0
        self.say(f"SuperLink up on https://{self.address} ({self.timings['superlink_start_s']:.1f} s)")

    def _wait_healthy(self, proc: Proc, timeout: float) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive:
                return False
            try:
                with urllib.request.urlopen(f"https://{self.address}/health", context=ctx, timeout=2) as r:
                    if r.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(0.3)
        return False

    # ------------------------------------------------------------------------------------------ supernodes
    def register(self, domains: list[str] | None = None, timeout: float = 120.0) -> dict[str, int]:
        """`flwr supernode register <domain>.pub` for every domain (in parallel); returns the node ids."""
        t0 = time.monotonic()
        domains = list(domains or self.domains)
        jobs = {}
        for d in domains:
            cmd = [_bin("flwr"), "supernode", "register", str(self.secrets / f"{d}.pub"), self.connection,
                   "--name", d, "--format", "json"]
            jobs[d] = subprocess.Popen(cmd, env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True, stdin=subprocess.DEVNULL, start_new_session=True)
        errors = []
        for d, p in jobs.items():
            try:
                out, _ = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.processes.terminate(p, grace=0)
                out = f"no answer within {timeout:.0f} s"
            m = re.search(r'"node-id":\s*(\d+)', out)
            if p.returncode == 0 and m:
                self.node_ids[d] = int(m.group(1))
            elif "already in use" in out:
                self.say(f"{d}: key already registered")
            else:
                errors.append(f"{d} (exit {p.returncode}): {_ANSI.sub('', out).strip()}")
        if errors:
            raise StackError("registering node keys failed:\n" + "\n".join(errors) + f"\nSuperLink:\n{tail(self.procs['superlink'].log)}")
        self.timings["register_s"] = time.monotonic() - t0
        self.say(f"registered {', '.join(f'{d}={self.node_ids.get(d)}' for d in domains)}")
        return {d: self.node_ids[d] for d in domains if d in self.node_ids}

    def start_supernode(self, domain: str, *, key: Path | None = None, data_path: Path | None = None,
                        name: str | None = None) -> Proc:
        """Start (or restart) the SuperNode of `domain`; `key`, `data_path`, `name`: another node key (the
        smoke run's unregistered node), data folder, process name."""
        name = name or f"supernode-{domain}"
        old = self.procs.get(name)
        if old and old.alive:
            raise StackError(f"{name} is already running (pid {old.popen.pid})")
        home = self.run_dir / "nodes" / name
        data = Path(data_path) if data_path else self.data_paths.get(domain, home / "data")
        extra_env = {}
        if self.threads_per_node:
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                extra_env[var] = os.environ.get(var, str(self.threads_per_node))
        cmd = [_bin("flower-supernode"), "--superlink", self.address, "--root-certificates", str(self.ca),
               "--auth-supernode-private-key", str(key or self.secrets / f"{domain}.key"),
               "--port", str(free_port()),
               "--node-config", node_config(domain, data, self.node_config_extra.get(domain))]
        return self._spawn(name, cmd, home, self.env(home / "home", **extra_env))

    def wait_connected(self, domains: list[str] | None = None, timeout: float = 90.0) -> None:
        """Wait until each SuperNode has logged its node id (it activated with the SuperLink)."""
        t0 = time.monotonic()
        pending = set(domains or self.domains)
        while pending and time.monotonic() - t0 < timeout:
            for d in sorted(pending):
                proc = self.procs[f"supernode-{d}"]
                if "SuperNode ID:" in proc.output():
                    pending.discard(d)
                elif not proc.alive:
                    raise StackError(f"SuperNode {d} exited with {proc.popen.returncode}:\n{tail(proc.log)}")
            time.sleep(0.3)
        if pending:
            raise StackError(f"SuperNode(s) {sorted(pending)} did not connect within {timeout:.0f} s:\n"
                             + self.log_tails())
        if domains is None:
            self.timings["supernodes_connect_s"] = time.monotonic() - t0

    def try_unregistered_node(self, name: str = "intruder", timeout: float = 60.0) -> tuple[int | None, str]:
        """Start a SuperNode with a fresh key that was never registered; returns (exit code, its log).
        With node authentication on, the SuperLink refuses it and it exits (Flower exit code 305)."""
        keys = self.run_dir / "unregistered-keys"
        certs.make_certs(keys, [name], ["127.0.0.1"])
        proc = self.start_supernode(name, key=keys / f"{name}.key", name=f"supernode-{name}",
                                    data_path=self.run_dir / "nodes" / f"supernode-{name}" / "data")
        code = wait_exit(proc.popen, timeout)
        if code is None:
            self.processes.terminate(proc.popen)
        return code, proc.output()

    # ------------------------------------------------------------------------------------------ runs
    def run_app(self, app: Path | str = ".", run_config: str | Mapping | None = None, timeout: float = 3600.0,
                wait: bool = True, name: str = "flwr-run") -> RunResult:
        """`flwr run APP <connection> --stream`; returns once the run has a final status (or, with
        wait=False, as soon as it has a run id: finish with `wait_run`)."""
        app = Path(app).resolve()
        cmd = [_bin("flwr"), "run", str(app), self.connection, "--stream"]
        rc = format_run_config(run_config)
        if rc:
            cmd += ["--run-config", rc]
        t0 = time.monotonic()
        proc = self._spawn(name, cmd, app, self.env())
        res = RunResult(None, "not-started", "", 0.0, proc.log, proc, t0)
        while res.run_id is None and time.monotonic() - t0 < min(timeout, 180):
            m = re.search(r"Successfully started run (\d+)", proc.output())
            if m:
                res.run_id = int(m.group(1))
                break
            if not proc.alive:
                res.details = f"flwr run exited with {proc.popen.returncode} before starting a run:\n{tail(proc.log)}"
                return res
            time.sleep(0.3)
        if res.run_id is None:
            self._terminate(proc)
            res.details = f"no run id after {time.monotonic() - t0:.0f} s:\n{tail(proc.log)}"
            return res
        self.say(f"run {res.run_id} started ({app.name})")
        return self.wait_run(res, timeout - (time.monotonic() - t0)) if wait else res

    def run_status(self, run_id: int) -> tuple[str, str]:
        r = self.flwr("ls", self.connection, "--run-id", str(run_id), "--format", "json", timeout=60)
        try:
            start = r.stdout.index("{")
            runs = json.loads(r.stdout[start:])["runs"]
            return runs[0]["status"], runs[0].get("status-details", "")
        except (ValueError, KeyError, IndexError):
            return "unknown", _ANSI.sub("", r.stdout + r.stderr).strip()

    def wait_run(self, res: RunResult, timeout: float = 3600.0, poll_s: float = 10.0) -> RunResult:
        """Wait for the run's final status; on timeout stop it (`flwr stop`)."""
        deadline = time.monotonic() + max(timeout, 1.0)
        stream = res._stream
        while time.monotonic() < deadline:
            if stream is not None and stream.alive:  # the log stream ends when the run finishes
                with contextlib.suppress(subprocess.TimeoutExpired):
                    stream.popen.wait(min(poll_s, max(deadline - time.monotonic(), 0.1)))
                if stream.alive:
                    continue
            status, details = self.run_status(res.run_id)
            if status.startswith("finished"):
                res.status, res.details = status, details
                break
            time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.1)))
        else:
            self.flwr("stop", str(res.run_id), self.connection, timeout=60)
            res.status, res.details = "timeout", f"no final status after {timeout:.0f} s; run stopped"
        if stream is not None:
            self._terminate(stream)
        res.elapsed_s = time.monotonic() - res._t0
        self.say(f"run {res.run_id}: {res.status} in {res.elapsed_s:.1f} s {res.details if not res.ok else ''}")
        return res

    # ------------------------------------------------------------------------------------------ teardown
    def log_tails(self, lines: int = 25) -> str:
        return "\n".join(f"----- {p.name} ({p.log}) -----\n{tail(p.log, lines)}" for p in self.procs.values())

    def _terminate(self, proc: Proc) -> None:
        """Stop one process of the stack and its process group (SIGTERM, SIGKILL after procs.GRACE_S s)."""
        self.processes.terminate(proc.popen)

    def leftovers(self) -> list[int]:
        """Live processes of this stack (deployment/procs.py: its groups, its marker, their descendants)."""
        return self.processes.leftovers()

    def stop(self) -> list[int]:
        """Stop every process of the stack, bounded (deployment/procs.py: SIGTERM, SIGKILL after a short grace);
        returns pids that survived (none unless one is stuck in the kernel). Idempotent."""
        with self._lock:
            if self._stopped:
                return self.leftovers()
            self._stopped = True
        t0 = time.monotonic()
        left = self.processes.stop()
        self.timings["teardown_s"] = time.monotonic() - t0
        if left:
            self.say(f"WARNING: processes left behind: {left}")
        else:
            self.say(f"stopped all processes ({self.timings['teardown_s']:.1f} s), none left")
        return left


def _prepare_data(domains: list[str], data_root: Path | None, data_paths: Mapping | None, run_dir: Path,
                  placeholder: bool) -> dict[str, Path]:
    out = {}
    for d in domains:
        if data_paths and d in data_paths:
            out[d] = Path(data_paths[d])
        elif data_root is not None:
            out[d] = Path(data_root) / d
        elif placeholder:
            out[d] = run_dir / "data" / d
            out[d].mkdir(parents=True, exist_ok=True)
            (out[d] / f"{d}.txt").write_text(f"placeholder data of {d}\n")
        else:
            raise StackError(f"no data for domain {d}: give data_root or data_paths")
        if not out[d].is_dir():
            raise StackError(f"data of domain {d} not found: {out[d]}")
    return out


@contextlib.contextmanager
def start_stack(domains: list[str], data_root: Path | str | None = None, *, data_paths: Mapping | None = None,
                run_dir: Path | str | None = None, secrets: Path | str | None = None, connect: bool = True,
                timeout: float = 120.0, threads_per_node: int | None = 1, node_config_extra: Mapping | None = None,
                handle_signals: bool = False, verbose: bool = True) -> Iterator[Stack]:
    """Start SuperLink + registered SuperNodes on loopback, yield the Stack, always tear it down.

    domains: one SuperNode each; data of domain d = data_paths[d] or data_root/d (placeholders if neither).
    run_dir: logs/, node working folders, FLWR_HOMEs (default: a new temporary folder, kept after exit).
    secrets: certificates and node keys (default run_dir/secrets; created by deployment.certs if missing).
    connect: start the SuperNodes and wait for them (False: only SuperLink + registration).
    handle_signals: Ctrl-C raises KeyboardInterrupt and SIGTERM/SIGHUP SystemExit (procs.exit_on_signals), so
    that teardown runs (main thread only).
    """
    run_dir = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="mergerec-stack-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    secrets = Path(secrets) if secrets else run_dir / "secrets"
    t0 = time.monotonic()
    certs.make_certs(secrets, list(domains), ["127.0.0.1", "localhost"] if not (secrets / "server.pem").exists()
                     else sorted(certs.server_sans(_load_cert(secrets / "server.pem"))))
    data = _prepare_data(list(domains), Path(data_root) if data_root else None, data_paths, run_dir,
                         placeholder=data_root is None and data_paths is None)
    stack = Stack(run_dir, secrets, list(domains), data, threads_per_node=threads_per_node,
                  node_config_extra=node_config_extra, verbose=verbose)
    atexit.register(stack.stop)
    previous = exit_on_signals() if handle_signals else {}
    try:
        try:
            stack.start_superlink(timeout=timeout)
            stack.register()
            if connect:
                for d in domains:
                    stack.start_supernode(d)
                stack.wait_connected(timeout=timeout)
        except StackError:
            if verbose:
                print(stack.log_tails(), file=sys.stderr)
            raise
        stack.timings["stack_start_s"] = time.monotonic() - t0
        stack.say(f"stack up in {stack.timings['stack_start_s']:.1f} s: {len(domains)} SuperNode(s), run dir {run_dir}")
        yield stack
    finally:
        left = stack.stop()
        atexit.unregister(stack.stop)
        restore_signals(previous)
        if left:
            raise StackError(f"processes left behind after teardown: {left}")


def _load_cert(path: Path):
    from cryptography import x509

    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deployment.local",
                                description="Run a Flower app on a TLS + node-auth deployment on loopback.")
    p.add_argument("--app", type=Path, default=None, help="Flower app folder (default: the repository; "
                   "with --smoke: deployment/smoke)")
    p.add_argument("--smoke", action="store_true", help="run the deployment smoke app (placeholder data, "
                   "also checks that an unregistered node key is refused)")
    p.add_argument("--domains", type=_csv, default=["garden", "kitchen", "outdoor"])
    p.add_argument("--data-root", type=Path, default=None, help="one folder per domain (node-config data-path)")
    p.add_argument("--run-config", default=None, help="passed to flwr run --run-config")
    p.add_argument("--run-dir", type=Path, default=None, help="logs and working folders (default: a temp folder)")
    p.add_argument("--secrets", type=Path, default=None, help="certificates/keys folder (default RUN_DIR/secrets)")
    p.add_argument("--timeout", type=float, default=0.0, help="seconds for the run, then it is stopped "
                   "(default 0: no limit; the ServerApp's per-stage limits still apply)")
    p.add_argument("--threads-per-node", type=int, default=1, help="OMP/MKL threads of each SuperNode (0 = unset)")
    a = p.parse_args(argv)

    app = a.app or (SMOKE_APP if a.smoke else REPO)
    run_config = a.run_config
    if a.smoke and run_config is None:
        run_config = format_run_config({"min-nodes": len(a.domains), "expect-domains": ",".join(a.domains)})
    t0 = time.monotonic()
    try:
        with start_stack(a.domains, a.data_root, run_dir=a.run_dir, secrets=a.secrets,
                         threads_per_node=a.threads_per_node or None, handle_signals=True) as stack:
            ok = True
            if a.smoke:
                code, log = stack.try_unregistered_node()
                refused = code not in (None, 0) and "Failed to activate SuperNode" in log
                stack.say(f"unregistered node key refused: {refused} (exit code {code})")
                ok &= refused
            res = stack.run_app(app, run_config=run_config, timeout=a.timeout or math.inf)
            print("\n".join(ln for ln in tail(res.log, 400).splitlines() if "HTTP Request:" not in ln)[-6000:])
            ok &= res.ok
            if not ok:
                print(f"FAILED: {res.status} {res.details}\n{stack.log_tails()}", file=sys.stderr)
            timings = {**stack.timings, "run_s": res.elapsed_s}
    except StackError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: every process of the stack was stopped", file=sys.stderr)
        return 130
    except Terminated as exc:  # SIGTERM / SIGHUP
        print("terminated: every process of the stack was stopped", file=sys.stderr)
        return int(exc.code)
    timings.update(teardown_s=stack.timings.get("teardown_s", 0.0), total_s=time.monotonic() - t0)
    print("timings: " + ", ".join(f"{k}={v:.1f}" for k, v in timings.items()), file=sys.stderr)
    print(f"run {res.run_id}: {res.status}; logs in {stack.logs}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
