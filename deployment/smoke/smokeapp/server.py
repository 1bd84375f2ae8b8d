"""Smoke ServerApp: waits for the SuperNodes, asks each `query.whoami`, checks the domains."""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    min_nodes = int(rc.get("min-nodes", 3))
    expected = sorted(d.strip() for d in str(rc.get("expect-domains", "")).split(",") if d.strip())
    deadline = time.monotonic() + float(rc.get("wait-s", 120.0))
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < min_nodes and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = sorted(grid.get_node_ids())
    print(f"SMOKE nodes connected: {len(nodes)}", flush=True)
    if len(nodes) < min_nodes:
        raise RuntimeError(f"SMOKE-FAIL only {len(nodes)} of {min_nodes} SuperNodes connected")
    msgs = [Message(RecordDict({"q": ConfigRecord({"ask": "domain"})}), dst_node_id=n, message_type="query.whoami")
            for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=float(rc.get("reply-timeout-s", 60.0))))
    seen: dict[str, int] = {}
    for r in replies:
        if r.has_error():
            raise RuntimeError(f"SMOKE-FAIL node {r.metadata.src_node_id}: {r.error.reason}")
        who = r.content["whoami"]
        seen[str(who["domain"])] = r.metadata.src_node_id
        print(f"SMOKE node {r.metadata.src_node_id} domain={who['domain']} data-files={who['data-files']}",
              flush=True)
    if len(replies) < len(nodes):
        raise RuntimeError(f"SMOKE-FAIL {len(replies)} of {len(nodes)} nodes replied")
    if expected and sorted(seen) != expected:
        raise RuntimeError(f"SMOKE-FAIL domains {sorted(seen)} != expected {expected}")
    print(f"SMOKE-OK domains={','.join(sorted(seen))}", flush=True)
