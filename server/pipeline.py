"""The MergeRec stages on the server side: the stage list and the driver. The work is done by parts that each
get exactly what they need:

    RunDir (server/run_dir.py)          every path, atomic writes, SHA-256 record, the directory lock
    Checkpoint (server/checkpoint.py)   the typed run state, written after every step worth keeping
    BaseContext (server/base.py)        the base model, its fingerprint/spec, the catalogs from the handshake
    SiloCaller (server/silo_caller.py)  requests, validation on arrival, retries, drops, bytes
    TaskVectors (server/task_vectors.py), Weaver (server/weaving.py), Merges (server/merges.py),
    Integration (server/integration_stage.py), write_artifacts (server/artifacts.py)

handshake -> finetune -> weave -> merge_init -> pseudo_users -> teacher -> coefficients -> integration -> fedavg
-> evaluate -> artifacts (weave, integration and fedavg are optional; strategy = fedavg from the base skips the
merge stages, FedAvg (server/fedavg.py) then being the whole training). The transport (server/transport.py) is Flower or in-process;
the stages do not care. Starting again with the same run directory resumes after the last completed stage
(silos that already fine-tuned are not asked again). A silo that errors or does not answer is retried
`retries` times, then dropped for the rest of the run if at least `min_silos` remain; the report says which,
where and why.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable


from common.data.format import CatalogView, ItemMeta, load_catalog
from common.merging.pseudo_users import select_pseudo_users
from common.protocol.messages import (
    FINETUNE,
    HANDSHAKE,
    TEACHER,
    FinetuneReply,
    FinetuneRequest,
    HandshakeReply,
    HandshakeRequest,
    TeacherReply,
    TeacherRequest,
)
from server import checkpoint
from server.artifacts import shipping_candidates, write_artifacts
from server.base import BaseContext, ConfigProblem
from server.fedavg import FedAvg
from server.config import PipelineConfig
from server.integration_stage import Integration
from server.limits import stage_timeout
from server.merges import Merges
from server.run_dir import RunDir, RunDirBusy
from server.silo_caller import PipelineError, SiloCaller
from server.stored_files import StoredFileCheck
from server.task_vectors import TaskVectors
from server.transport import Transport
from server.validation import check_finetune, check_teacher
from server.weaving import Weaver

log = logging.getLogger(__name__)

STAGES = checkpoint.STAGES


class Pipeline:
    def __init__(self, transport: Transport, cfg: PipelineConfig, run_dir: str | Path,
                 expected: list[str] | None = None):
        self.t = transport
        self.expected = list(expected or [])  # domains that must take part: each one missing is reported
        self.cfg = cfg
        self.rundir = RunDir(run_dir)
        try:
            self.state = self.rundir.load(cfg)
        except checkpoint.CheckpointError as exc:
            raise PipelineError(str(exc)) from None
        if self.state.completed:
            log.info("resuming %s after stage(s): %s", self.rundir.root, ", ".join(self.state.completed))
        try:
            self.base = BaseContext.build(cfg)
        except ConfigProblem as exc:
            raise PipelineError(str(exc)) from None
        self.calls = SiloCaller(transport, self.state, retries=cfg.retries, min_silos=cfg.min_silos,
                                save=self.save, timeout=self._timeout, rehandshake=self._rehandshake)
        self.vectors = TaskVectors(cfg, self.rundir, self.state, self.base)
        self.merges = Merges(cfg, self.rundir, self.state, self.base, self.vectors, self.calls)
        self.weaver = Weaver(cfg, self.rundir, self.state, self.base, self.calls)
        self.xcross = Integration(cfg, self.rundir, self.state, self.base, self.merges, self.calls)
        self.fed = FedAvg(cfg, self.rundir, self.state, self.base, self.calls)

    # ---------------------------------------------------------------- bookkeeping
    @property
    def run_dir(self) -> Path:
        return self.rundir.root

    def save(self) -> None:
        self.rundir.save(self.state)

    def active(self) -> list[str]:
        return self.state.active()

    def _done(self, stage: str, seconds: float) -> None:
        self.state.completed.append(stage)
        self.state.add_time(stage, seconds)
        self.save()
        log.info("stage %s done in %.1fs", stage, seconds)

    def _timeout(self, stage: str, requests: dict) -> float:
        first = next(iter(requests.values()), (None, {}))
        epochs = self.cfg.fedavg.local_epochs if stage == "fedavg" else \
            self.cfg.train.epochs + (self.cfg.train.final_fit_epochs or 0)
        return stage_timeout(stage, self.cfg.timeout_s, max_items=self.base.max_items(), epochs=epochs,
                             refit=self.cfg.train.refits, models=len(first[1]))

    # ---------------------------------------------------------------- stages
    def handshake(self) -> None:
        """Ask every reachable silo for its domain, catalog size and base fingerprint; refuse other bases."""
        t0 = time.perf_counter()
        resumed = bool(self.state.domains)
        req = HandshakeRequest(base=self.base.spec, send_catalog=self.cfg.catalog_root is None)
        outcomes = self.t.call(HANDSHAKE, {h: (req, {}) for h in self.t.silos()}, HandshakeReply,
                               stage_timeout("handshake", self.cfg.timeout_s))
        found: dict[str, HandshakeReply] = {}
        for h, o in outcomes.items():
            if o.error:  # named by its handle: an error reply's text is the server's (error_text), never the silo's
                log.warning("handshake: silo %s failed: %s", h, o.error)
                self.calls.note_drop(h, "handshake", o.error)
                continue
            r: HandshakeReply = o.header
            if r.base_fingerprint != self.base.fingerprint:
                msg = (f"silo {r.domain} uses base model {r.base_fingerprint[:16]} but the server's base is "
                       f"{self.base.fingerprint[:16]}: refused")
                log.error(msg)
                self.calls.note_drop(r.domain, "handshake", msg)
                continue
            if r.domain in found:
                raise PipelineError(f"two silos report domain {r.domain!r}: domain names must be unique")
            found[r.domain] = r
            self.base.users[r.domain] = r.users
            self.calls.handles[r.domain] = h
            self.calls.count(o, r.domain)
        for d in self.expected:
            if d not in found and not self.state.is_dropped(d):
                self.calls.note_drop(d, "handshake", "expected silo did not answer the handshake")
        for domain, r in list(found.items()):
            try:  # a catalog that does not match its fingerprint or size is that silo's failure
                self.base.catalogs[domain] = self._catalog(domain, r)
            except (PipelineError, ValueError) as exc:
                self.calls.note_drop(domain, "handshake", f"invalid reply: {exc}")
                del found[domain]
        if resumed:
            for d in [d for d in self.active() if d not in found]:
                self.calls.drop(d, "handshake", "did not reconnect after the server restarted")
        else:
            self.state.domains = sorted(found)
        if len(self.active()) < self.cfg.min_silos:
            raise PipelineError(f"{len(self.active())} silo(s) passed the handshake "
                                f"({', '.join(self.active()) or 'none'}); min-silos is {self.cfg.min_silos}")
        self.state.timings["handshake"] = round(time.perf_counter() - t0, 3)
        self.save()
        log.info("handshake: silos %s on base %s", ", ".join(self.active()), self.base.fingerprint[:16])

    def _rehandshake(self, domains: set[str]) -> None:
        """Before a retry: re-learn handles (a restarted SuperNode has a new node id)."""
        req = HandshakeRequest(base=self.base.spec)
        outcomes = self.t.call(HANDSHAKE, {h: (req, {}) for h in self.t.silos()}, HandshakeReply,
                               min(stage_timeout("handshake", self.cfg.timeout_s), 120.0))
        for h, o in outcomes.items():
            if o.error is None and o.header.domain in domains and o.header.base_fingerprint == self.base.fingerprint:
                self.calls.handles[o.header.domain] = h

    def _catalog(self, domain: str, r: HandshakeReply) -> CatalogView:
        if self.cfg.catalog_root is not None:
            cat = load_catalog(self.cfg.catalog_root / domain, domain)
            if cat.fingerprint() != r.catalog_fingerprint:
                raise PipelineError(f"the server's catalog of {domain} differs from the silo's "
                                    f"({cat.fingerprint()[:12]} != {r.catalog_fingerprint[:12]})")
            if len(cat) != r.num_items:
                raise PipelineError(f"silo {domain} reports {r.num_items} items, the server's catalog has {len(cat)}")
            return cat
        if r.catalog is None:
            raise PipelineError(f"silo {domain} sent no catalog and the server has none (set catalog-root)")
        cat = CatalogView(domain=domain, item_keys=tuple(i.key for i in r.catalog),
                          items=tuple(ItemMeta(title=i.title, brand=i.brand, category=i.category) for i in r.catalog))
        if cat.fingerprint() != r.catalog_fingerprint:
            raise PipelineError(f"catalog of {domain} changed in transit")
        return cat

    def finetune(self) -> None:
        t0 = time.perf_counter()
        todo = [d for d in self.active() if not self.vectors.has(d)]
        if len(todo) < len(self.active()):
            log.info("finetune: reusing task vectors of %s", ", ".join(sorted(set(self.active()) - set(todo))))
        req = FinetuneRequest(base=self.base.spec, train=self.cfg.train)
        b = self.base

        def validate(domain, o):
            check_finetune(o.header, o.arrays, domain=domain, base_fp=b.fingerprint, shapes=b.shapes,
                           base_norm=b.norm, max_ratio=self.cfg.max_task_vector_ratio, lora=b.lora,
                           base_state=b.state, train=req.train, users=b.users.get(domain))

        def store(d, o):  # as soon as the reply is validated: a crash later loses only unfinished silos
            self.vectors.store(d, o)
            self.state.val[d] = o.header.val.model_dump()
            info = self.state.finetune[d]
            info.epochs, info.refit_epochs, info.seconds = o.header.epochs, o.header.refit_epochs, \
                round(o.header.seconds, 2)
            info.dp = o.header.dp.model_dump() if o.header.dp else None
            for h in o.header.history:  # the silo's per-epoch progress, in the ServerApp's log in any deployment
                log.info("finetune: silo %s epoch %d loss %s val NDCG@10 %.4f", d, h.epoch,
                         "-" if h.loss is None else f"{h.loss:.4f}", h.val_ndcg10)
            log.info("finetune: silo %s fine-tuned %d epoch(s) (final fit %d) in %.1fs, validation NDCG@10 %.4f",
                     d, o.header.epochs, o.header.refit_epochs, o.header.seconds, o.header.val.values["ndcg@10"])
            self.save()

        self.calls.ask("finetune", FINETUNE, {d: (req, {}) for d in todo}, FinetuneReply, validate, store)
        self._done("finetune", time.perf_counter() - t0)

    def weave(self) -> None:
        """Optional stage (weave-rounds > 0): LoRA modules travel the ring of silos (server/weaving.py)."""
        t0 = time.perf_counter()
        self.weaver.run_stage()
        self._done("weave", time.perf_counter() - t0)

    def merge_init(self) -> None:
        """Every training-free merge of the configured baselines, computed once and stored in merges/."""
        t0 = time.perf_counter()
        self.merges.forget(list(self.cfg.baselines))  # recomputed: the vectors may have changed
        for name, merged in self.merges.merged_states(methods=list(self.cfg.baselines)).items():
            self.merges.store(name, merged, self.active())
        self._done("merge_init", time.perf_counter() - t0)

    def pseudo_users(self) -> None:
        t0 = time.perf_counter()
        chosen = {}
        for d in self.active():
            dom = self.base.dom(d)
            ids = select_pseudo_users(dom.num_items, self.cfg.pseudo_users, n=self.cfg.pseudo_users_n,
                                      item_embeddings=dom.features, seed=self.cfg.seed)
            chosen[d] = ids.tolist()
        self.rundir.write_json(self.state, self.rundir.pseudo_users, chosen)
        self._done("pseudo_users", time.perf_counter() - t0)

    def teacher(self) -> None:
        t0 = time.perf_counter()
        chosen = self.rundir.read_json(self.rundir.pseudo_users)
        todo = [d for d in self.active() if not self.rundir.teacher(d).exists()]
        seen = self.cfg.train.seen_items
        reqs = {d: (TeacherRequest(base=self.base.spec, pseudo_item_ids=chosen[d], top_k=self.cfg.teacher_top_k,
                                   seen_items=seen), {}) for d in todo}

        def validate(domain, o):
            check_teacher(o.header, o.arrays, domain=domain, pseudo_item_ids=chosen[domain],
                          num_items=len(self.base.catalogs[domain]), top_k=self.cfg.teacher_top_k,
                          exclude_own=seen == "exclude")

        def store(d, o):
            self.rundir.write_arrays(self.state, self.rundir.teacher(d), o.arrays["teacher"])
            self.save()

        self.calls.ask("teacher", TEACHER, reqs, TeacherReply, validate, store)
        self._done("teacher", time.perf_counter() - t0)

    def coefficients(self) -> None:
        t0 = time.perf_counter()
        domains = sorted(self.active())
        learned = {}
        for gran in self.cfg.granularities:
            res, merged = self.merges.learn(domains, self.cfg.coefficients.model_copy(update={"granularity": gran}))
            self.merges.store(f"mergerec-{gran}", merged, domains)
            learned[gran] = {"domains": domains, "groups": list(res.groups), "W": res.W.tolist(),
                             "final_loss": res.history[-1]["loss"] if res.history else None,
                             "history": res.history, "holdout": res.holdout}
        self.rundir.write_json(self.state, self.rundir.coefficients, learned)
        self._done("coefficients", time.perf_counter() - t0)

    def integration(self) -> None:
        """Optional stage: train an integrated model's gates (server/integration_stage.py)."""
        t0 = time.perf_counter()
        self.xcross.run_stage()
        self._done("integration", time.perf_counter() - t0)

    def fedavg(self) -> None:
        """Optional stage (strategy = fedavg): rounds of federated averaging (server/fedavg.py), from the base or,
        the hybrid, from the best merged candidate."""
        t0 = time.perf_counter()
        if self.cfg.strategy == "fedavg":
            merged = None
            if self.cfg.fedavg.init == "merged":
                names = [*(f"mergerec-{g}" for g in self.cfg.granularities), *self.cfg.baselines]
                states = {**self.merges.mergerec_states(), **self.merges.merged_states()}
                merged = {n: states[n] for n in names}
            self.fed.run_stage(merged)
        self._done("fedavg", time.perf_counter() - t0)

    def merging(self) -> bool:
        """Whether the run fine-tunes and merges (every strategy but fedavg from the base)."""
        return self.cfg.strategy == "mergerec" or self.cfg.fedavg.init == "merged"

    def candidate_models(self) -> dict:
        """Every model the evaluation scores (name -> weights)."""
        models = self.merges.candidate_models() if self.merging() else {"pretrained": self.base.state}
        return {**models, **self.fed.candidates()}

    def evaluate(self) -> None:
        t0 = time.perf_counter()
        models = self.candidate_models()
        metrics = self.merges.evaluate_at(models, self.active(), integrated=self.xcross.candidates(),
                                          only_at=self.merges.own_only())
        for d, per in sorted(metrics.items()):
            log.info("evaluate: silo %s test NDCG@10: %s", d, ", ".join(f"{m} {v['values']['ndcg@10']:.4f}"
                                                                      for m, v in per.items() if "-" in m))
        self.rundir.write_json(self.state, self.rundir.metrics, metrics)
        # validation split of every merged candidate: what picks the shipped model (never the test split)
        variants = {m: models[m] for m in shipping_candidates(self.cfg)}
        self.rundir.write_json(self.state, self.rundir.metrics_val,
                            self.merges.evaluate_at(variants, self.active(), split="val"))
        self._done("evaluate", time.perf_counter() - t0)

    def artifacts(self) -> dict:
        """The shipped model folder, report.json, report.md, plots (server/artifacts.py)."""
        t0 = time.perf_counter()
        models = self.candidate_models()
        report = write_artifacts(self.cfg, self.rundir, self.state, self.base,
                                 {n: models[n] for n in shipping_candidates(self.cfg)})
        self.state.timings["artifacts"] = round(time.perf_counter() - t0, 3)
        if "artifacts" not in self.state.completed:
            self._done("artifacts", time.perf_counter() - t0)
        return report

    # ---------------------------------------------------------------- driver
    def run(self) -> dict:
        """All stages not yet completed, under the run directory's lock (a second ServerApp on the same directory
        fails at once). Returns the report."""
        try:
            with self.rundir.locked():
                self.handshake()
                self.verify_stored_files()
                result = None
                for name, stage in self.stages():
                    if name in self.state.completed and name != "artifacts":
                        continue
                    log.info("stage %s (silos: %s)", name, ", ".join(self.active()))
                    result = stage()
                return result
        except RunDirBusy as exc:
            raise PipelineError(str(exc)) from None

    def verify_stored_files(self) -> None:
        """On resume (after the handshake): every stored file of a completed stage is checked."""
        done, active = self.state.completed, self.active()
        expected = list(self.state.files)
        if "finetune" in done:
            expected += [self.rundir.rel(self.rundir.task_vector(d)) for d in active]
            if self.base.lora is not None:
                expected += [self.rundir.rel(self.rundir.lora(d)) for d in active]
        if "weave" in done and self.cfg.weave_rounds:
            expected += [self.rundir.rel(self.rundir.woven(d)) for d in active]
        if "teacher" in done:
            expected += [self.rundir.rel(self.rundir.teacher(d)) for d in active]
        expected += [f for f, s in (("pseudo_users.json", "pseudo_users"), ("coefficients.json", "coefficients"),
                                    ("metrics.json", "evaluate")) if s in done]
        # metrics_val.json is checked when recorded (runs from before it existed have none)
        self.rundir.verify(self.state, list(dict.fromkeys(expected)), StoredFileCheck(self.cfg, self.rundir, self.base))
        self.save()

    def stages(self) -> list[tuple[str, Callable[[], object]]]:
        """The stages after the handshake, in order; their names are the checkpoint's (server/checkpoint.py)."""
        order = [("finetune", self.finetune), ("weave", self.weave), ("merge_init", self.merge_init),
                 ("pseudo_users", self.pseudo_users), ("teacher", self.teacher), ("coefficients", self.coefficients),
                 ("integration", self.integration), ("fedavg", self.fedavg), ("evaluate", self.evaluate),
                 ("artifacts", self.artifacts)]
        assert [n for n, _ in order] == STAGES[1:], "stage list and checkpoint.STAGES disagree"
        if not self.merging():  # FedAvg from the base: no fine-tuning, no merges
            order = [(n, s) for n, s in order if n in ("fedavg", "evaluate", "artifacts")]
        return order
