"""Local simulation of every silo on this machine, through the real Flower stack (`make run`).

    python -m deployment.simulate [--data-root DIR] [--domains a,b,c] [--run-dir DIR] [--run-config "k=v ..."]
                              [--timeout SECONDS]

Starts its own simulation SuperLink (free loopback ports, in-memory state), runs `flwr run . <connection>
--stream` with one simulated SuperNode per domain (1 CPU and one torch thread each; every silo at once, up to twice
the machine's cores, so a silo that finishes early never leaves a core idle while others wait their turn), prints the per-domain table from the run's
report.json and stops the SuperLink and everything it started. No limit on the whole run unless --timeout is
given; on that timeout, Ctrl-C, SIGTERM/SIGHUP or an error, every process of the run (SuperLink, `flwr run`,
Flower's simulation runtime, Ray) is stopped within seconds (deployment/procs.py: SIGTERM, SIGKILL after a
short grace) and the run directory can be resumed. With the default data root, missing demo domains are
generated first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deployment.procs import ProcessSet, exit_on_signals, flwr_env, free_port, restore_signals
from deployment.procs import wait as wait_exit

ROOT = Path(__file__).resolve().parents[1]
DEMO_ROOT = ROOT / ".cache" / "demo-data"


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"flower-superlink not healthy on port {port} after {timeout:.0f}s")


class RunTimeout(RuntimeError):
    """The whole run took longer than the launcher's --timeout (every process of it was stopped)."""


def _wait(proc: subprocess.Popen, timeout: float | None, t0: float) -> int:
    """Wait for `flwr run`; RunTimeout after `timeout` s of the whole run (None: no limit). Polls (procs.wait), so
    Ctrl-C and SIGTERM interrupt it at once."""
    code = wait_exit(proc, None if timeout is None else max(timeout - (time.monotonic() - t0), 0.1))
    if code is None:
        raise RunTimeout(f"the run did not finish within --timeout {timeout:.0f} s; every process of it was "
                         f"stopped (the run directory keeps the checkpoint: the same --run-dir resumes)")
    return code


