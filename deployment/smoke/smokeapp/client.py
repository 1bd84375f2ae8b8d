"""Smoke ClientApp: answers `query.whoami` with the node's domain and what it can see of its data."""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query("whoami")
def whoami(msg: Message, context: Context) -> Message:
    cfg = context.node_config
    domain = str(cfg.get("domain", ""))
    data = Path(str(cfg.get("data-path", "")))
    entries = sorted(os.listdir(data)) if data.is_dir() else []
    reply = ConfigRecord({"domain": domain, "data-path": str(data), "data-files": ",".join(entries),
                          "pid": os.getpid()})
    return Message(content=RecordDict({"whoami": reply}), reply_to=msg)
