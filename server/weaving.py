"""Weaving (data-isolated WeaveRec) between fine-tuning and merging (LoRA task vectors: server/task_vectors.py).

Weaving (weave-rounds = R > 0): each domain's LoRA module travels a fixed ring of the silos (sorted domain
names). In round r every module moves to the next live silo after the one that last trained it, which trains
it `weave-epochs` epochs on its own train + validation items starting from base + module and returns the
updated factors (WeaveRequest / WeaveReply, validated like a fine-tuning reply). A module never hops onto the
silo that holds it; one silo trains at most one module per call, so a round is one call when all are live.
A silo that fails a hop (error, invalid reply, no reply) is out of the weave: the module keeps its factors and
moves on to the next live silo in the same round; the silo itself stays in the run (its teacher and
evaluation are unaffected). After R rounds the woven modules (`woven/<domain>.safetensors`) replace the task
vectors for merging (`TaskVectors.load`). Each round is checkpointed: a resumed run continues after the last
stored round (from scratch when a stored module is missing or changed, or weave-epochs changed).

Privacy: a hop shows domain d's LoRA module to another silo (as merged models are shown to every silo); no
user data moves, and every hop's messages go through the same contracts and recorded-message checks.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from common.protocol.messages import WEAVE, WeaveReply, WeaveRequest
from server.base import BaseContext
from server.checkpoint import Checkpoint, WeaveHop, WeaveSkip, WeaveState
from server.limits import stage_timeout
from server.run_dir import RunDir
from server.silo_caller import SiloCaller
from server.validation import check_weave

log = logging.getLogger("server.pipeline")


def _next_live(ring: list[str], live: set[str], after: str) -> str | None:
    i = ring.index(after)
    return next((ring[(i + k) % len(ring)] for k in range(1, len(ring) + 1) if ring[(i + k) % len(ring)] in live),
                None)


class Weaver:
    """The weave stage over the run's stored LoRA modules; progress in `state.weave`, modules in woven/."""

    def __init__(self, cfg, run: RunDir, state: Checkpoint, base: BaseContext, calls: SiloCaller):
        self.cfg, self.run, self.state, self.base, self.calls = cfg, run, state, base, calls

    def _resume(self, ring: list[str]) -> tuple[WeaveState, dict[str, dict[str, np.ndarray]]]:
        """(weave state, modules): continue a stored weave when its files are intact, else start from lora/."""
        st = self.state.weave
        if st and st.epochs == self.cfg.weave_epochs and st.rounds <= self.cfg.weave_rounds:
            if all(self.run.intact(self.state, self.run.woven(d)) for d in ring):
                log.info("weave: resuming after round %d", st.rounds)
                return st, {d: self.run.read_arrays(self.run.woven(d)) for d in ring}
        st = WeaveState(epochs=self.cfg.weave_epochs, holders={d: d for d in ring})
        self.state.weave = st
        return st, {d: self.run.read_arrays(self.run.lora(d)) for d in ring}

    def _hop(self, r: int, batch: dict[str, str], modules: dict, st: WeaveState) -> dict[str, str | None]:
        """One call: module -> silo (distinct silos). Returns module -> None (accepted) or the failure reason."""
        reqs = {s: (WeaveRequest(base=self.base.spec, train=self.cfg.train, module=m, round=r,
                                 epochs=self.cfg.weave_epochs), {"lora": modules[m]}) for m, s in batch.items()}
        timeout = stage_timeout("finetune", self.cfg.timeout_s, max_items=self.base.max_items(),
                                epochs=self.cfg.weave_epochs, refit=False)
        got = self.calls.call_once(WEAVE, reqs, WeaveReply, timeout)
        result = {}
        for m, s in batch.items():
            o = got[s]
            err = o if isinstance(o, str) else o.error
            if err is None:
                try:
                    check_weave(o.header, o.arrays, domain=s, base_fp=self.base.fingerprint, module=m, round_=r,
                                lora=self.base.lora, base_state=self.base.state, base_norm=self.base.norm,
                                max_ratio=self.cfg.max_task_vector_ratio, epochs=self.cfg.weave_epochs)
                except Exception as exc:  # a bad reply is that silo's failure, never a crash
                    err = f"invalid reply: {exc}" if isinstance(exc, ValueError) else \
                        f"invalid reply: {type(exc).__name__}"
            if err is None:
                modules[m] = o.arrays["lora"]
                st.hops.append(WeaveHop(round=r, module=m, silo=s, seconds=round(o.header.seconds, 2)))
                log.info("weave: round %d, module %s trained by silo %s", r, m, s)
            else:
                log.warning("weave: round %d, silo %s failed on module %s: %s; it is out of the weave", r, s, m, err)
                st.skipped.append(WeaveSkip(domain=s, round=r, module=m, reason=err))
            result[m] = err
        return result

    def _round(self, r: int, ring: list[str], modules: dict, st: WeaveState) -> None:
        """Every module one hop further along the ring (skipping silos out of the weave); then checkpointed."""
        out = {x.domain for x in st.skipped}
        live = {s for s in ring if s not in out and s in self.state.active()}
        cursor, pending = dict(st.holders), set(modules)
        while pending:
            batch: dict[str, str] = {}
            for m in sorted(pending):
                target = _next_live(ring, live, cursor[m])
                if target is None or target == st.holders[m]:
                    pending.discard(m)  # nowhere else to go this round: the module stays
                elif target not in batch.values():
                    batch[m] = target
            for m, err in (self._hop(r, batch, modules, st) if batch else {}).items():
                if err is None:
                    st.holders[m] = batch[m]
                    pending.discard(m)
                else:
                    live.discard(batch[m])
                    cursor[m] = batch[m]
        for d in ring:
            self.run.write_arrays(self.state, self.run.woven(d), modules[d])
        st.rounds = r
        self.run.save(self.state)

    def run_stage(self) -> None:
        """The weave stage (see the module docstring); a no-op when weave-rounds is 0."""
        if not self.cfg.weave_rounds:
            return
        t0 = time.perf_counter()
        ring = sorted(self.state.active())
        st, modules = self._resume(ring)
        for r in range(st.rounds + 1, self.cfg.weave_rounds + 1):
            self._round(r, ring, modules, st)
        log.info("weave: %d round(s), %d hop(s), %d silo(s) skipped in %.1fs", st.rounds, len(st.hops),
                 len({x.domain for x in st.skipped}), time.perf_counter() - t0)
