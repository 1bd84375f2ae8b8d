"""What a domain silo does, independent of Flower: one method per message type.

A `SiloWorker` owns the domain's private data (`SiloData`, never serialisable) and its fine-tuned model.
Every method takes a validated request header (+ arrays) and returns a reply header (+ arrays) built only
from the contracts in common/protocol/messages.py. The fine-tuned weights are kept in the silo's state folder so
that a restarted silo can still answer the teacher stage without fine-tuning again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import uuid
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from common.model import lora
from common.model.backbones import Recommender, build_backbone, shared_state
from common.model.config import TrainConfig
from common.data.format import SiloData, load_silo
from common.core.files import atomic_path, atomic_write
from common.core.fingerprint import fingerprint
from common.merging.task_vectors import add_vector, state_to_numpy, task_vector
from common.merging.teacher import teacher_topk
from common.api.model_folder import ModelConfig, weights_metadata
from common.protocol.messages import (
    AggregateMetrics,
    Arrays,
    BaseSpec,
    CatalogItem,
    ContractError,
    DPGuarantee,
    EpochProgress,
    EvaluateReply,
    EvaluateRequest,
    FedRoundReply,
    FedRoundRequest,
    FinetuneReply,
    GATE_FROZEN_PREFIXES,
    GateTuneReply,
    GateTuneRequest,
    FinetuneRequest,
    HandshakeReply,
    MIN_USERS_FOR_METRICS,
    HandshakeRequest,
    TeacherReply,
    TeacherRequest,
    WeaveReply,
    WeaveRequest,
    check_state_arrays,
    fraction_users,
)
from common.model.train import evaluate, fine_tune, local_round, refit
from common.protocol.eval_policy import (
    LEDGER_RUNS,
    EvalBudgetError,
    EvalPolicy,
    data_secret,
    fixed_subsample,
    laplace_noise,
    split_seed,
)

log = logging.getLogger(__name__)



EVAL_LEDGER = "eval-budget.json"  # in the state folder: model evaluations answered per run and split


class SiloWorker:
    def __init__(self, domain: str, data_path: str | Path, state_dir: str | Path | None = None,
                 cache_dir: str | Path | None = None, base: str | Path | None = None,
                 policy: EvalPolicy | None = None):
        """base: this silo's own copy of the base checkpoint, when it lives at another path on the node than
        the server's config names (node-config `base-path`); its fingerprint must still match the server's.
        policy: which users its evaluation aggregates are over, its per-run budget and noise (default
        EvalPolicy(): every user, DEFAULT_EVAL_BUDGET, exact values). `run_key` names the run the budget counts
        for: the ClientApp sets it from Flower's run id; in-process, each worker is one run."""
        self.domain = domain
        self.policy = policy or EvalPolicy()
        self.run_key = f"in-process-{uuid.uuid4().hex[:16]}"
        self.base_override = str(base) if base else None
        self.data_path = Path(data_path)
        self.state_dir = Path(state_dir) if state_dir else Path(".cache") / "silo-state" / domain
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._silo: SiloData | None = None
        self._base: Recommender | None = None
        self._base_key = None

    # -- private helpers -------------------------------------------------------------------------
    @property
    def silo(self) -> SiloData:
        if self._silo is None:
            self._silo = load_silo(self.data_path, self.domain, min_users=MIN_USERS_FOR_METRICS)
        return self._silo

    def _base_model(self, spec: BaseSpec) -> Recommender:
        """Build (or reuse) the base model described by `spec`; its fingerprint is this silo's to report."""
        backbone = spec.backbone
        if self.cache_dir is not None:
            backbone = backbone.model_copy(update={"cache_dir": self.cache_dir / "item_embeddings"})
        if self.base_override is not None and backbone.base != "init":
            backbone = backbone.model_copy(update={"base": self.base_override})
        key = (backbone.model_dump_json(), spec.seed)
        if key != self._base_key:
            self._base = build_backbone(backbone, seed=spec.seed)
            self._base_key = key
            self._base_fp = fingerprint(shared_state(self._base))
            self._dom = self._base.domain_inputs(self.silo.catalog)
        return self._base

    def _require_base(self, spec: BaseSpec) -> Recommender:
        base = self._base_model(spec)
        if spec.fingerprint != self._base_fp:
            raise ContractError(f"silo {self.domain} builds base {self._base_fp[:16]}, the request is for "
                                f"{spec.fingerprint[:16]}")
        return base

    def _finetuned_path(self, base_fp: str) -> Path:
        return self.state_dir / f"finetuned-{base_fp[:16]}.safetensors"

    # -- evaluation: the silo's own fixed users, budget, noise (common/protocol/eval_policy.py) ------------------
    def _spend(self, split: str, models: int) -> None:
        """Count `models` evaluations of `split` against this run's budget (a ledger in the state folder, so a
        ClientApp started afresh for every message still counts them all); refuse the request when they do not
        fit. Counted before evaluating: a request that fails half-way has still been paid for."""
        if self.policy.budget is None:
            return
        path = self.state_dir / EVAL_LEDGER
        try:
            ledger = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:
            ledger = {}  # a damaged ledger: start counting again (this run's count is at least what it writes)
        runs = ledger if isinstance(ledger, dict) else {}
        run = runs.pop(self.run_key, {})  # re-inserted last: the most recent runs are kept
        used = int(run.get(split, 0)) if isinstance(run, dict) else 0
        if used + models > self.policy.budget:
            raise EvalBudgetError(f"silo {self.domain}: {split} evaluation budget spent ({used} of "
                                  f"{self.policy.budget} model evaluations this run; {models} asked)")
        runs[self.run_key] = {**(run if isinstance(run, dict) else {}), split: used + models}
        runs = dict(list(runs.items())[-LEDGER_RUNS:])
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(runs), mode=0o600)

    def _secret(self) -> bytes:
        if getattr(self, "_data_secret", None) is None:
            s = self.silo
            self._data_secret = data_secret(s.users, s.train, s.val, s.test)
        return self._data_secret

    def eval_rows(self, split: str) -> list[int]:
        """Indices into `silo.eval_split(split)` of the rows this silo always answers from (its policy's fixed
        subsample: the same for every request of the split). Silo-side only."""
        seed = self.policy.seed if self.policy.seed is not None else split_seed(self._secret(), split)
        return fixed_subsample(len(self.silo.eval_split(split)[1]), self.policy.max_users, seed)

    def _eval_rows(self, split: str) -> tuple[list[list[int]], list[int]]:
        histories, targets = self.silo.eval_split(split)
        keep = self.eval_rows(split)
        return [histories[i] for i in keep], [targets[i] for i in keep]

    def _release(self, model: Recommender, split: str, seen_items: str, weights: dict[str, np.ndarray]
                 ) -> AggregateMetrics:
        """The aggregate a silo releases for one model: exact metrics over its fixed users (ties broken with a
        fixed seed, 0), plus the policy's Laplace noise, keyed by the model's bytes."""
        histories, targets = self._eval_rows(split)
        res = evaluate(model, self._dom, histories, targets, seed=0, seen_items=seen_items)
        out = AggregateMetrics.from_result(res)
        if self.policy.epsilon is None:
            return out
        h = hashlib.sha256(self._secret() + split.encode())
        for name in sorted(weights):
            h.update(name.encode())
            h.update(np.ascontiguousarray(weights[name]).tobytes())
        return AggregateMetrics(users=out.users, values=laplace_noise(out.values, out.users, self.policy.epsilon,
                                                                      h.digest()))

    def _model_with(self, weights: dict[str, np.ndarray]) -> Recommender:
        model = copy.deepcopy(self._base)
        model.load_state_dict({n: torch.from_numpy(a) for n, a in weights.items()}, strict=False)
        return model.eval()

    # -- message handlers ------------------------------------------------------------------------
    def handshake(self, req: HandshakeRequest) -> tuple[HandshakeReply, Arrays]:
        self._base_model(req.base)
        cat = self.silo.catalog
        items = None
        if req.send_catalog:
            items = [CatalogItem(key=k, title=m.title, brand=m.brand, category=m.category)
                     for k, m in zip(cat.item_keys, cat.items)]
        return HandshakeReply(domain=self.domain, num_items=len(cat), users=self.silo.num_users,
                              catalog_fingerprint=cat.fingerprint(), base_fingerprint=self._base_fp,
                              catalog=items), {}

    def _lora_targets(self, train: TrainConfig) -> list[str]:
        """The base's parameter names the request's lora_targets select (a bad pattern is the request's fault)."""
        try:
            return lora.resolve_targets({n: tuple(p.shape) for n, p in self._base.named_parameters()},
                                        train.lora_targets)
        except ValueError as exc:
            raise ContractError(str(exc)) from None

    def finetune(self, req: FinetuneRequest) -> tuple[FinetuneReply, Arrays]:
        """One "val" evaluation of the run's budget (`_spend`: the reply's `val` and `history` are aggregates of the
        held-out users). Mode "full": sends the dense task vector. Mode "lora": trains and sends only the LoRA factors; the
        silo's own fine-tuned weights are base + the materialised delta (as the server computes it)."""
        base = self._require_base(req.base)
        self._spend("val", 1)  # its reply's val and history are aggregates over the held-out validation users
        model = copy.deepcopy(base)
        cfg = req.train
        targets = self._lora_targets(cfg) if cfg.finetune == "lora" else []
        if targets:
            lora.attach(model, targets, cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed)
        res = fine_tune(model, self.silo, self._dom, cfg)
        base_state = shared_state(base)
        if targets:
            sent = {"lora": lora.factors(model, targets)}
            tv = lora.materialise(sent["lora"], base_state, cfg.lora_rank, cfg.lora_alpha)
            state = add_vector(base_state, tv)
        else:
            state = res.state
            sent = {"task_vector": state_to_numpy(task_vector(state, base_state))}
        card = ModelConfig(backbone=req.base.backbone, seed=req.base.seed, base_fingerprint=self._base_fp,
                           fingerprint=fingerprint(state), method=f"finetuned-{self.domain}", domains=[self.domain])
        # the configuration in the metadata makes this file loadable on its own (mergerec evaluate / recommend)
        with atomic_path(self._finetuned_path(self._base_fp), mode=0o600) as tmp:  # the silo's own weights
            save_file({n: t.contiguous() for n, t in state.items()}, str(tmp), metadata=weights_metadata(card))
        reply = FinetuneReply(domain=self.domain, base_fingerprint=self._base_fp, mode=cfg.finetune,
                              val=AggregateMetrics.from_result(res.val), epochs=res.epochs,
                              refit_epochs=res.refit_epochs, seconds=res.seconds,
                              history=[EpochProgress(epoch=h["epoch"], loss=h.get("loss"), val_ndcg10=h["val_ndcg@10"])
                                       for h in res.history],
                              dp=DPGuarantee(**res.dp) if res.dp else None)
        return reply, sent

    def weave(self, req: WeaveRequest, arrays: Arrays) -> tuple[WeaveReply, Arrays]:
        """One weaving hop: another domain's LoRA module (`arrays["lora"]`), trained `req.epochs` epochs on this
        silo's train + validation items from base + module; only the updated factors go back."""
        base = self._require_base(req.base)
        cfg = req.train
        targets = self._lora_targets(cfg)
        shapes = {n: tuple(p.shape) for n, p in base.named_parameters()}
        lora.check_factors(arrays.get("lora", {}), lora.factor_shapes(shapes, targets, cfg.lora_rank),
                           f"module {req.module}")
        model = copy.deepcopy(base)
        lora.attach(model, targets, cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed, factors=arrays["lora"])
        _, seconds = refit(model, self.silo, self._dom, cfg, req.epochs)
        reply = WeaveReply(domain=self.domain, base_fingerprint=self._base_fp, module=req.module, round=req.round,
                           epochs=req.epochs, seconds=seconds)
        return reply, {"lora": lora.factors(model, targets)}

    def fed_round(self, req: FedRoundRequest, arrays: Arrays) -> tuple[FedRoundReply, Arrays]:
        """One FedAvg / FedProx round (common/model/train.local_round): the received global model's validation
        aggregate on this silo's held-out users (one "val" evaluation of the run's budget, whatever `epochs`: a
        validation-only round is an evaluation like any other), then (epochs > 0) local training; only the weight
        update and aggregates go back. FedProx: the proximal term mu/2 ||theta - theta_global||^2 is L2-SP toward the
        received weights."""
        base = self._require_base(req.base)
        self._spend("val", 1)  # `val`: the received (server-chosen) model scored on the held-out users
        shapes = {n: tuple(t.shape) for n, t in base.named_parameters()}
        check_state_arrays(arrays.get("model", {}), shapes, "global model")
        model = self._model_with(arrays["model"])
        received = shared_state(model)
        cfg = req.train.model_copy(update={"l2sp": req.prox_mu / 2.0})
        res = local_round(model, self.silo, self._dom, cfg, req.epochs, req.round)
        reply = FedRoundReply(domain=self.domain, base_fingerprint=self._base_fp, round=req.round, epochs=req.epochs,
                              users=res.users, loss=res.loss, seconds=res.seconds,
                              val=AggregateMetrics.from_result(res.val))
        if req.epochs == 0:
            return reply, {}
        return reply, {"update": state_to_numpy(task_vector(shared_state(model), received))}

    def teacher(self, req: TeacherRequest) -> tuple[TeacherReply, Arrays]:
        self._require_base(req.base)
        path = self._finetuned_path(self._base_fp)
        if not path.exists():
            raise ContractError(f"silo {self.domain} has no fine-tuned model for base {self._base_fp[:12]}")
        n = len(self.silo.catalog)
        if max(req.pseudo_item_ids) >= n:
            raise ContractError(f"pseudo-user item id {max(req.pseudo_item_ids)} out of range for {n} items")
        model = self._model_with({k: v.numpy() for k, v in load_file(str(path)).items()})
        dom = self._dom
        with torch.no_grad():
            from common.model.backbones import encode_all_items

            items = encode_all_items(model, dom)

            def queries(ids: torch.Tensor) -> torch.Tensor:
                return model(dom, "histories", ids.view(-1, 1))

            top = teacher_topk(queries, items, torch.tensor(req.pseudo_item_ids), req.top_k, req.chunk_size,
                               exclude_own=req.seen_items == "exclude")
        arrays = top.to_arrays()
        return TeacherReply(domain=self.domain, num_items=n, k=int(arrays["indices"].shape[1])), {"teacher": arrays}

    def evaluate(self, req: EvaluateRequest, arrays: Arrays) -> tuple[EvaluateReply, Arrays]:
        base = self._require_base(req.base)
        shapes = {n: tuple(t.shape) for n, t in base.named_parameters()}
        metrics = {}
        self._spend(req.split, len(req.models))
        for name in req.models:
            if name not in arrays:
                raise ContractError(f"model {name!r} has no weights in the message")
            if name in req.integrated:  # an integrated model: K block sets + gates (common/model/integration.py)
                from common.model.integration import from_arrays

                model = from_arrays(base, req.integrated[name], arrays[name], f"model {name}")
            else:
                check_state_arrays(arrays[name], shapes, f"model {name}")
                model = self._model_with(arrays[name])
            metrics[name] = self._release(model, req.split, req.seen_items, arrays[name])
        return EvaluateReply(domain=self.domain, metrics=metrics), {}

    def tune_gates(self, req: GateTuneRequest, arrays: Arrays) -> tuple[GateTuneReply, Arrays]:
        """Fine-tune only the gates of the integrated model in `arrays["model"]` on a seeded fraction of this
        silo's training users; keep the tuned model here (state folder); reply with test aggregates only."""
        from common.model.integration import from_arrays

        base = self._require_base(req.base)
        model = from_arrays(base, req.spec, arrays["model"], "model")
        seen = req.train.seen_items
        self._spend("test", 2)
        before = self._release(model, "test", seen, arrays["model"])
        users = fraction_users(req.user_fraction, len(self.silo.users))
        cfg = req.train.model_copy(update={"freeze": list(GATE_FROZEN_PREFIXES), "max_users": users})
        res = fine_tune(model, self.silo, self._dom, cfg)
        after = self._release(model, "test", seen, {n: t.detach().numpy() for n, t in res.state.items()})
        path = self.state_dir / f"integrated-tuned-{self._base_fp[:16]}.safetensors"
        with atomic_path(path, mode=0o600) as tmp:  # trained on this silo's users: it stays here
            save_file({n: t.contiguous() for n, t in res.state.items()}, str(tmp))
        return GateTuneReply(domain=self.domain, before=before, after=after, epochs=res.epochs,
                             seconds=res.seconds), {}
