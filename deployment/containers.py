"""Container deployment driver (rootful podman + podman-compose; docs/deployment.md).

    python -m deployment.containers setup                  # podman, its config, localbase image, podman-compose
    python -m deployment.containers build [--no-cache] [--base IMAGE]
    python -m deployment.containers up                     # certs/keys, SuperLink, register keys, SuperNodes
    python -m deployment.containers register               # (re-)register the node keys, e.g. after a SuperLink restart
    python -m deployment.containers run [--run-config ...] # flwr run . from the host via the published port
    python -m deployment.containers isolation              # each SuperNode sees only its own data and key
    python -m deployment.containers down                   # remove containers and network, verify none left
    python -m deployment.containers e2e                    # all of the above on demo data, timed (make e2e-containers)

Domains, image and port come from deployment/federation.toml (compose.yaml is generated from it). Host paths
(certificates, data, runs) default to folders under E2E_DIR (--dir, default .cache/e2e-containers) and are
handed to compose as MERGEREC_SECRETS / MERGEREC_DATA / MERGEREC_RUNS. Podman runs with the configuration
from deployment/podman/env.sh (PODMAN_ROOT, default ${TMPDIR:-/tmp}/mergerec-podman).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

from deployment import certs, check_artifacts
from deployment.compose import COMPOSE, load
from deployment.local import Stack
from deployment.procs import Terminated, exit_on_signals, free_port, restore_signals

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "deployment"
PODMAN_DIR = HERE / "podman"
PROJECT = "mergerec"
CONNECTION = "mergerec-containers"
LOCALBASE = "localhost/localbase:latest"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
CONTEXT_FILES = ["pyproject.toml", "README.md", "requirements", "common", "server", "clients"]


def say(msg: str) -> None:
    print(f"[containers] {msg}", file=sys.stderr, flush=True)


def podman_env() -> dict[str, str]:
    """The environment with deployment/podman/env.sh applied (CONTAINERS_CONF, CONTAINERS_STORAGE_CONF)."""
    out = subprocess.run(["bash", "-c", f". '{PODMAN_DIR / 'env.sh'}' && env -0"], capture_output=True, check=True)
    env = dict(line.split("=", 1) for line in out.stdout.decode().split("\0") if "=" in line)
    return {**os.environ, **{k: env[k] for k in ("PODMAN_ROOT", "CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF")}}


def compose_bin() -> str:
    venv = Path(os.environ.get("PODMAN_COMPOSE_VENV", REPO / ".venv-podman"))
    exe = venv / "bin" / "podman-compose"
    if exe.exists():
        return str(exe)
    found = shutil.which("podman-compose")
    if not found:
        raise SystemExit("podman-compose not found: run python -m deployment.containers setup")
    return found


class Containers:
    def __init__(self, work: Path, data: Path | None = None, port: int | None = None, image: str | None = None):
        self.fed = load()
        self.work = Path(work).resolve()
        self.secrets = self.work / "secrets"
        self.data = Path(data).resolve() if data else self.work / "data"
        self.runs = self.work / "runs"
        self.logs = self.work / "logs"
        self.port = port or self.fed.superlink_port
        self.image = image or self.fed.image
        self.env = podman_env()
        self.env.update(MERGEREC_SECRETS=str(self.secrets), MERGEREC_DATA=str(self.data),
                        MERGEREC_RUNS=str(self.runs), SUPERLINK_PORT=str(self.port))
        self.timings: dict[str, float] = {}

    # ----------------------------------------------------------------------------------------- plumbing
    def sh(self, *cmd: str, check: bool = True, timeout: float = 600, quiet: bool = False) -> subprocess.CompletedProcess:
        r = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        if not quiet and r.returncode == 0 and r.stdout.strip() and os.environ.get("MERGEREC_VERBOSE"):
            print(r.stdout, file=sys.stderr)
        return r

    def podman(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.sh("podman", *args, **kw)

    def compose(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.sh(compose_bin(), "-p", PROJECT, "-f", str(COMPOSE), *args, **kw)

    def containers(self) -> list[str]:
        """Names of this project's containers (any state)."""
        r = self.podman("ps", "-a", "--filter", f"label=io.podman.compose.project={PROJECT}",
                        "--format", "{{.Names}}", check=False)
        return sorted(n for n in r.stdout.split() if n)

    # ----------------------------------------------------------------------------------------- build
    def stage_context(self) -> Path:
        """A minimal build context: the project sources, a wheelhouse with the CPU torch wheel, pip's CA."""
        ctx = Path(self.env["PODMAN_ROOT"]) / "context"
        ctx.mkdir(parents=True, exist_ok=True)
        for name in CONTEXT_FILES:
            src, dst = REPO / name, ctx / name
            if dst.is_dir():
                shutil.rmtree(dst)
            if src.is_dir():
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
            else:
                shutil.copy2(src, dst)
        deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
        text = "".join(f"{d}\n" for d in deps)
        if not (ctx / "requirements.txt").exists() or (ctx / "requirements.txt").read_text() != text:
            (ctx / "requirements.txt").write_text(text)
        wheels = ctx / "wheelhouse"
        wheels.mkdir(exist_ok=True)
        if not list(wheels.glob("torch-*.whl")) and not os.environ.get("MERGEREC_NO_WHEELHOUSE"):
            # uses the wheel pip finds on this host (a find-links folder or pip's cache) if there is one
            r = subprocess.run([sys.executable, "-m", "pip", "download", "torch==2.13.0", "--no-deps", "-q",
                                "-d", str(wheels)], capture_output=True, text=True)
            if r.returncode != 0:
                say(f"no local torch wheel ({r.stderr.strip()[-200:]}); the image gets torch from the CPU index")
        pip_ca = ctx / "pip-ca.crt"
        ca_src = Path(os.environ.get("MERGEREC_PIP_CA", HOST_CA_BUNDLE))
        pip_ca.write_bytes(ca_src.read_bytes() if ca_src.is_file() else b"")
        return ctx

    def build(self, base: str | None = None, no_cache: bool = False) -> float:
        if base is None:
            base = LOCALBASE if self.podman("image", "exists", LOCALBASE, check=False).returncode == 0 \
                else "python:3.11-slim"
        ctx = self.stage_context()
        say(f"building {self.image} from {base} (context {ctx}{', no cache' if no_cache else ''})")
        t0 = time.monotonic()
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"build{'-cold' if no_cache else ''}.log"
        cmd = ["podman", "build", "-f", str(HERE / "Dockerfile"), "--build-arg", f"BASE_IMAGE={base}",
               "-t", self.image, *(["--no-cache"] if no_cache else []), str(ctx)]
        with open(log, "w") as out:
            rc = subprocess.run(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT).returncode
        took = time.monotonic() - t0
        if rc != 0:
            raise RuntimeError(f"image build failed ({rc}), log {log}:\n" + "\n".join(log.read_text().splitlines()[-30:]))
        size = self.podman("image", "inspect", self.image, "--format", "{{.Size}}").stdout.strip()
        say(f"built {self.image} in {took:.1f} s ({int(size) / 1e9:.2f} GB)")
        return took

    def forget_image(self) -> None:
        """Remove the image and its (now unreferenced) intermediate layers; keeps the base image."""
        self.podman("rmi", "-f", self.image, check=False)
        self.podman("image", "prune", "-f", check=False)
        say(f"removed {self.image} and its cached layers")

    # ----------------------------------------------------------------------------------------- stack
    def prepare(self, demo: bool = False) -> None:
        certs.make_certs(self.secrets, list(self.fed.domains), ["127.0.0.1", "localhost", "superlink"])
        self.runs.mkdir(parents=True, exist_ok=True)
        if demo and not all((self.data / d / "train.json").exists() for d in self.fed.domains):
            subprocess.run([sys.executable, "-m", "common.data.demo", "--out", str(self.data),
                            "--domains", str(len(self.fed.domains))], check=True, cwd=REPO,
                           stdout=subprocess.DEVNULL)
        missing = [d for d in self.fed.domains if not (self.data / d).is_dir()]
        if missing:
            raise RuntimeError(f"no data folder for {missing} under {self.data}")

    def cli(self) -> Stack:
        """A flwr CLI handle (deployment.local.Stack) pointed at the published SuperLink port."""
        cli = Stack(self.work / "cli", self.secrets, list(self.fed.domains), {}, connection=CONNECTION)
        cli.port = self.port
        cli.write_cli_config()
        return cli

    def wait_healthy(self, timeout: float = 120.0) -> None:
        ctx = ssl.create_default_context(cafile=str(self.secrets / "ca.crt"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"https://127.0.0.1:{self.port}/health", context=ctx, timeout=2) as r:
                    if r.status == 200:
                        return
            time.sleep(0.5)
        raise RuntimeError(f"SuperLink not healthy on 127.0.0.1:{self.port}:\n{self.container_logs('superlink')}")

    def container_logs(self, name: str, lines: int = 30) -> str:
        r = self.podman("logs", "--tail", str(lines), name, check=False)
        return (r.stdout + r.stderr).strip()

    def wait_supernodes(self, timeout: float = 180.0) -> None:
        pending = {f"supernode-{d}" for d in self.fed.domains}
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for name in sorted(pending):
                if "SuperNode ID:" in self.container_logs(name, 200):
                    pending.discard(name)
            time.sleep(1.0)
        if pending:
            raise RuntimeError(f"{sorted(pending)} did not connect:\n" +
                               "\n".join(f"--- {n}\n{self.container_logs(n)}" for n in sorted(pending)))

    def up(self) -> Stack:
        left = self.containers()
        if left:
            raise RuntimeError(f"containers of project {PROJECT} exist already: {left} (run `down` first)")
        t0 = time.monotonic()
        self.compose("up", "-d", "--no-deps", "superlink")
        self.wait_healthy()
        # the compose healthcheck itself (podman 4.3 runs it only on demand: no systemd timers here)
        hc = self.podman("healthcheck", "run", "superlink", check=False)
        if hc.returncode != 0:
            raise RuntimeError(f"compose healthcheck of superlink fails: {hc.stdout}{hc.stderr}")
        self.timings["superlink_up_s"] = time.monotonic() - t0
        cli = self.cli()
        cli.verbose = False
        cli.register()
        self.timings["register_s"] = cli.timings["register_s"]
        t1 = time.monotonic()
        self.compose("up", "-d")
        self.wait_supernodes()
        self.timings["supernodes_up_s"] = time.monotonic() - t1
        self.timings["stack_start_s"] = time.monotonic() - t0
        say(f"stack up in {self.timings['stack_start_s']:.1f} s: superlink + {len(self.fed.domains)} SuperNodes "
            f"({', '.join(f'{d}={cli.node_ids.get(d)}' for d in self.fed.domains)})")
        return cli

    def run(self, run_config: str | dict | None, timeout: float = 3600.0) -> bool:
        cli = self.cli()
        try:
            res = cli.run_app(REPO, run_config=run_config, timeout=timeout, name="flwr-run-containers")
        finally:
            cli.stop()  # the host-side `flwr run` stream (deployment/procs.py), also on Ctrl-C / SIGTERM
        self.timings["pipeline_s"] = res.elapsed_s
        if not res.ok:
            say(f"run {res.run_id}: {res.status} {res.details}\n{self.container_logs('superlink', 60)}")
        return res.ok

    def isolation(self) -> list[str]:
        """Problems (empty = isolated): each SuperNode sees its own data and key and nothing of the others."""
        problems = []
        for d in self.fed.domains:
            name = f"supernode-{d}"
            if self.podman("exec", name, "ls", f"/data/{d}", check=False).returncode != 0:
                problems.append(f"{name} cannot list its own /data/{d}")
            seen = self.podman("exec", name, "ls", "-A", "/data", check=False).stdout.split()
            if seen != [d]:
                problems.append(f"{name} sees /data entries {seen}, expected [{d!r}]")
            for other in self.fed.domains:
                if other == d:
                    continue
                r = self.podman("exec", name, "ls", f"/data/{other}", check=False)
                if r.returncode == 0:
                    problems.append(f"{name} can list /data/{other}")
            keys = self.podman("exec", name, "ls", "-A", "/keys", "/certs", check=False).stdout.split()
            if sorted(k for k in keys if not k.endswith(":")) != ["ca.crt", "node.key"]:
                problems.append(f"{name} sees key/cert files {keys}")
            if self.podman("exec", name, "touch", f"/data/{d}/write-test", check=False).returncode == 0:
                problems.append(f"{name} can write its data folder (should be read-only)")
        return problems

    def down(self) -> list[str]:
        t0 = time.monotonic()
        self.compose("down", "-t", "20", check=False)
        left = self.containers()
        for name in left:  # should not happen; remove what this project left
            self.podman("rm", "-f", name, check=False)
        left = self.containers()
        net = self.podman("network", "exists", "mergerec-federation", check=False).returncode == 0
        if net:
            self.podman("network", "rm", "-f", "mergerec-federation", check=False)
        self.timings["down_s"] = time.monotonic() - t0
        say(f"down in {self.timings['down_s']:.1f} s; containers left: {left or 'none'}"
            f"{'; removed leftover network' if net else ''}")
        return left


def e2e(a: argparse.Namespace) -> int:
    c = Containers(a.dir, a.data, port=a.port or free_port())
    say(f"work dir {c.work}, SuperLink published on 127.0.0.1:{c.port}")
    ok = False
    t0 = time.monotonic()
    try:
        # cold: no layers of this image on the host (first build, or --cold removes them); warm: right after
        if a.cold:
            c.forget_image()
        if c.podman("image", "exists", c.image, check=False).returncode != 0:
            c.timings["build_cold_s"] = c.build()
        c.timings["build_warm_s"] = c.build()
        c.prepare(demo=a.data is None)
        if c.containers():
            c.down()
        c.up()
        problems = c.isolation()
        if problems:
            say("isolation FAILED:\n  " + "\n  ".join(problems))
        else:
            say("isolation OK: every SuperNode sees only /data/<its domain> (read-only) and its own key")
        shutil.rmtree(c.runs / "e2e", ignore_errors=True)  # the same run-dir again would resume, not rerun
        ran = c.run(f'run-dir="/runs/e2e" {a.run_config}'.strip(), timeout=a.timeout)
        found = check_artifacts.check(c.runs / "e2e", list(c.fed.domains)) if ran else ["run failed"]
        if not found:
            print(check_artifacts.summary(c.runs / "e2e"))
        else:
            say("artifact check FAILED:\n  " + "\n  ".join(found))
        ok = ran and not problems and not found
    finally:
        left = c.down()
        ok = ok and not left
        c.timings["total_s"] = time.monotonic() - t0
        c.logs.mkdir(parents=True, exist_ok=True)
        (c.logs / "timings.json").write_text(json.dumps(c.timings, indent=2))
        say("timings: " + ", ".join(f"{k}={v:.1f}" for k, v in c.timings.items()))
    say("e2e OK" if ok else "e2e FAILED")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deployment.containers", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["setup", "build", "up", "register", "run", "isolation", "down", "e2e"])
    p.add_argument("--dir", type=Path, default=REPO / ".cache" / "e2e-containers",
                   help="secrets/, data/, runs/, logs/ (default .cache/e2e-containers)")
    p.add_argument("--data", type=Path, default=None, help="domain folders (default DIR/data, demo data for e2e)")
    p.add_argument("--port", type=int, default=None, help="host port for the SuperLink (e2e: a free one)")
    p.add_argument("--base", default=None, help="base image (default localhost/localbase if present)")
    p.add_argument("--no-cache", action="store_true", help="build: ignore the layer cache")
    p.add_argument("--cold", action="store_true", help="e2e: remove the image and its cached layers first, so "
                   "that the first build is cold (it is anyway when the image does not exist yet)")
    p.add_argument("--run-config", default="", help="run/e2e: 'k=v ...' for flwr run --run-config")
    p.add_argument("--timeout", type=float, default=3600.0)
    a = p.parse_args(argv)
    if a.command == "setup":
        return subprocess.run([str(PODMAN_DIR / "setup.sh")]).returncode
    previous = exit_on_signals()  # Ctrl-C / SIGTERM / SIGHUP raise, so `finally` blocks (e2e: down) run
    try:
        return _command(a)
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except Terminated as exc:
        say("terminated")
        return int(exc.code)
    finally:
        restore_signals(previous)


def _command(a: argparse.Namespace) -> int:
    if a.command == "e2e":
        return e2e(a)
    c = Containers(a.dir, a.data, port=a.port)
    if a.command == "build":
        c.build(base=a.base, no_cache=a.no_cache)
    elif a.command == "up":
        c.prepare(demo=a.data is None)
        c.up()
    elif a.command == "register":  # e.g. after a SuperLink restart (its state is in memory)
        c.cli().register()
    elif a.command == "run":
        return 0 if c.run(a.run_config or None, timeout=a.timeout) else 1
    elif a.command == "isolation":
        problems = c.isolation()
        print("\n".join(problems) or "isolated")
        return 1 if problems else 0
    elif a.command == "down":
        return 1 if c.down() else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
