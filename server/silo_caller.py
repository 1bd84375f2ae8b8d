"""How the pipeline reaches its silos after the handshake: one request per silo, every reply validated and
stored as soon as it arrives, failures retried (after re-learning handles), then the silo dropped, named with
the stage and the reason in the run state; bytes each way counted per silo."""

from __future__ import annotations

import logging
from typing import Callable

from server.checkpoint import Checkpoint, Dropped
from server.transport import Outcome, Transport

log = logging.getLogger("server.pipeline")
MAX_REASON = 300  # characters of a drop reason: every reason is the server's text, this caps it all the same


class PipelineError(RuntimeError):
    """The run cannot go on (too few silos, bad run directory, ...). The message says why."""


class SiloCaller:
    """`state` is the run state (domains, dropped, bytes), shared with the pipeline. `timeout(stage, requests)`
    sizes a stage's wait; `rehandshake(domains)` re-learns handles before a retry; `save()` writes the
    checkpoint. `handles` (domain -> transport handle) is re-learned at every start."""

    def __init__(self, transport: Transport, state: Checkpoint, *, retries: int, min_silos: int,
                 save: Callable[[], None], timeout: Callable[[str, dict], float],
                 rehandshake: Callable[[set[str]], None] | None = None):
        self.t, self.state = transport, state
        self.retries, self.min_silos = retries, min_silos
        self.save, self.timeout, self.rehandshake = save, timeout, rehandshake
        self.handles: dict[str, str] = {}

    def active(self) -> list[str]:
        return self.state.active()

    def drop(self, domain: str, stage: str, reason: str) -> None:
        reason = reason[:MAX_REASON]
        log.error("dropping silo %s at stage %s: %s", domain, stage, reason)
        self.state.dropped.append(Dropped(domain=domain, stage=stage, reason=reason))
        left = self.active()
        if len(left) < self.min_silos:
            self.save()
            raise PipelineError(f"only {len(left)} silo(s) left ({', '.join(left) or 'none'}) after dropping "
                                 f"{domain} at {stage}: {reason}; min-silos is {self.min_silos}")

    def note_drop(self, silo: str, stage: str, reason: str) -> None:
        """Record a silo that is not part of the run without passing the handshake."""
        reason = reason[:MAX_REASON]
        if not self.state.is_dropped(silo, stage):
            self.state.dropped.append(Dropped(domain=silo, stage=stage, reason=reason))

    def count(self, o: Outcome, domain: str) -> None:
        self.state.count_bytes(domain, o.bytes_down, o.bytes_up)

    def call_once(self, message_type: str, requests: dict, reply_type, timeout: float) -> dict[str, Outcome | str]:
        """One attempt, no retry and no drop (the caller decides): domain -> Outcome, or the failure text for
        a silo that is not connected or did not answer. Bytes are counted."""
        by_handle = {self.handles[d]: d for d in requests if d in self.handles}
        outcomes = self.t.call(message_type, {h: requests[d] for h, d in by_handle.items()}, reply_type, timeout)
        out: dict[str, Outcome | str] = {}
        for h, o in outcomes.items():
            if h in by_handle:
                self.count(o, by_handle[h])
                out[by_handle[h]] = o
        for d in requests:
            out.setdefault(d, "silo not connected" if d not in by_handle.values() else "no reply")
        return out

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
            err = err[:MAX_REASON]
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
            if todo and attempt < self.retries and self.rehandshake is not None:
                self.rehandshake(set(todo))
        for d in todo:
            self.drop(d, stage, failed[d])
        return results
