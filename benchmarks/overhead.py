"""Flower's overhead: the same pipeline on the same data, in process and through the Flower simulation.

    python -m benchmarks.overhead [--data-root DIR] [--run-config "k=v ..."]

Runs the pipeline once with the in-process transport (silo workers called directly) and once with
`deployment.simulate` (SuperLink + simulated SuperNodes, messages through Flower), both with the default
[tool.flwr.app.config] plus the overrides, and reports the wall-time ratio, per-stage timings and the bytes
each silo sent and received (counted on the encoded Flower records, identical in both modes). Writes
benchmarks/results/overhead.json and overhead.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from benchmarks.core import RESULTS
from common.core.report import markdown_table, write_results
from server.checkpoint import STAGES
from deployment.simulate import DEMO_ROOT, ROOT, run_simulation


def parse_overrides(text: str) -> dict:
    return tomllib.loads("\n".join(text.split())) if text.strip() else {}


def in_process(domains: list[str], data_root: Path, run_dir: Path, rc: dict) -> tuple[dict, float]:
    from clients.client_app import handle
    from clients.silo import SiloWorker
    from server.config import pipeline_config
    from server.pipeline import Pipeline
    from server.transport import InProcessTransport

    defaults = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    cfg, _, _ = pipeline_config({**defaults, **rc, "run-dir": str(run_dir)})
    endpoints = {d: (lambda w: lambda mt, c: handle(w, mt, c))(
        SiloWorker(d, data_root / d, state_dir=run_dir / "silo-state" / d, policy=cfg.silo_policy()))
        for d in domains}
    t0 = time.perf_counter()
    report = Pipeline(InProcessTransport(endpoints), cfg, run_dir).run()
    return report, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=DEMO_ROOT)
    ap.add_argument("--domains", default="garden,kitchen,outdoor")
    ap.add_argument("--run-config", default="", help='overrides, e.g. "epochs=5 coef-steps=100"')
    ap.add_argument("--out", type=Path, default=RESULTS / "overhead.json")
    args = ap.parse_args(argv)
    domains = args.domains.split(",")
    data_root = args.data_root.resolve()
    if data_root == DEMO_ROOT and not data_root.exists():
        from common.data.demo import make_demo

        make_demo(data_root)
    rc = parse_overrides(args.run_config)
    work = Path(tempfile.mkdtemp(prefix="overhead-"))
    local, local_s = in_process(domains, data_root, work / "in-process", rc)
    t0 = time.perf_counter()
    flower = run_simulation(domains, data_root, work / "flower", args.run_config)
    flower_s = time.perf_counter() - t0
    rows = [{"mode": "in-process", "wall_s": round(local_s, 1), **{k: v for k, v in local["timings"].items()}},
            {"mode": "flower simulation", "wall_s": round(flower_s, 1),
             **{k: v for k, v in flower["timings"].items() if k != "flower_wall_s"}}]
    stage_cols = list(STAGES)  # handshake, then the pipeline's stages in order (server/checkpoint.py)
    same = all(abs(local["metrics"][d][m]["values"]["ndcg@10"] - flower["metrics"][d][m]["values"]["ndcg@10"])
               < 1e-9 for d in local["metrics"] for m in local["metrics"][d])
    out = {"command": "python -m benchmarks.overhead " + " ".join(argv or sys.argv[1:]), "rows": rows,
           "ratio": round(flower_s / local_s, 2), "bytes_per_silo": flower["bytes"],
           "bytes_per_silo_in_process": local["bytes"], "metrics_identical": same}
    md = (markdown_table(rows, ["mode", "wall_s", *stage_cols]) + f"\n\nwall-time ratio flower / in-process: "
          f"{out['ratio']}; NDCG@10 identical in both modes: {same}\n\n" + markdown_table(
              [{"silo": d, **b} for d, b in flower["bytes"].items()], ["silo", "sent_to_silo", "received_from_silo"]))
    write_results(args.out, out, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
