"""The pipeline's optional `integration` stage (run-config `integration = "xcross"`): an X-Cross-style
integrated model (common/model/integration.py) as one more candidate, evaluated by the silos next to the merges.

- Experts: the K active domains' models, base + tau_d (their stored task vectors, dense).
- Shared non-block parameters (adaptor, position embeddings): the MergeRec merge learned for the first of
  `granularities` (mergerec-task by default), the best single-model starting point the run has; the gates
  then only decide how the history tower mixes the domains' blocks.
- Gates: trained on the coefficient stage's pseudo-users and teacher top-k (`Pipeline.coefficient_sources`)
  with MergeRec's loss (common/model/gates.py).

Writes integration/xcross.safetensors (the integrated model's parameters, recorded) and integration.json
(spec, domains, training curves, inference cost against the single merged model).
"""

from __future__ import annotations

import copy
import json
import logging

import torch
from safetensors.torch import load_file, save_file

from common.core.files import atomic_path, atomic_write
from common.model.integration import IntegratedRecommender, inference_cost
from common.model.gates import train_gates
from common.merging.task_vectors import add_vector, state_to_numpy
from common.protocol.messages import TUNE_GATES, ContractError, GateTuneReply, GateTuneRequest, IntegratedSpec
from server.silo_caller import PipelineError
from server.validation import check_metrics

log = logging.getLogger(__name__)

NAME = "xcross"


def _paths(p):
    return p.run_dir / "integration" / f"{NAME}.safetensors", p.run_dir / "integration.json"


def build(p, domains: list[str], shared: dict[str, torch.Tensor] | None = None) -> IntegratedRecommender:
    """The untrained integrated model of pipeline `p` over `domains` (uniform gates); shared non-block weights
    from `shared` (default: the run's MergeRec merge of the first granularity)."""
    if shared is None:
        shared = p.mergerec_states()[f"mergerec-{p.cfg.granularities[0]}"]
    tvs = p.task_vectors(domains)
    experts = [add_vector(p.base_state, tvs[d]) for d in domains]
    return IntegratedRecommender.from_states(p.base, shared, experts, p.cfg.integration.gate_hidden)


def train(p, domains: list[str], shared: dict[str, torch.Tensor] | None = None):
    """The integrated model over `domains` with its gates trained on their pseudo-users and teachers (the
    run's stored ones), as the stage does. Returns (model, GateResult)."""
    icfg = p.cfg.integration
    model = build(p, domains, shared)
    res = train_gates(model, p.coefficient_sources(domains), p.cfg.coefficients, steps=icfg.steps, lr=icfg.lr)
    return model, res


def parameters(model: IntegratedRecommender) -> tuple[IntegratedSpec, dict[str, torch.Tensor]]:
    """(spec, parameters) of an integrated model, as `evaluate_at(integrated=...)` and `tune_gates_at` take it."""
    return model.spec, {n: t.detach().contiguous() for n, t in model.state_dict().items()}


def run(p) -> None:
    """The stage body (nothing when integration is "none")."""
    icfg = p.cfg.integration
    if icfg.kind == "none":
        return
    domains = sorted(p.active())
    model, res = train(p, domains)
    weights, info_path = _paths(p)
    with atomic_path(weights) as tmp:
        save_file(parameters(model)[1], str(tmp))
    p._record(weights)
    single = copy.deepcopy(p.base)
    single.load_state_dict(p.mergerec_states()[f"mergerec-{p.cfg.granularities[0]}"])
    dom = p._dom(domains[0])
    cost = {"integrated": inference_cost(model, dom, seed=p.cfg.seed),
            "single_merged": inference_cost(single, dom, seed=p.cfg.seed), "domain": domains[0]}
    cost["time_ratio"] = cost["integrated"]["seconds_per_batch"] / max(cost["single_merged"]["seconds_per_batch"], 1e-12)
    cost["parameter_ratio"] = cost["integrated"]["parameters"] / cost["single_merged"]["parameters"]
    curve = res.holdout or res.history  # held-out loss when coefficient learning holds pseudo-users out
    log.info("integration: %s over %s, %s loss %s -> %s, %.1fx the time and %.2fx the parameters of one model",
             NAME, ", ".join(domains), "held-out" if res.holdout else "training",
             *(f"{c['loss']:.4f}" if c else "-" for c in (curve[:1] or [None]) + (curve[-1:] or [None])),
             cost["time_ratio"], cost["parameter_ratio"])
    info = {"name": NAME, "spec": model.spec.model_dump(), "domains": domains, "config": icfg.model_dump(),
            "shared": f"mergerec-{p.cfg.granularities[0]}", "chosen_step": res.chosen_step,
            "history": res.history, "holdout": res.holdout, "cost": cost}
    atomic_write(info_path, json.dumps(info, indent=1))
    p._record(info_path)


def candidates(p) -> dict[str, tuple[IntegratedSpec, dict[str, torch.Tensor]]]:
    """name -> (spec, parameters) of the integrated model(s) this run trained ({} when none)."""
    weights, info_path = _paths(p)
    if p.cfg.integration.kind == "none" or not info_path.exists():
        return {}
    info = json.loads(info_path.read_text())
    return {NAME: (IntegratedSpec(**info["spec"]), load_file(str(weights)))}


def summary(run_dir) -> dict | None:
    """integration.json without the training curves (for report.json), or None."""
    path = run_dir / "integration.json"
    if not path.exists():
        return None
    info = json.loads(path.read_text())
    return {k: v for k, v in info.items() if k not in ("history",)}


def tune_gates_at(p, domain: str, integrated: tuple[IntegratedSpec, dict[str, torch.Tensor]], fraction: float,
                  train_cfg=None) -> GateTuneReply:
    """X-Cross's new domain: send the integrated model (spec, parameters) to `domain`'s silo (through `p`'s
    transport, a `train.gates` message), which tunes only its gates on a seeded `fraction` of its training users
    (`train_cfg`, default the run's) and keeps the tuned model; only test aggregates before and after come back,
    on the same users `evaluate_at` scores (eval-max-users, seed)."""
    spec, params = integrated
    train_cfg = (train_cfg or p.cfg.train).model_copy(update={"finetune": "full"})  # gates: no LoRA factors
    req = GateTuneRequest(base=p.spec, spec=spec, train=train_cfg, user_fraction=fraction,
                          max_users=p.cfg.eval_max_users, seed=p.cfg.seed)

    def validate(d, o):
        if o.header.domain != d:
            raise ContractError(f"domain must be {d!r}")
        check_metrics(o.header.before, "before")
        check_metrics(o.header.after, "after")

    got = p.calls.ask("tune_gates", TUNE_GATES, {domain: (req, {"model": state_to_numpy(params)})}, GateTuneReply,
                      validate)
    if domain not in got:
        raise PipelineError(f"silo {domain} did not tune the gates")
    return got[domain].header
