"""Flower ServerApp: waits for the silos, then runs the MergeRec stages (server/pipeline.py)."""

from __future__ import annotations

import logging
import time

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.core.logs import setup_logging
from common.core.runs import link_latest
from server.config import pipeline_config
from server.artifacts import results_table
from server.pipeline import Pipeline
from server.transport import FlowerTransport, MessageRecorder

log = logging.getLogger(__name__)
app = ServerApp()


def wait_for_nodes(grid: Grid, min_nodes: int, timeout_s: float, domains: int = 0, settle_s: float = 10.0) -> list[int]:
    """min_nodes > 0: wait (up to timeout_s) for that many SuperNodes. min_nodes = 0: follow the federation:
    wait for one per run-config domain, but go on as soon as at least one is connected and the count has not
    changed for settle_s seconds (a simulation federation with fewer SuperNodes than domains)."""
    t0 = time.monotonic()
    target = min_nodes or max(1, domains)
    nodes = list(grid.get_node_ids())
    last_change, count = time.monotonic(), len(nodes)
    while len(nodes) < target and time.monotonic() - t0 < timeout_s:
        if min_nodes == 0 and nodes and time.monotonic() - last_change >= settle_s:
            break
        time.sleep(1.0)
        nodes = list(grid.get_node_ids())
        if len(nodes) != count:
            last_change, count = time.monotonic(), len(nodes)
    log.info("%d silo node(s) connected (waited for %s)", len(nodes),
             min_nodes if min_nodes else f"one per domain, {target}, or a stable count")
    return nodes


@app.main()
def main(grid: Grid, context: Context) -> None:
    setup_logging()
    cfg, run_dir, server = pipeline_config(dict(context.run_config))  # a bad run-config stops here, naming the key
    run_dir.mkdir(parents=True, exist_ok=True)
    if link_latest(run_dir):  # runs/latest -> this run, whichever launcher started it
        log.info("run directory %s (runs/latest points at it)", run_dir.resolve())
    wait_for_nodes(grid, server["min_nodes"], server["node_wait_s"], len(server["domains"]))
    recorder = MessageRecorder(server["record_messages"]) if server["record_messages"] else None
    report = Pipeline(FlowerTransport(grid, observer=recorder), cfg, run_dir, expected=server["expect_domains"]).run()
    print(results_table(report))
    print(f"report: {run_dir.resolve() / 'report.json'}")
