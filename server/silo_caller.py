"""How the pipeline reaches its silos after the handshake: one request per silo, every reply validated and
stored as soon as it arrives, failures retried (after re-learning handles), then the silo dropped, named with
the stage and the reason in the run state; bytes each way counted per silo."""

from __future__ import annotations

import logging
from typing import Callable

from server.transport import Outcome, Transport

log = logging.getLogger("server.pipeline")


class PipelineError(RuntimeError):
    """The run cannot go on (too few silos, bad run directory, ...). The message says why."""


class SiloCaller:
    """`state` is the run state (checkpoint dict: domains, dropped, bytes), shared with the pipeline.
    `timeout(stage, requests)` sizes a stage's wait; `rehandshake(domains)` re-learns handles before a retry;
    `save()` writes the checkpoint."""

    def __init__(self, transport: Transport, state: dict, *, retries: int, min_silos: int, save: Callable[[], None],
                 timeout: Callable[[str, dict], float], rehandshake: Callable[[set[str]], None]):
        self.t, self.state = transport, state
        self.retries, self.min_silos = retries, min_silos
        self.save, self.timeout, self.rehandshake = save, timeout, rehandshake
        self.handles: dict[str, str] = {}  # domain -> transport handle (re-learned at every start)

    def active(self) -> list[str]:
        dropped = {d["domain"] for d in self.state["dropped"]}
        return [d for d in self.state["domains"] if d not in dropped]

    def drop(self, domain: str, stage: str, reason: str) -> None:
        log.error("dropping silo %s at stage %s: %s", domain, stage, reason)
        self.state["dropped"].append({"domain": domain, "stage": stage, "reason": reason})
        left = self.active()
        if len(left) < self.min_silos:
            self.save()
            raise PipelineError(f"only {len(left)} silo(s) left ({', '.join(left) or 'none'}) after dropping "
                                 f"{domain} at {stage}: {reason}; min-silos is {self.min_silos}")

    def note_drop(self, silo: str, stage: str, reason: str) -> None:
        """Record a silo that is not part of the run without passing the handshake."""
        if not any(d["domain"] == silo and d["stage"] == stage for d in self.state["dropped"]):
            self.state["dropped"].append({"domain": silo, "stage": stage, "reason": reason})

    def count(self, o: Outcome, domain: str) -> None:
        b = self.state["bytes"].setdefault(domain, {"sent_to_silo": 0, "received_from_silo": 0})
        b["sent_to_silo"] += o.bytes_down
        b["received_from_silo"] += o.bytes_up

    def _accept(self, stage: str, d: str, o: Outcome, attempt: int, validate, store, results: dict,
                failed: dict) -> None:
        self.count(o, d)
        err = o.error
        if err is None and validate is not None:
            try:
                validate(d, o)
            except Exception as exc:  # a reply that breaks a check is the silo's failure, never a crash
                err = f"invalid reply: {exc}" if isinstance(exc, ValueError) else \
                    f"invalid reply: {type(exc).__name__} while checking it"
        if err is None:
            results[d] = o
            log.info("%s: silo %s replied (%.2f MB)", stage, d, o.bytes_up / 1e6)
            if store is not None:
                store(d, o)
        else:
            log.warning("%s: silo %s failed (attempt %d): %s", stage, d, attempt + 1, err)
            failed[d] = err

    def ask(self, stage: str, message_type: str, requests: dict, reply_type, validate=None, store=None) -> dict:
        """requests: domain -> (header, arrays). Each reply is validated completely (`validate` raises
        ValueError) and stored (`store`) as soon as it arrives, so a crash loses only unfinished silos.
        Failures (error replies, invalid replies) are retried, then the silo is dropped. Returns domain ->
        Outcome of the silos that answered well."""
        results, todo, failed = {}, dict(requests), {}
        for attempt in range(self.retries + 1):
            if not todo:
                break
            failed.clear()
            handles = {self.handles[d]: d for d in todo if d in self.handles}

            def on_reply(h: str, o: Outcome, attempt=attempt, handles=handles) -> None:
                d = handles.get(h)
                if d is not None and d not in results and d not in failed:
                    self._accept(stage, d, o, attempt, validate, store, results, failed)

            outcomes = self.t.call(message_type, {h: todo[d] for h, d in handles.items()}, reply_type,
                                   self.timeout(stage, requests), on_reply=on_reply)
            for h, o in outcomes.items():  # transports that do not report replies one by one
                on_reply(h, o)
            for d in set(todo) - set(handles.values()):
                failed[d] = "silo not connected"
            for d in set(todo) - set(results) - set(failed):
                failed[d] = "no reply"
            todo = {d: todo[d] for d in failed}
            if todo and attempt < self.retries:
                self.rehandshake(set(todo))
        for d in todo:
            self.drop(d, stage, failed[d])
        return results
