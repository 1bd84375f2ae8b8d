"""The pipeline's optional `integration` stage (run-config `integration = "xcross"`): an X-Cross-style
integrated model (common/model/integration.py) as one more candidate, evaluated by the silos next to the merges.

- Experts: the K active domains' models, base + tau_d (their stored task vectors, dense).
- Shared non-block parameters (adaptor, position embeddings): the MergeRec merge learned for the first of
  `granularities` (mergerec-task by default), the best single-model starting point the run has; the gates
  then only decide how the history tower mixes the domains' blocks.
- Gates: trained on the coefficient stage's pseudo-users and teacher top-k (`Merges.coefficient_sources`)
  with MergeRec's loss (common/model/gates.py).

Writes integration/xcross.safetensors (the integrated model's parameters, recorded) and integration.json
(spec, domains, training curves, inference cost against the single merged model).
"""

from __future__ import annotations

import copy
import logging

import torch

from common.merging.task_vectors import add_vector, state_to_numpy
from common.model.gates import train_gates
from common.model.integration import IntegratedRecommender, IntegratedSpec, inference_cost
from common.protocol.messages import TUNE_GATES, GateTuneReply, GateTuneRequest
from server.base import BaseContext
from server.checkpoint import Checkpoint
from server.merges import Merges
from server.run_dir import RunDir
from server.silo_caller import PipelineError, SiloCaller
from server.validation import check_gate

log = logging.getLogger(__name__)

NAME = "xcross"


def parameters(model: IntegratedRecommender) -> tuple[IntegratedSpec, dict[str, torch.Tensor]]:
    """(spec, parameters) of an integrated model, as `evaluate_at(integrated=...)` and `tune_gates_at` take it."""
    return model.spec, {n: t.detach().contiguous() for n, t in model.state_dict().items()}


def summary(run: RunDir) -> dict | None:
    """integration.json without the training curves (for report.json), or None."""
    if not run.integration_info.exists():
        return None
    info = run.read_json(run.integration_info)
    return {k: v for k, v in info.items() if k not in ("history",)}


class Integration:
    def __init__(self, cfg, run: RunDir, state: Checkpoint, base: BaseContext, merges: Merges, calls: SiloCaller):
        self.cfg, self.run, self.state, self.base, self.merges, self.calls = cfg, run, state, base, merges, calls

    def _shared(self) -> dict[str, torch.Tensor]:
        return self.merges.mergerec_states()[f"mergerec-{self.cfg.granularities[0]}"]

    def build(self, domains: list[str], shared: dict[str, torch.Tensor] | None = None) -> IntegratedRecommender:
        """The untrained integrated model over `domains` (uniform gates); shared non-block weights from `shared`
        (default: the run's MergeRec merge of the first granularity)."""
        shared = self._shared() if shared is None else shared
        tvs = self.merges.vectors.load(domains)
        experts = [add_vector(self.base.state, tvs[d]) for d in domains]
        return IntegratedRecommender.from_states(self.base.model, shared, experts, self.cfg.integration.gate_hidden)

    def train(self, domains: list[str], shared: dict[str, torch.Tensor] | None = None):
        """The integrated model over `domains` with its gates trained on their pseudo-users and teachers (the
        run's stored ones), as the stage does. Returns (model, GateResult)."""
        icfg = self.cfg.integration
        model = self.build(domains, shared)
        res = train_gates(model, self.merges.coefficient_sources(domains), self.cfg.coefficients, steps=icfg.steps,
                          lr=icfg.lr)
        return model, res

    def run_stage(self) -> None:
        """The stage body (nothing when integration is "none")."""
        icfg = self.cfg.integration
        if icfg.kind == "none":
            return
        domains = sorted(self.state.active())
        model, res = self.train(domains)
        self.run.write_tensors(self.state, self.run.integrated(NAME), parameters(model)[1])
        single = copy.deepcopy(self.base.model)
        single.load_state_dict(self._shared())
        dom = self.base.dom(domains[0])
        cost = {"integrated": inference_cost(model, dom, seed=self.cfg.seed),
                "single_merged": inference_cost(single, dom, seed=self.cfg.seed), "domain": domains[0]}
        cost["time_ratio"] = cost["integrated"]["seconds_per_batch"] / max(cost["single_merged"]["seconds_per_batch"],
                                                                           1e-12)
        cost["parameter_ratio"] = cost["integrated"]["parameters"] / cost["single_merged"]["parameters"]
        curve = res.holdout or res.history  # held-out loss when coefficient learning holds pseudo-users out
        log.info("integration: %s over %s, %s loss %s -> %s, %.1fx the time and %.2fx the parameters of one model",
                 NAME, ", ".join(domains), "held-out" if res.holdout else "training",
                 *(f"{c['loss']:.4f}" if c else "-" for c in (curve[:1] or [None]) + (curve[-1:] or [None])),
                 cost["time_ratio"], cost["parameter_ratio"])
        info = {"name": NAME, "spec": model.spec.model_dump(), "domains": domains, "config": icfg.model_dump(),
                "shared": f"mergerec-{self.cfg.granularities[0]}", "chosen_step": res.chosen_step,
                "history": res.history, "holdout": res.holdout, "cost": cost}
        self.run.write_json(self.state, self.run.integration_info, info)

    def candidates(self) -> dict[str, tuple[IntegratedSpec, dict[str, torch.Tensor]]]:
        """name -> (spec, parameters) of the integrated model(s) this run trained ({} when none)."""
        if self.cfg.integration.kind == "none" or not self.run.integration_info.exists():
            return {}
        info = self.run.read_json(self.run.integration_info)
        return {NAME: (IntegratedSpec(**info["spec"]), self.run.read_tensors(self.run.integrated(NAME)))}

    def tune_gates_at(self, domain: str, integrated: tuple[IntegratedSpec, dict[str, torch.Tensor]],
                      fraction: float, train_cfg=None) -> GateTuneReply:
        """X-Cross's new domain: send the integrated model (spec, parameters) to `domain`'s silo (a `train.gates`
        message), which tunes only its gates on a seeded `fraction` of its training users (`train_cfg`, default
        the run's) and keeps the tuned model; only test aggregates before and after come back, on the same users
        `evaluate_at` scores (the silo's own fixed test subsample)."""
        spec, params = integrated
        train_cfg = (train_cfg or self.cfg.train).model_copy(update={"finetune": "full"})  # gates: no LoRA factors
        req = GateTuneRequest(base=self.base.spec, spec=spec, train=train_cfg, user_fraction=fraction)

        def validate(d, o):
            check_gate(o.header, domain=d, epochs=train_cfg.epochs, users=self.base.users.get(d))

        got = self.calls.ask("tune_gates", TUNE_GATES, {domain: (req, {"model": state_to_numpy(params)})},
                             GateTuneReply, validate)
        if domain not in got:
            raise PipelineError(f"silo {domain} did not tune the gates")
        return got[domain].header
