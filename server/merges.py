"""The run's merged models: computing them (training-free and learned), storing them in merges/, and evaluating
any model at the silos (aggregates back).

These are the functions benchmarks drive (`merged_states`, `learn`, `coefficient_sources`, `evaluate_at`), so a
benchmark row and the federation's row come from the same code. Everything here reads the run directory the
stages wrote (task vectors, pseudo-users, teacher top-k, coefficients.json, merges/) and reaches the silos only
through `evaluate_at`.
"""

from __future__ import annotations

import torch

from common.merging import methods as merge_methods
from common.merging.task_vectors import add_vector, state_to_numpy
from common.merging.teacher import TopKLogits
from common.model.tower_fit import fit_item_tower, has_item_tower, item_outputs
from common.model.coefficients import (
    CoefficientConfig,
    DomainBatchSource,
    learn_coefficients,
    merge_with_coefficients,
)
from common.protocol.messages import EVALUATE, EvaluateReply, EvaluateRequest
from server.base import BaseContext
from server.checkpoint import Checkpoint
from server.run_dir import RunDir
from server.silo_caller import SiloCaller
from server.task_vectors import TaskVectors
from server.validation import check_evaluate


class Merges:
    def __init__(self, cfg, run: RunDir, state: Checkpoint, base: BaseContext, vectors: TaskVectors,
                 calls: SiloCaller):
        self.cfg, self.run, self.state, self.base, self.vectors, self.calls = cfg, run, state, base, vectors, calls

    # ------------------------------------------------------------------ training-free
    def merged_states(self, domains: list[str] | None = None,
                      methods: list[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """Training-free merges (`methods`, default the configured baselines) of the task vectors of `domains`
        (default: the active silos). The run's own merges (both defaults) come from merges/ when stored."""
        own = domains is None and methods is None
        out = {name: self.cached(name) for name in self.cfg.baselines} if own else {}
        todo = [n for n in (self.cfg.baselines if methods is None else methods) if out.get(n) is None]
        if todo:
            tvs = self.vectors.load(self.state.active() if domains is None else domains)
            vecs = [tvs[d] for d in sorted(tvs)]
            for name in todo:
                plan = merge_methods.process(vecs, name, seed=self.cfg.seed)
                out[name] = merge_methods.merge(self.base.state, plan.vectors, plan.weights)
        return out

    def store(self, name: str, merged: dict[str, torch.Tensor], domains: list[str]) -> None:
        self.run.write_tensors(self.state, self.run.merge(name), merged)
        self.state.merges[name] = list(domains)

    def forget(self, names: list[str]) -> None:
        """Stored merges that must be recomputed (their task vectors may have changed)."""
        for name in names:
            self.state.files.pop(self.run.rel(self.run.merge(name)), None)

    def cached(self, name: str, domains: list[str] | None = None) -> dict[str, torch.Tensor] | None:
        """A merge this run stored (recorded, so checked on resume) over `domains` (default: the active silos,
        as merge_init saw them), else None."""
        path = self.run.merge(name)
        if self.run.rel(path) not in self.state.files or self.state.merges.get(name) != (domains or self.state.active()):
            return None
        return self.run.read_tensors(path)

    # ------------------------------------------------------------------ learned (MergeRec)
    def coefficient_sources(self, domains: list[str]) -> list[DomainBatchSource]:
        """Each domain's pseudo-users with the teacher top-k its silo returned (from the run directory)."""
        chosen = self.run.read_json(self.run.pseudo_users)
        sources = []
        for d in domains:
            arr = self.run.read_arrays(self.run.teacher(d))
            top = TopKLogits.from_arrays(chosen[d], arr["indices"], arr["values"], len(self.base.catalogs[d]))
            sources.append(DomainBatchSource(dom_inputs=self.base.dom(d), pseudo_item_ids=torch.tensor(chosen[d]),
                                             teacher=top, name=d))
        return sources

    def _plan(self, domains: list[str], init_method: str):
        tvs = self.vectors.load(domains)
        return merge_methods.process([tvs[d] for d in domains], init_method, seed=self.cfg.seed)

    def learn(self, domains: list[str], ccfg: CoefficientConfig, init_method: str | None = None):
        """Merging coefficients learned over `domains` (their task vectors, pseudo-users and teachers), from
        `init_method` (default the configured one). Returns (CoefficientResult, merged state theta(W))."""
        init_method = init_method or self.cfg.init_method
        plan = self._plan(domains, init_method)
        res = learn_coefficients(self.base.model, self.base.state, plan.vectors, self.base.model.layer_of,
                                 self.coefficient_sources(domains), ccfg, progress=False, method=init_method)
        return res, self._theta(domains, plan, res.W, list(res.groups), ccfg)

    def _theta(self, domains: list[str], plan, W: torch.Tensor, groups: list[str],
               ccfg: CoefficientConfig) -> dict[str, torch.Tensor]:
        """The merged model of coefficients W, with its item tower then fitted (`ccfg.tower_fit_epochs`)."""
        merged = merge_with_coefficients(self.base.state, plan.vectors, W, groups, self.base.model.layer_of)
        return self.fit_item_tower(merged, domains, ccfg)

    def fit_item_tower(self, merged: dict[str, torch.Tensor], domains: list[str],
                       ccfg: CoefficientConfig) -> dict[str, torch.Tensor]:
        """`merged` with its item tower fitted to the fine-tuned item towers of `domains` on their catalogs
        (common/model/tower_fit.py); unchanged when the fit is off or the backbone has no item adaptor."""
        if not ccfg.tower_fit_epochs or not has_item_tower(merged):
            return merged
        tvs = self.vectors.load(domains)
        doms = [self.base.dom(d) for d in domains]
        targets = [item_outputs(self.base.model, add_vector(self.base.state, tvs[d]), dom)
                   for d, dom in zip(domains, doms)]
        return fit_item_tower(self.base.model, merged, doms, targets, epochs=ccfg.tower_fit_epochs,
                              lr=ccfg.tower_fit_lr, seed=ccfg.seed,
                              batch_size=ccfg.tower_fit_batch_size)

    def mergerec_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """theta(W) for each learned granularity (over the domains W was learned on, even if one was dropped
        later: its vector is part of the merged model)."""
        learned = self.run.read_json(self.run.coefficients)
        out = {}
        for gran, c in learned.items():
            cached = self.cached(f"mergerec-{gran}", c["domains"])
            if cached is None:
                plan = self._plan(c["domains"], self.cfg.init_method)
                ccfg = self.cfg.coefficients.model_copy(update={"granularity": gran})
                cached = self._theta(c["domains"], plan, torch.tensor(c["W"]), c["groups"], ccfg)
            out[f"mergerec-{gran}"] = cached
        return out

    def candidate_models(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every model the evaluation scores: the base, the training-free merges, MergeRec's and (unless
        evaluate_finetuned is "none") each silo's fine-tuned model ("own": `own_only` says where each is scored)."""
        models = {"pretrained": self.base.state, **self.merged_states(), **self.mergerec_states()}
        if self.cfg.evaluate_finetuned != "none":
            for d, tv in self.vectors.load(self.state.active()).items():
                models[f"finetuned-{d}"] = add_vector(self.base.state, tv)
        return models

    def own_only(self) -> dict[str, str]:
        """model name -> the one silo that scores it: each fine-tuned model at its own silo when
        evaluate_finetuned is "own" (empty otherwise: every silo scores every model)."""
        if self.cfg.evaluate_finetuned != "own":
            return {}
        return {f"finetuned-{d}": d for d in self.state.active()}

    # ------------------------------------------------------------------ evaluation at the silos
    def evaluate_at(self, models: dict[str, dict[str, torch.Tensor]], domains: list[str],
                    split: str = "test", integrated: dict | None = None,
                    seen_items: str | None = None, only_at: dict[str, str] | None = None) -> dict[str, dict[str, dict]]:
        """Send `models` (name -> state) and `integrated` models (name -> (IntegratedSpec, parameters)) to the
        silos of `domains`; each evaluates them on its own `split` (seen items as the run's protocol says, or
        `seen_items`) over its own fixed users and returns aggregate metrics only (each model counts against the
        silo's evaluation budget for the run). `only_at`: model name -> the one domain that scores it (others:
        every domain). Returns domain -> model name -> AggregateMetrics as a dict."""
        integrated = integrated or {}
        only_at = only_at or {}
        arrays = {name: state_to_numpy(s) for name, s in {**models, **{n: s for n, (_, s) in integrated.items()}}.items()}
        requests = {}
        for d in domains:
            names = [n for n in models if only_at.get(n, d) == d]
            req = EvaluateRequest(base=self.base.spec, split=split, models=[*names, *integrated],
                                  seen_items=seen_items or self.cfg.train.seen_items,
                                  integrated={n: spec for n, (spec, _) in integrated.items()})
            requests[d] = (req, {n: arrays[n] for n in req.models})

        def validate(domain, o):  # which users: the silo's own fixed subsample (common/protocol/eval_policy.py)
            check_evaluate(o.header, o.arrays, domain=domain, models=requests[domain][0].models,
                           users=self.base.users.get(domain))

        results = self.calls.ask("evaluate", EVALUATE, requests, EvaluateReply, validate)
        return {d: {m: am.model_dump() for m, am in o.header.metrics.items()} for d, o in results.items()}

