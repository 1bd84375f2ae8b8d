"""How the server reaches its silos: one interface, two implementations.

- `FlowerTransport`: a Flower `Grid` (simulation or a real SuperLink); silos are SuperNodes.
- `InProcessTransport`: `SiloWorker`s called directly (the in-process pipeline, tests, benchmarks).

Both carry exactly the same encoded messages (common/protocol/messages.py), so a pipeline run in process and one
through Flower compute the same thing, and byte counts are comparable.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from common.core.files import atomic_path, atomic_write
from common.protocol.messages import Arrays, ContractError, Header, SiloReplyError, decode, encode, error_text

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """One silo's answer to one request: a decoded reply, or an error string the server wrote (a silo's error
    reply becomes its code and fixed text, `error_text`: nothing the silo wrote is kept)."""

    silo: str
    header: Header | None = None
    arrays: Arrays = field(default_factory=dict)
    error: str | None = None
    bytes_up: int = 0
    bytes_down: int = 0


class Transport(Protocol):
    def silos(self) -> list[str]:
        """Opaque silo handles currently reachable (node ids as strings, or domain names)."""

    def call(self, message_type: str, requests: dict[str, tuple[Header, Arrays]], reply_type: type[Header],
             timeout: float, on_reply=None) -> dict[str, Outcome]:
        """Send one request per silo, wait up to `timeout` seconds, return an outcome per silo; `on_reply(silo,
        outcome)` is called for each outcome as soon as it is known."""


def record_bytes(content) -> int:
    return sum(r.count_bytes() for r in content.values())


def _decode_reply(silo: str, content, reply_type, sent: int) -> Outcome:
    try:
        header, arrays = decode(content, reply_type)
    except ContractError as exc:
        return Outcome(silo, error=f"malformed reply: {exc}", bytes_down=sent)
    return Outcome(silo, header, arrays, bytes_up=record_bytes(content), bytes_down=sent)


class InProcessTransport:
    """Calls `handle(message_type, content) -> content` of in-process silo endpoints.

    `endpoints`: silo handle -> callable taking and returning a flwr RecordDict (clients.client_app.handle)."""

    def __init__(self, endpoints: dict, observer=None):
        self.endpoints = dict(endpoints)
        self.observer = observer  # called with (direction, silo, message_type, content): privacy tests

    def silos(self) -> list[str]:
        return list(self.endpoints)

    def call(self, message_type, requests, reply_type, timeout, on_reply=None):
        out = {}
        for silo, o in self._call(message_type, requests, reply_type):
            out[silo] = o
            if on_reply is not None:
                on_reply(silo, o)
        return out

    def _call(self, message_type, requests, reply_type):
        for silo, (header, arrays) in requests.items():
            content = encode(header, arrays)
            sent = record_bytes(content)
            if self.observer:
                self.observer("down", silo, message_type, content)
            try:
                reply = self.endpoints[silo](message_type, content)
            except SiloReplyError as exc:  # the silo's own error reply (clients.client_app.safe_handle)
                o = Outcome(silo, error=error_text(exc.code), bytes_down=sent)
                if self.observer:
                    self.observer("error", silo, message_type, o.error)
                yield silo, o
                continue
            except Exception as exc:  # a crashing silo is an error outcome, like Flower's error reply
                o = Outcome(silo, error=f"silo crashed ({type(exc).__name__[:64]})", bytes_down=sent)
                if self.observer:
                    self.observer("error", silo, message_type, o.error)
                yield silo, o
                continue
            if self.observer:
                self.observer("up", silo, message_type, reply)
            yield silo, _decode_reply(silo, reply, reply_type, sent)


class FlowerTransport:
    """Messages through a Flower Grid. Errors are mapped by reply_to_message_id, so a dead node (whose
    error reply comes from the SuperLink) is attributed to the right silo."""

    def __init__(self, grid, observer=None):
        self.grid = grid
        self.observer = observer

    def silos(self) -> list[str]:
        return [str(n) for n in self.grid.get_node_ids()]

    def call(self, message_type, requests, reply_type, timeout, on_reply=None):
        from flwr.app import Message

        msgs, by_id, sent = [], {}, {}
        for silo, (header, arrays) in requests.items():
            content = encode(header, arrays)
            sent[silo] = record_bytes(content)
            if self.observer:
                self.observer("down", silo, message_type, content)
            msg = Message(content=content, dst_node_id=int(silo), message_type=message_type)
            msgs.append(msg)
        t0 = time.monotonic()
        ids = list(self.grid.push_messages(msgs))
        for mid, silo in zip(ids, requests):
            by_id[mid] = silo
        out: dict[str, Outcome] = {}
        pending = set(ids)
        while pending and time.monotonic() - t0 < timeout:
            for reply in self.grid.pull_messages(list(pending)):
                mid = reply.metadata.reply_to_message_id
                if mid not in pending:
                    continue
                pending.discard(mid)
                silo = by_id[mid]
                if reply.has_error():
                    err = reply.error
                    out[silo] = Outcome(silo, error=error_text(err.code, flower=True), bytes_down=sent[silo])
                    if self.observer:
                        self.observer("error", silo, message_type, out[silo].error)
                else:
                    if self.observer:
                        self.observer("up", silo, message_type, reply.content)
                    out[silo] = _decode_reply(silo, reply.content, reply_type, sent[silo])
                if on_reply is not None:
                    on_reply(silo, out[silo])
            if pending:
                time.sleep(0.5)
        for mid in pending:
            silo = by_id[mid]
            out[silo] = Outcome(silo, error=f"no reply within {timeout:.0f}s", bytes_down=sent[silo])
            if on_reply is not None:
                on_reply(silo, out[silo])
        return out


class MessageRecorder:
    """Observer that writes every message (both directions) to a folder: `NNNNN-<dir>-<type>-<silo>.json`
    (every config and metric record, bytes as base64, or the text of an error reply) and `.npz` (every
    array of every array record). For audits and the privacy tests (tests/privacy.py)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.count = len(list(self.folder.glob("*.json")))

    def __call__(self, direction: str, silo: str, message_type: str, content) -> None:
        import json

        import numpy as np

        stem = f"{self.count:05d}-{direction}-{message_type}-{silo}"
        self.count += 1
        if isinstance(content, str):  # direction "error": the error text a silo's reply carried
            atomic_write(self.folder / f"{stem}.json", json.dumps({"error": content}))
            return
        records = {"config": {k: _plain(dict(v)) for k, v in content.config_records.items()},
                   "metric": {k: _plain(dict(v)) for k, v in content.metric_records.items()}}
        atomic_write(self.folder / f"{stem}.json", json.dumps(records))
        arrays = {f"{g}/{n}": a.numpy() for g, rec in content.array_records.items() for n, a in rec.items()}
        with atomic_path(self.folder / f"{stem}.npz", suffix=".npz") as tmp:
            np.savez(tmp, **arrays)


def _plain(value):
    """Record values -> JSON (bytes as {"__bytes__": base64})."""
    import base64

    if isinstance(value, bytes):
        return {"__bytes__": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
