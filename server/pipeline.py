"""The MergeRec stages on the server side, each a small function, checkpointed in a run directory.

handshake -> finetune -> weave -> merge_init -> pseudo_users -> teacher -> coefficients -> integration -> evaluate
-> artifacts (optional: weave, server/weaving.py; integration, X-Cross-style, server/integration_stage.py)

The transport (server/transport.py) is Flower or in-process; the stages do not care. After each stage the
state is written to `run_dir/checkpoint.json` (+ files), so starting again with the same run directory
resumes after the last completed stage (silos that already fine-tuned are not asked again: their task
vectors are read back). A silo that errors or does not answer is retried `retries` times, then dropped for
the rest of the run if at least `min_silos` remain; the report says which, where and why. The merged models
(computing, caching in merges/, evaluating at the silos) are the `MergeStore` mixin's (server/merge_store.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from safetensors.torch import load_file, save_file

from common.model.backbones import build_backbone, shared_state
from common.core.strict import Strict
from common.model.config import BackboneConfig, TrainConfig
from common.data.format import CatalogView, ItemMeta, load_catalog
from common.core.files import atomic_path, atomic_write
from common.model.integration import IntegrationConfig
from common.model.coefficients import CoefficientConfig
from common.merging.pseudo_users import select_pseudo_users
from common.model.lora import dense_bytes
from common.core.fingerprint import fingerprint
from common.protocol.messages import (
    MIN_USERS_FOR_METRICS,
    FINETUNE,
    HANDSHAKE,
    TEACHER,
    FinetuneReply,
    FinetuneRequest,
    HandshakeReply,
    BaseSpec,
    HandshakeRequest,
    TeacherReply,
    TeacherRequest,
)
from server.config import PipelineConfig
from server.merge_store import MergeStore
from server.silo_caller import PipelineError, SiloCaller
from server.transport import Transport
from server import checkpoint, weaving
from server.limits import stage_timeout
from server.validation import check_config, check_finetune, check_teacher, silo_name, state_norm

log = logging.getLogger(__name__)

STAGES = checkpoint.STAGES




class Pipeline(MergeStore):
    def __init__(self, transport: Transport, cfg: PipelineConfig, run_dir: str | Path,
                 expected: list[str] | None = None):
        self.t = transport
        self.expected = list(expected or [])  # domains that must take part: each one missing is reported
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_path = self.run_dir / "checkpoint.json"
        self.state = self._load_checkpoint()
        self.base = build_backbone(cfg.backbone, seed=cfg.seed)
        self.base_state = shared_state(self.base)
        self.base_fp = fingerprint(self.base_state)
        self.base_norm = state_norm(self.base_state)
        self.shapes = {n: tuple(t.shape) for n, t in self.base_state.items()}
        self.spec = BaseSpec(backbone=cfg.backbone, seed=cfg.seed, fingerprint=self.base_fp)
        self.lora, self.base_bytes = weaving.lora_spec(cfg, self.shapes), dense_bytes(self.base_state)
        self.catalogs: dict[str, CatalogView] = {}
        self.calls = SiloCaller(transport, self.state, retries=cfg.retries, min_silos=cfg.min_silos,
                                save=self._save, timeout=self._timeout, rehandshake=self._rehandshake)

    # ---------------------------------------------------------------- checkpoint & bookkeeping
    def _load_checkpoint(self) -> dict:
        try:
            st = checkpoint.load(self.ckpt_path, self.cfg)
        except checkpoint.CheckpointError as exc:
            raise PipelineError(str(exc)) from None
        if st["completed"]:
            log.info("resuming %s after stage(s): %s", self.run_dir, ", ".join(st["completed"]))
        return st

    def _record(self, path: Path) -> None:
        """Remember the SHA-256 of a file a later stage or a resume reads back (checked on resume)."""
        checkpoint.record(self.state, self.run_dir, path)

    def _save(self) -> None:
        """The run state goes to disk only as a valid, versioned Checkpoint (server/checkpoint.py)."""
        atomic_write(self.ckpt_path, checkpoint.Checkpoint.model_validate(self.state).model_dump_json(indent=1))

    def _done(self, stage: str, seconds: float) -> None:
        self.state["completed"].append(stage)
        self.state["timings"][stage] = round(self.state["timings"].get(stage, 0.0) + seconds, 3)
        self._save()
        log.info("stage %s done in %.1fs", stage, seconds)

    def active(self) -> list[str]:
        return self.calls.active()

    def _timeout(self, stage: str, requests: dict) -> float:
        first = next(iter(requests.values()), (None, {}))
        return stage_timeout(stage, self.cfg.timeout_s, max_items=max(map(len, self.catalogs.values()), default=0),
                             epochs=self.cfg.train.epochs + (self.cfg.train.final_fit_epochs or 0),
                             refit=self.cfg.train.refits, models=len(first[1]))

    # ---------------------------------------------------------------- stages
    def handshake(self) -> None:
        """Ask every reachable silo for its domain, catalog size and base fingerprint; refuse other bases."""
        t0 = time.perf_counter()
        resumed = bool(self.state["domains"])
        handles = self.t.silos()
        want_catalog = self.cfg.catalog_root is None
        req = HandshakeRequest(base=self.spec, send_catalog=want_catalog)
        outcomes = self.t.call(HANDSHAKE, {h: (req, {}) for h in handles}, HandshakeReply,
                               stage_timeout("handshake", self.cfg.timeout_s))
        found: dict[str, HandshakeReply] = {}
        for h, o in outcomes.items():
            if o.error:
                log.warning("handshake: silo %s failed: %s", h, o.error)
                self.calls.note_drop(silo_name(h, o.error), "handshake", o.error)
                continue
            r: HandshakeReply = o.header
            if r.base_fingerprint != self.base_fp:
                msg = (f"silo {r.domain} uses base model {r.base_fingerprint[:16]} but the server's base is "
                       f"{self.base_fp[:16]}: refused")
                log.error(msg)
                self.calls.note_drop(r.domain, "handshake", msg)
                continue
            if r.domain in found:
                raise PipelineError(f"two silos report domain {r.domain!r}: domain names must be unique")
            found[r.domain] = r
            self.calls.handles[r.domain] = h
            self.calls.count(o, r.domain)
        for d in self.expected:
            if d not in found and not any(x["domain"] == d for x in self.state["dropped"]):
                self.calls.note_drop(d, "handshake", "expected silo did not answer the handshake")
        for domain, r in list(found.items()):
            try:  # a catalog that does not match its fingerprint or size is that silo's failure
                self.catalogs[domain] = self._catalog(domain, r)
            except (PipelineError, ValueError) as exc:
                self.calls.note_drop(domain, "handshake", f"invalid reply: {exc}")
                del found[domain]
        if resumed:
            missing = [d for d in self.active() if d not in found]
            for d in missing:
                self.calls.drop(d, "handshake", "did not reconnect after the server restarted")
        else:
            self.state["domains"] = sorted(found)
        if len(self.active()) < self.cfg.min_silos:
            raise PipelineError(f"{len(self.active())} silo(s) passed the handshake "
                                f"({', '.join(self.active()) or 'none'}); min-silos is {self.cfg.min_silos}")
        self.state["timings"]["handshake"] = round(time.perf_counter() - t0, 3)
        self._save()
        log.info("handshake: silos %s on base %s", ", ".join(self.active()), self.base_fp[:16])

    def _rehandshake(self, domains: set[str]) -> None:
        """Before a retry: re-learn handles (a restarted SuperNode has a new node id)."""
        req = HandshakeRequest(base=self.spec)
        outcomes = self.t.call(HANDSHAKE, {h: (req, {}) for h in self.t.silos()}, HandshakeReply,
                               min(stage_timeout("handshake", self.cfg.timeout_s), 120.0))
        for h, o in outcomes.items():
            if o.error is None and o.header.domain in domains and o.header.base_fingerprint == self.base_fp:
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

    def _tv_path(self, domain: str) -> Path:
        return self.run_dir / "task_vectors" / f"{domain}.safetensors"

    def finetune(self) -> None:
        t0 = time.perf_counter()
        todo = [d for d in self.active() if not self._tv_path(d).exists()]
        if len(todo) < len(self.active()):
            log.info("finetune: reusing task vectors of %s", ", ".join(sorted(set(self.active()) - set(todo))))
        req = FinetuneRequest(base=self.spec, train=self.cfg.train)

        def validate(domain, o):
            check_finetune(o.header, o.arrays, domain=domain, base_fp=self.base_fp, shapes=self.shapes,
                           base_norm=self.base_norm, max_ratio=self.cfg.max_task_vector_ratio, lora=self.lora,
                           base_state=self.base_state)

        def store(d, o):  # as soon as the reply is validated: a crash later loses only unfinished silos
            with atomic_path(self._tv_path(d)) as tmp:
                save_file(weaving.received_task_vector(self, d, o), str(tmp))
            self._record(self._tv_path(d))
            self.state["val"][d] = o.header.val.model_dump()
            self.state["finetune"][d].update({"epochs": o.header.epochs, "refit_epochs": o.header.refit_epochs,
                                              "seconds": round(o.header.seconds, 2)})
            for h in o.header.history:  # the silo's per-epoch progress, in the ServerApp's log in any deployment
                log.info("finetune: silo %s epoch %d loss %s val NDCG@10 %.4f", d, h.epoch,
                         "-" if h.loss is None else f"{h.loss:.4f}", h.val_ndcg10)
            log.info("finetune: silo %s fine-tuned %d epoch(s) (final fit %d) in %.1fs, validation NDCG@10 %.4f",
                     d, o.header.epochs, o.header.refit_epochs, o.header.seconds, o.header.val.values["ndcg@10"])
            self._save()

        self.calls.ask("finetune", FINETUNE, {d: (req, {}) for d in todo}, FinetuneReply, validate, store)
        self._done("finetune", time.perf_counter() - t0)

    def task_vectors(self, domains: list[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """The vectors merges use: the fine-tuned ones, or the woven LoRA modules once the weave stage ran."""
        domains = self.active() if domains is None else domains
        if self.cfg.weave_rounds and "weave" in self.state["completed"]:
            return weaving.woven_task_vectors(self, domains)
        return {d: load_file(str(self._tv_path(d))) for d in domains}

    def weave(self) -> None:
        """Optional stage (weave-rounds > 0): LoRA modules travel the ring of silos (server/weaving.py)."""
        t0 = time.perf_counter()
        weaving.run_weave(self)
        self._done("weave", time.perf_counter() - t0)

    def merge_init(self) -> None:
        """Every training-free merge of the configured baselines, computed once and stored in merges/."""
        t0 = time.perf_counter()
        for name in self.cfg.baselines:
            self.state["files"].pop(f"merges/{name}.safetensors", None)  # recomputed: the vectors may have changed
        for name, state in self.merged_states(methods=list(self.cfg.baselines)).items():
            self._store_merge(name, state, self.active())
        self._done("merge_init", time.perf_counter() - t0)

    def _dom(self, domain: str):
        return self.base.domain_inputs(self.catalogs[domain])

    def pseudo_users(self) -> None:
        t0 = time.perf_counter()
        chosen = {}
        for d in self.active():
            dom = self._dom(d)
            feats = dom.features if dom.features is not None else None
            ids = select_pseudo_users(dom.num_items, self.cfg.pseudo_users, n=self.cfg.pseudo_users_n,
                                      item_embeddings=feats, seed=self.cfg.seed)
            chosen[d] = ids.tolist()
        atomic_write(self.run_dir / "pseudo_users.json", json.dumps(chosen))
        self._record(self.run_dir / "pseudo_users.json")
        self._done("pseudo_users", time.perf_counter() - t0)

    def _teacher_path(self, domain: str) -> Path:
        return self.run_dir / "teacher" / f"{domain}.npz"

    def teacher(self) -> None:
        t0 = time.perf_counter()
        chosen = json.loads((self.run_dir / "pseudo_users.json").read_text())
        todo = [d for d in self.active() if not self._teacher_path(d).exists()]
        reqs = {d: (TeacherRequest(base=self.spec, pseudo_item_ids=chosen[d], top_k=self.cfg.teacher_top_k), {}) for d in todo}

        def validate(domain, o):
            check_teacher(o.header, o.arrays, domain=domain, rows=len(chosen[domain]),
                          num_items=len(self.catalogs[domain]), top_k=self.cfg.teacher_top_k)

        def store(d, o):
            with atomic_path(self._teacher_path(d), suffix=".npz") as tmp:
                np.savez(tmp, **o.arrays["teacher"])
            self._record(self._teacher_path(d))
            self._save()

        self.calls.ask("teacher", TEACHER, reqs, TeacherReply, validate, store)
        self._done("teacher", time.perf_counter() - t0)

    def coefficients(self) -> None:
        t0 = time.perf_counter()
        domains = sorted(self.active())
        learned = {}
        for gran in self.cfg.granularities:
            res, merged = self.learn(domains, self.cfg.coefficients.model_copy(update={"granularity": gran}))
            self._store_merge(f"mergerec-{gran}", merged, domains)
            learned[gran] = {"domains": domains, "groups": list(res.groups), "W": res.W.tolist(),
                             "final_loss": res.history[-1]["loss"] if res.history else None,
                             "history": res.history, "holdout": res.holdout}
        atomic_write(self.run_dir / "coefficients.json", json.dumps(learned, indent=1))
        self._record(self.run_dir / "coefficients.json")
        self._done("coefficients", time.perf_counter() - t0)

    def integration(self) -> None:
        """Optional stage: train an integrated model's gates (server/integration_stage.py)."""
        from server import integration_stage

        t0 = time.perf_counter()
        integration_stage.run(self)
        self._done("integration", time.perf_counter() - t0)

    def evaluate(self) -> None:
        t0 = time.perf_counter()
        from server.integration_stage import candidates

        models = self.candidate_models()
        metrics = self.evaluate_at(models, self.active(), integrated=candidates(self))
        for d, per in sorted(metrics.items()):
            log.info("evaluate: silo %s test NDCG@10: %s", d, ", ".join(f"{m} {v['values']['ndcg@10']:.4f}"
                                                                      for m, v in per.items() if "-" in m))
        atomic_write(self.run_dir / "metrics.json", json.dumps(metrics, indent=1))
        self._record(self.run_dir / "metrics.json")
        # validation split of the MergeRec variants: what picks the shipped model (never the test split)
        variants = {m: st for m, st in models.items() if m.startswith("mergerec-")}
        val_metrics = self.evaluate_at(variants, self.active(), split="val")
        atomic_write(self.run_dir / "metrics_val.json", json.dumps(val_metrics, indent=1))
        self._record(self.run_dir / "metrics_val.json")
        self._done("evaluate", time.perf_counter() - t0)

    def artifacts(self) -> dict:
        """The shipped model folder (the better MergeRec variant on validation), report.json, report.md, plots."""
        from server.artifacts import write_artifacts

        t0 = time.perf_counter()
        report = write_artifacts(self)
        self.state["timings"]["artifacts"] = round(time.perf_counter() - t0, 3)
        if "artifacts" not in self.state["completed"]:
            self._done("artifacts", time.perf_counter() - t0)
        return report

    # ---------------------------------------------------------------- driver
    def run(self) -> dict:
        """All stages not yet completed. Holds an exclusive lock on the run directory meanwhile (released when
        the process ends, however it ends), so a second ServerApp on the same directory fails at once."""
        import fcntl

        with open(self.run_dir / ".lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise PipelineError(f"run directory {self.run_dir} is in use by another running pipeline: "
                                    "wait for it, stop it (flwr stop), or use another run-dir") from None
            self.handshake()
            checkpoint.verify_run(self)
            for name, stage in self.stages():
                if name in self.state["completed"] and name != "artifacts":
                    continue
                log.info("stage %s (silos: %s)", name, ", ".join(self.active()))
                result = stage()
            return result

    def stages(self) -> list[tuple[str, Callable[[], object]]]:
        """The stages after the handshake, in order; their names are the checkpoint's (server/checkpoint.py)."""
        order = [("finetune", self.finetune), ("weave", self.weave), ("merge_init", self.merge_init),
                 ("pseudo_users", self.pseudo_users), ("teacher", self.teacher), ("coefficients", self.coefficients),
                 ("integration", self.integration), ("evaluate", self.evaluate),
                 ("artifacts", self.artifacts)]
        assert [n for n, _ in order] == STAGES[1:], "stage list and checkpoint.STAGES disagree"
        return order
