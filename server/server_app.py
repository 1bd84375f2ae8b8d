"""Flower ServerApp: waits for the silos, then runs the MergeRec stages (server/pipeline.py)."""

from __future__ import annotations

import logging
import time

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.config import pipeline_config
from server.pipeline import Pipeline, results_table
from server.transport import FlowerTransport, MessageRecorder

log = logging.getLogger(__name__)
app = ServerApp()


def wait_for_nodes(grid: Grid, min_nodes: int, timeout_s: float) -> list[int]:
    t0 = time.monotonic()
    nodes = list(grid.get_node_ids())
    while len(nodes) < min_nodes and time.monotonic() - t0 < timeout_s:
        time.sleep(1.0)
        nodes = list(grid.get_node_ids())
    log.info("%d silo node(s) connected", len(nodes))
    return nodes


@app.main()
def main(grid: Grid, context: Context) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg, run_dir, server = pipeline_config(dict(context.run_config))
    wait_for_nodes(grid, server["min_nodes"], server["node_wait_s"])
    recorder = MessageRecorder(server["record_messages"]) if server["record_messages"] else None
    report = Pipeline(FlowerTransport(grid, observer=recorder), cfg, run_dir, expected=server["expect_domains"]).run()
    print(results_table(report))
    print(f"report: {run_dir.resolve() / 'report.json'}")
