"""The whole federated pipeline as a benchmark: the same code as `make run` (deployment.simulate: a simulation
SuperLink, one simulated SuperNode per domain, the ServerApp), timed per stage and per silo.

    python -m benchmarks.pipeline [--data-root ../shared/data/amazon] [--domains Beauty,Sports,Toys]
                                  [--run-config "k=v ..."] [--runs cold,warm] [--cache-dir DIR] [--timeout S]
    python -m benchmarks.pipeline --smoke      # demo data, a few steps: proves the driver (tests use it)

Each run ("cold": a new, empty item-embedding cache; "warm": the same cache again, a new run directory) records
from the run directory's report.json: wall time per stage, fine-tuning seconds/epochs per silo, bytes each way
per silo (and the task vector / teacher part of the upload), the final metrics table (every candidate model's
Recall@10 / NDCG@10 per domain); and, sampled every second over every process of the run (the launcher's
marker, deployment/procs.py), the peak RSS of the largest process and of all of them together. Writes
benchmarks/results/pipeline.json (the command included) and pipeline.md by default (the current claim's file is
pipeline-default.json, written with `--out`: docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.core import RESULTS
from common.core.report import markdown_table, write_results
from deployment.procs import ProcessSet, exit_on_signals, marked_pids, restore_signals, rss_kb
from deployment.simulate import ROOT, run_simulation

SMOKE_CONFIG = {"epochs": 2, "coef-steps": 10, "teacher-top-k": 16, "baselines": "task_arithmetic",
                "granularities": "task"}


class RssSampler(threading.Thread):
    """Peak RSS (MB) of the largest process and of the sum over every process carrying the run's marker."""

    def __init__(self, run_id: str, every_s: float = 1.0):
        super().__init__(daemon=True)
        self.run_id, self.every_s, self.stop_flag = run_id, every_s, threading.Event()
        self.peak_process_mb = self.peak_total_mb = 0.0

    def run(self) -> None:
        while not self.stop_flag.wait(self.every_s):
            sizes = [rss_kb(p) / 1024 for p in marked_pids(self.run_id)]
            if sizes:
                self.peak_process_mb = max(self.peak_process_mb, max(sizes))
                self.peak_total_mb = max(self.peak_total_mb, sum(sizes))

    def stop(self) -> None:
        self.stop_flag.set()
        self.join(timeout=5)


def upload_parts(run_dir: Path, domain: str) -> dict:
    out = {}
    tv = run_dir / "task_vectors" / f"{domain}.safetensors"
    if tv.exists():
        out["task_vector_bytes"] = tv.stat().st_size
    teacher = run_dir / "teacher" / f"{domain}.npz"
    if teacher.exists():
        with np.load(teacher) as z:
            out["teacher_bytes"] = int(sum(z[k].nbytes for k in z.files))
    return out


def summarise(name: str, report: dict, run_dir: Path, wall_s: float, sampler: RssSampler) -> dict:
    silos = {}
    for d in sorted(report.get("active", [])):
        silos[d] = {**report.get("finetune", {}).get(d, {}), **report.get("bytes", {}).get(d, {}),
                    **upload_parts(run_dir, d)}
    metrics = [{"run": name, "domain": d, "model": model, "recall@10": round(m["values"]["recall@10"], 5),
                "ndcg@10": round(m["values"]["ndcg@10"], 5), "users": m["users"]}
               for d, per_model in sorted(report.get("metrics", {}).items()) for model, m in per_model.items()]
    return {"run": name, "wall_s": round(wall_s, 1), "seen_items": report.get("seen_items"),
            "shipped": report.get("selection", {}).get("chosen"), "stages_s": report.get("timings", {}), "silos": silos,
            "peak_rss_process_mb": round(sampler.peak_process_mb, 1),
            "peak_rss_total_mb": round(sampler.peak_total_mb, 1), "dropped": report.get("dropped", []),
            "metrics": metrics, "run_dir": str(run_dir)}


