"""The pipeline's optional `integration` stage (run-config `integration = "xcross"`): an X-Cross-style
integrated model (common/integration.py) as one more candidate, evaluated by the silos next to the merges.

- Experts: the K active domains' models, base + tau_d (their stored task vectors, dense).
- Shared non-block parameters (adaptor, position embeddings): the MergeRec merge learned for the first of
  `granularities` (mergerec-task by default), the best single-model starting point the run has; the gates
  then only decide how the history tower mixes the domains' blocks.
- Gates: trained on the coefficient stage's pseudo-users and teacher top-k (`Pipeline.coefficient_sources`)
  with MergeRec's loss (common/merging/integration_train.py).

Writes integration/xcross.safetensors (the integrated model's parameters, recorded) and integration.json
(spec, domains, training curves, inference cost against the single merged model).
"""

from __future__ import annotations

import copy
import json
import logging

import torch
from safetensors.torch import load_file, save_file

from common.files import atomic_path, atomic_write
from common.integration import IntegratedRecommender, inference_cost
from common.merging.integration_train import train_gates
from common.merging.task_vectors import add_vector
from common.messages import IntegratedSpec

log = logging.getLogger(__name__)

NAME = "xcross"


def _paths(p):
    return p.run_dir / "integration" / f"{NAME}.safetensors", p.run_dir / "integration.json"


def build(p, domains: list[str]) -> IntegratedRecommender:
    """The untrained integrated model of pipeline `p` over `domains` (uniform gates)."""
    shared_name = f"mergerec-{p.cfg.granularities[0]}"
    shared = p.mergerec_states()[shared_name]
    tvs = p.task_vectors(domains)
    experts = [add_vector(p.base_state, tvs[d]) for d in domains]
    return IntegratedRecommender.from_states(p.base, shared, experts, p.cfg.integration.gate_hidden)


def run(p) -> None:
    """The stage body (nothing when integration is "none")."""
    icfg = p.cfg.integration
    if icfg.kind == "none":
        return
    domains = sorted(p.active())
    model = build(p, domains)
    ccfg = p.cfg.coefficients
    res = train_gates(model, p.coefficient_sources(domains), ccfg, steps=icfg.steps, lr=icfg.lr)
    weights, info_path = _paths(p)
    with atomic_path(weights) as tmp:
        save_file({n: t.detach().contiguous() for n, t in model.state_dict().items()}, str(tmp))
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
