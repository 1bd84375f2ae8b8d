"""The pipeline's merged models: computing, storing and evaluating them (a mixin of `server.pipeline.Pipeline`).

Everything here reads the run directory the stages wrote (task vectors, pseudo-users, teacher top-k,
coefficients.json, merges/) and reaches the silos only through `evaluate_at` (aggregates back). These are the
functions benchmarks drive (`merged_states`, `learn`, `coefficient_sources`, `evaluate_at`), so a benchmark
row and the federation's row come from the same code. The mixin expects the Pipeline's attributes: cfg,
run_dir, state, base, base_state, spec, catalogs, calls, task_vectors(), active(), _record(), _dom(),
_teacher_path().
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from common.core.files import atomic_path
from common.merging import methods as merge_methods
from common.model.coefficients import (
    CoefficientConfig,
    DomainBatchSource,
    learn_coefficients,
    merge_with_coefficients,
)
from common.merging.task_vectors import add_vector, state_to_numpy
from common.merging.teacher import TopKLogits
from common.protocol.messages import EVALUATE, EvaluateReply, EvaluateRequest
from server.validation import check_evaluate


class MergeStore:
    """Merges of the run's task vectors (training-free, learned), cached in merges/, and their evaluation."""

    def merged_states(self, domains: list[str] | None = None,
                      methods: list[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """Training-free merges (`methods`, default the configured baselines) of the task vectors of `domains`
        (default: the active silos). Cheap: recomputed on resume."""
        own = domains is None and methods is None  # the run's own merges: computed once, in merge_init
        out = {name: self._cached_merge(name) for name in self.cfg.baselines} if own else {}
        todo = [n for n in (self.cfg.baselines if methods is None else methods) if out.get(n) is None]
        if todo:
            tvs = self.task_vectors(domains)
            vecs = [tvs[d] for d in sorted(tvs)]
            for name in todo:
                plan = merge_methods.process(vecs, name, seed=self.cfg.seed)
                out[name] = merge_methods.merge(self.base_state, plan.vectors, plan.weights)
        return out

    def _merge_path(self, name: str) -> Path:
        return self.run_dir / "merges" / f"{name}.safetensors"

    def _store_merge(self, name: str, state: dict[str, torch.Tensor], domains: list[str]) -> None:
        with atomic_path(self._merge_path(name)) as tmp:
            save_file({n: t.contiguous() for n, t in state.items()}, str(tmp))
        self._record(self._merge_path(name))
        self.state.setdefault("merges", {})[name] = list(domains)

    def _cached_merge(self, name: str, domains: list[str] | None = None) -> dict[str, torch.Tensor] | None:
        """A merge this run stored (recorded, so checked on resume) over `domains` (default: the active silos,
        as merge_init saw them), else None."""
        path = self._merge_path(name)
        stored = self.state.get("merges", {}).get(name)
        if str(path.relative_to(self.run_dir)) not in self.state["files"] or stored != (domains or self.active()):
            return None
        return load_file(str(path))

    def coefficient_sources(self, domains: list[str]) -> list[DomainBatchSource]:
        """Each domain's pseudo-users with the teacher top-k its silo returned (from the run directory)."""
        chosen = json.loads((self.run_dir / "pseudo_users.json").read_text())
        sources = []
        for d in domains:
            arr = np.load(self._teacher_path(d))
            top = TopKLogits.from_arrays(chosen[d], arr["indices"], arr["values"], len(self.catalogs[d]))
            sources.append(DomainBatchSource(dom_inputs=self._dom(d), pseudo_item_ids=torch.tensor(chosen[d]),
                                             teacher=top, name=d))
        return sources

    def learn(self, domains: list[str], ccfg: CoefficientConfig, init_method: str | None = None):
        """Merging coefficients learned over `domains` (their task vectors, pseudo-users and teachers), from
        `init_method` (default the configured one). Returns (CoefficientResult, merged state theta(W))."""
        init_method = init_method or self.cfg.init_method
        tvs = self.task_vectors(domains)
        plan = merge_methods.process([tvs[d] for d in domains], init_method, seed=self.cfg.seed)
        res = learn_coefficients(self.base, self.base_state, plan.vectors, self.base.layer_of,
                                 self.coefficient_sources(domains), ccfg, progress=False, method=init_method)
        return res, merge_with_coefficients(self.base_state, plan.vectors, res.W, res.groups, self.base.layer_of)

    def mergerec_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """theta(W) for each learned granularity (over the domains W was learned on, even if one was dropped
        later: its vector is part of the merged model)."""
        learned = json.loads((self.run_dir / "coefficients.json").read_text())
        out = {}
        for gran, c in learned.items():
            cached = self._cached_merge(f"mergerec-{gran}", c["domains"])
            if cached is not None:
                out[f"mergerec-{gran}"] = cached
                continue
            tvs = self.task_vectors(c["domains"])
            plan = merge_methods.process([tvs[d] for d in c["domains"]], self.cfg.init_method, seed=self.cfg.seed)
            out[f"mergerec-{gran}"] = merge_with_coefficients(self.base_state, plan.vectors, torch.tensor(c["W"]),
                                                              c["groups"], self.base.layer_of)
        return out

    def candidate_models(self) -> dict[str, dict[str, torch.Tensor]]:
        models = {"pretrained": self.base_state, **self.merged_states(), **self.mergerec_states()}
        if self.cfg.evaluate_finetuned:
            for d, tv in self.task_vectors().items():
                models[f"finetuned-{d}"] = add_vector(self.base_state, tv)
        return models

    def evaluate_at(self, models: dict[str, dict[str, torch.Tensor]], domains: list[str],
                    split: str = "test", integrated: dict | None = None) -> dict[str, dict[str, dict]]:
        """Send `models` (name -> state) and `integrated` models (name -> (IntegratedSpec, parameters)) to the
        silos of `domains`; each evaluates them on its own `split` and returns aggregate metrics only.
        Returns domain -> model name -> AggregateMetrics as a dict."""
        integrated = integrated or {}
        arrays = {name: state_to_numpy(s) for name, s in {**models, **{n: s for n, (_, s) in integrated.items()}}.items()}
        req = EvaluateRequest(base=self.spec, split=split, models=[*models, *integrated],
                              max_users=self.cfg.eval_max_users, seed=self.cfg.seed,
                              integrated={n: spec for n, (spec, _) in integrated.items()})

        def validate(domain, o):
            check_evaluate(o.header, o.arrays, domain=domain, models=req.models)

        results = self.calls.ask("evaluate", EVALUATE, {d: (req, arrays) for d in domains}, EvaluateReply, validate)
        return {d: {m: am.model_dump() for m, am in o.header.metrics.items()} for d, o in results.items()}