def one_run(name: str, domains: list[str], data_root: Path, run_dir: Path, rc: str, timeout: float | None) -> dict:
    procs = ProcessSet()
    sampler = RssSampler(procs.run_id)
    sampler.start()
    t0 = time.monotonic()
    try:
        report = run_simulation(domains, data_root, run_dir, rc, timeout=timeout, procs=procs)
    finally:
        sampler.stop()
    return summarise(name, report, run_dir, time.monotonic() - t0, sampler)


def markdown(result: dict) -> str:
    parts = [f"# Federated pipeline benchmark\n\nCommand: `{result['command']}`\n"]
    for r in result["runs"]:
        stages = [{"stage": k, "seconds": v} for k, v in r["stages_s"].items()]
        silos = [{"domain": d, **v} for d, v in r["silos"].items()]
        cols = ["domain", "epochs", "refit_epochs", "seconds", "sent_to_silo", "received_from_silo",
                "task_vector_bytes", "teacher_bytes"]
        parts += [f"## {r['run']}: {r['wall_s']} s wall, peak RSS {r['peak_rss_process_mb']} MB (largest process), "
                  f"{r['peak_rss_total_mb']} MB (all); shipped model `{r['shipped']}`; seen items: "
                  f"{r['seen_items']}\n", markdown_table(stages, ["stage", "seconds"]), "",
                  markdown_table(silos, cols), "",
                  markdown_table(r["metrics"], ["domain", "model", "recall@10", "ndcg@10", "users"]), ""]
    return "\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pipeline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "amazon")
    ap.add_argument("--domains", default="Beauty,Sports,Toys")
    ap.add_argument("--run-config", default="", help='extra "key=value ..." for [tool.flwr.app.config]')
    ap.add_argument("--runs", default="cold,warm", help="cold: a new empty item cache; warm: the same again")
    ap.add_argument("--cache-dir", type=Path, default=None, help="cache root for the runs (default: a new folder)")
    ap.add_argument("--work", type=Path, default=None, help="run directories (default: a new temporary folder)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per run (default: no limit)")
    ap.add_argument("--smoke", action="store_true", help="demo data (written if missing) and a few steps")
    ap.add_argument("--out", type=Path, default=RESULTS / "pipeline.json")
    args = ap.parse_args(argv)
    work = (args.work or Path(tempfile.mkdtemp(prefix="bench-pipeline-"))).resolve()
    data_root, rc = args.data_root.resolve(), args.run_config
    if args.smoke:
        from common.data.demo import make_demo

        data_root = work / "demo-data"
        if not data_root.exists():
            make_demo(data_root)
        args.domains = "garden,kitchen,outdoor" if args.domains == "Beauty,Sports,Toys" else args.domains
        rc = " ".join([*(f"{k}='{v}'" if isinstance(v, str) else f"{k}={v}" for k, v in SMOKE_CONFIG.items()), rc])
    cache = (args.cache_dir or work / "cache").resolve()
    domains = [d for d in args.domains.split(",") if d]
    runs = []
    cmd = "python -m benchmarks.pipeline " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": cmd, "domains": domains, "data_root": str(data_root), "run_config": rc,
              "cpus": os.cpu_count(), "runs": runs}
    previous = exit_on_signals()  # Ctrl-C / SIGTERM / SIGHUP stop every process of the current run (run_simulation)
    try:
        for name in [r for r in args.runs.split(",") if r]:
            if name == "cold" and args.cache_dir is None:
                shutil.rmtree(cache, ignore_errors=True)
            run_rc = f"cache-dir='{cache}' silo-state-root='{work / name / 'silo-state'}' {rc}".strip()
            runs.append(one_run(name, domains, data_root, work / name / "run", run_rc, args.timeout))
            print(f"{name}: {runs[-1]['wall_s']} s; stages {json.dumps(runs[-1]['stages_s'])}", file=sys.stderr)
            write_results(args.out, result, markdown(result))  # after every run: a later failure keeps this one
    finally:
        restore_signals(previous)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