def silos_at_once(silos: int, cpus_per_silo: int = 1, cores: int | None = None) -> int:
    """How many simulated silos run at the same time: all of them, up to twice the cores (each runs one process
    of `cpus_per_silo` threads). More silos than cores share the cores: on 2 cores the three real domains finish
    their fine-tuning ~40 s sooner that way than two at a time with the third waiting (docs/benchmarks.md, claim 1);
    each silo's results are the same either way (its own thread count does not change)."""
    cores = cores or os.cpu_count() or 1
    return max(1, min(silos, max(1, 2 * cores // cpus_per_silo)))


def run_simulation(domains: list[str], data_root: Path, run_dir: Path, run_config: str = "",
                   cpus_per_silo: int = 1, timeout: float | None = None, log_dir: Path | None = None,
                   procs: ProcessSet | None = None, at_once: int | None = None) -> dict:
    """Run the federated pipeline in a Flower simulation; returns report.json's content.

    at_once: silos running at the same time (default `silos_at_once`): Ray is told the machine has
    at_once x cpus_per_silo CPUs, so that many simulated SuperNodes get an actor each.

    timeout: seconds for the whole run (None: no limit; the ServerApp's per-stage timeouts still apply).
    However this returns or raises (timeout, an error, KeyboardInterrupt, SIGTERM turned into SystemExit by
    `procs.exit_on_signals`), every process it started is stopped, Flower's simulation runtime and Ray included
    (SIGTERM, then SIGKILL after procs.GRACE_S s).
    """
    log_dir = Path(log_dir or run_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = procs or ProcessSet()
    t0 = time.monotonic()
    home = Path(tempfile.mkdtemp(prefix="flwr-home-"))
    http_port, control_port = free_port(), free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{http_port}"\ninsecure = true\n')
    env = flwr_env(home)
    try:
        link = procs.spawn(
            ["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess", "--host", "127.0.0.1",
             "--port", str(http_port), "--control-api-address", f"127.0.0.1:{control_port}"],
            env=env, log=log_dir / "superlink.log")
        wait_healthy(http_port, link)
        rc = " ".join([f"run-dir='{run_dir}'", f"data-root='{data_root}'", f"domains='{','.join(domains)}'",
                       f"expect-domains='{','.join(domains)}'", f"min-nodes={len(domains)}", run_config]).strip()
        at_once = at_once or silos_at_once(len(domains), cpus_per_silo)
        cmd = ["flwr", "run", str(ROOT), "sim", "--stream", "--run-config", rc, "--federation-config",
               f"num-supernodes={len(domains)} client-resources-num-cpus={cpus_per_silo} "
               f"init-args-num-cpus={at_once * cpus_per_silo}"]
        report = run_dir / "report.json"
        before = report.stat().st_mtime if report.exists() else None
        run = procs.spawn(cmd, env=env, log=log_dir / "flwr-run.log", cwd=ROOT)
        code = _wait(run, timeout, t0)
        if not report.exists() or report.stat().st_mtime == before:
            tail = (log_dir / "flwr-run.log").read_text()[-4000:]
            raise RuntimeError(f"the federated run produced no report (flwr exit {code}); log tail:\n{tail}")
        result = json.loads(report.read_text())
        result.setdefault("timings", {})["flower_wall_s"] = round(time.monotonic() - t0, 2)
        return result
    finally:
        left = procs.stop()
        if left:
            print(f"WARNING: processes of this run still alive after SIGKILL: {left}", file=sys.stderr)


EXIT_COMPLETE, EXIT_FAILED, EXIT_DEGRADED = 0, 1, 3


def exit_status(report: dict, expected: list[str]) -> int:
    """0: completed with every expected silo; 3: completed, some silo dropped or missing (report.json names
    them); 1 (main): the run failed."""
    missing = set(expected) - set(report.get("active", []))
    return EXIT_DEGRADED if report.get("dropped") or missing else EXIT_COMPLETE


def main(argv=None, prog: str = "python -m deployment.simulate") -> int:
    def positive(kind):  # argparse type: a finite number > 0
        def parse(text: str):
            try:
                value = kind(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
            if not (value > 0 and value != float("inf")):
                raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
            return value
        return parse

    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=DEMO_ROOT,
                    help="folder with one subfolder per domain (default: the demo data, generated when missing)")
    ap.add_argument("--domains", default="", help="comma list (default: every domain folder under --data-root)")
    ap.add_argument("--run-dir", type=Path, default=None, help="default: a new runs/<timestamp> (runs/latest points "
                    "at the newest run); reuse one to resume")
    ap.add_argument("--run-config", default="", help='extra "key=value ..." for [tool.flwr.app.config]')
    ap.add_argument("--cpus-per-silo", type=positive(int), default=1,
                    help="CPU cores Flower gives each simulated silo")
    ap.add_argument("--silos-at-once", type=positive(int), default=None,
                    help="simulated silos running at the same time (default: every silo, up to twice the cores)")
    ap.add_argument("--timeout", type=positive(float), default=None,
                    help="seconds for the whole run, then every process of it is stopped (default: no limit; "
                         "the per-stage limits of run-config timeout-s still apply)")
    args = ap.parse_args(argv)
    # the whole run-config is checked before anything starts: a bad value is one line naming the key
    from server.config import ConfigError, app_defaults, parse_overrides, pipeline_config

    try:
        pipeline_config({**app_defaults(), **parse_overrides(args.run_config)})
    except ConfigError as exc:
        print(f"{prog}: error: --run-config: {exc}", file=sys.stderr)
        return 2  # a usage error, as argparse's

    from common.core.report import markdown_table
    from common.core.runs import new_run_dir

    data_root = args.data_root.resolve()
    if data_root == DEMO_ROOT and not data_root.exists():
        from common.data.demo import make_demo

        make_demo(data_root)
        print(f"demo domains written to {data_root}")
    domains = [d for d in args.domains.split(",") if d] or sorted(
        p.name for p in data_root.iterdir() if (p / "smap.json").exists())
    if len(domains) < 2:
        ap.error(f"need at least two domain folders under {data_root}, found {domains}")
    run_dir = (args.run_dir or new_run_dir(ROOT / "runs")).resolve()  # the ServerApp points runs/latest at it
    print(f"federated run over {', '.join(domains)} -> {run_dir} (logs: flwr-run.log, superlink.log)")
    previous = exit_on_signals()  # Ctrl-C/SIGINT (even when inherited as ignored), SIGTERM, SIGHUP
    try:
        report = run_simulation(domains, data_root, run_dir, args.run_config, args.cpus_per_silo, args.timeout,
                                at_once=args.silos_at_once)
    except RuntimeError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted: every process of the run was stopped; the same --run-dir resumes", file=sys.stderr)
        return 130
    except SystemExit as exc:  # SIGTERM / SIGHUP (deployment.procs.Terminated)
        print("terminated: every process of the run was stopped; the same --run-dir resumes", file=sys.stderr)
        return int(exc.code or EXIT_FAILED)
    finally:
        restore_signals(previous)
    rows = []
    for domain, per_model in sorted(report["metrics"].items()):
        for model, m in per_model.items():
            rows.append({"domain": domain, "model": model, **m["values"], "users": m["users"]})
    print(markdown_table(rows, ["domain", "model", "recall@10", "ndcg@10", "recall@50", "ndcg@50", "users"]))
    if report["dropped"]:
        print("dropped silos:", json.dumps(report["dropped"]))
    print(f"stage timings (s): {json.dumps(report['timings'])}")
    print(f"report: {run_dir / 'report.json'}")
    return exit_status(report, domains)


if __name__ == "__main__":
    sys.exit(main())
