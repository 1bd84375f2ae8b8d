"""The run's outputs people use: the shipped model folder (with its model card), report.json, report.md and
plots. Called by the pipeline's last stage (`Pipeline.artifacts`).

Which merged model is shipped (`select_variant`): of every merged candidate (the training-free merges of
`baselines` and the MergeRec variants), the one with the highest mean validation NDCG@10 over the silos that
took part. Test metrics never enter the choice; a tie keeps the candidate listed first (MergeRec variants in
`granularities` order, then the baselines in theirs).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from common.api.model_folder import ModelConfig, save_model_folder
from common.core.files import atomic_write
from common.core.fingerprint import fingerprint
from common.core.report import markdown_table
from common.model.metrics import SEEN_ITEMS
from common.model.tower_fit import has_item_tower
from server.base import BaseContext
from server.checkpoint import Checkpoint
from server.integration_stage import summary as integration_summary
from server.run_dir import RunDir

log = logging.getLogger(__name__)

SELECT_RULE = ("the merged candidate (MergeRec task-/layer-wise or a training-free merge) with the highest mean "
               "validation NDCG@10 over the participating domains; test data is never used for the choice, and a "
               "tie keeps the candidate listed first (MergeRec variants, then the baselines)")
CITATION = ("Kim, Moon, Park, Lee. MergeRec: Model Merging for Data-Isolated Cross-Domain Sequential Recommendation. KDD 2026, "
            "arXiv:2601.01753, https://arxiv.org/abs/2601.01753")


def mean_metric(per_domain: dict, model: str, metric: str = "ndcg@10") -> float | None:
    """Mean of `metric` for `model` over the domains of a {domain: {model: {"values": ...}}} table."""
    vals = [m[model]["values"][metric] for m in per_domain.values() if model in m]
    return sum(vals) / len(vals) if vals else None


def select_variant(candidates: list[str], val_metrics: dict) -> tuple[str, dict[str, float | None]]:
    """(chosen model name, mean validation NDCG@10 per candidate). Candidates without validation numbers
    score None; when none has any, the first candidate is chosen."""
    scores = {c: mean_metric(val_metrics, c) for c in candidates}
    known = [c for c in candidates if scores[c] is not None]
    if not known:
        return candidates[0], scores
    return max(known, key=lambda c: (scores[c], -candidates.index(c))), scores


def _metric_rows(metrics: dict, models: list[str], metric: str) -> list[dict]:
    domains = sorted(metrics)
    rows = []
    for model in models:
        row = {"model": model, **{d: metrics[d].get(model, {}).get("values", {}).get(metric, "") for d in domains}}
        row["mean"] = mean_metric(metrics, model, metric)
        rows.append(row)
    return rows


def metrics_table(metrics: dict, metric: str = "recall@10") -> str:
    """Markdown table: one row per model, one column per domain (+ mean)."""
    models = list(dict.fromkeys(m for d in sorted(metrics) for m in metrics[d]))
    return markdown_table(_metric_rows(metrics, models, metric), ["model", *sorted(metrics), "mean"])


def coefficient_tables(learned: dict) -> str:
    parts = []
    for gran, c in learned.items():
        rows = [{"domain": d, **{g: w for g, w in zip(c["groups"], ws)}} for d, ws in zip(c["domains"], c["W"])]
        parts.append(f"**{gran}-wise** (final loss {c.get('final_loss') or float('nan'):.4f})\n\n"
                     + markdown_table(rows, ["domain", *c["groups"]]))
    return "\n\n".join(parts)


def method_text(info: dict) -> str:
    """The model card's Method paragraph: how the shipped model was made."""
    own = (f"Each domain trained the same ID-free, text-based sequential recommender ({info['backbone']} backbone) "
           "in its own silo and sent only changes of its weights; no user data left any silo.")
    merged = (" The server merged the silos' fine-tuned task vectors with training-free merges and with MergeRec: "
              f"starting from {info['init']}, it learned merging coefficients by distillation (pseudo-users built "
              "from the item catalogs alone, each silo's top-k scores for them as targets)"
              + (", then fitted the MergeRec models' item tower (adaptor and its MLP residual) so that on every "
                 "catalog item it reproduces that domain's fine-tuned item embedding (catalog items and task vectors "
                 "only)." if info.get("tower_fit_epochs") else ".")) 
    fed = info.get("fedavg")
    if info.get("strategy") != "fedavg" or not fed:
        return own + merged
    start = "the shared base" if fed["init"] == "base" else f"the merged model `{fed['init']}`"
    rounds = len(fed["rounds"]) - 1
    return own + (merged if fed["init"] != "base" else "") + (
        f" Then {rounds} round(s) of federated averaging from {start}: each silo trained the global model on its own "
        f"users and sent the update; the server averaged them weighted by users. Round {fed['chosen']} is shipped "
        "(the best mean validation NDCG@10 on each silo's held-out users).")


def fedavg_section(fed: dict | None) -> list[str]:
    """report.md lines for the federated rounds: users, loss and held-out validation per round ([] if none)."""
    if not fed:
        return []
    rows = [{"round": r["round"], "silos": len(r["users"]) or len(r["val"]), "users": sum(r["users"].values()),
             "mean held-out val NDCG@10": _mean_val(r["val"])} for r in fed["rounds"]]
    return [f"## Federated rounds (start: {fed['init']}; shipped: round {fed['chosen']})", "",
            markdown_table(rows, ["round", "silos", "users", "mean held-out val NDCG@10"]), ""]


def _mean_val(val: dict) -> float | str:
    vals = [m["values"]["ndcg@10"] for m in val.values()]
    return sum(vals) / len(vals) if vals else ""


DP_NOT_COVERED = ("It covers the task vectors (or LoRA factors) and all computed from them alone (teacher logits "
                  "on catalog-only pseudo-users, merges, this model); it does not cover the aggregate metrics "
                  "silos report (per-epoch validation NDCG@10 and loss, test metrics), nor the held-out validation "
                  "users whose data picks the epoch (they are not trained on).")


def privacy_section(finetune: dict) -> list[str]:
    """Model card / report.md lines: each silo's user-level DP guarantee, or that there is none."""
    rows = [{"silo": d, **{k: f.get("dp", {})[k] for k in ("epsilon", "delta", "noise_multiplier", "clip",
                                                           "sample_rate", "users", "steps", "planned_steps")}}
            for d, f in sorted(finetune.items()) if f.get("dp")]
    if not rows:
        return ["## Privacy", "No differential-privacy guarantee: silos fine-tuned without DP (run-config "
                "`dp-epsilon` unset), so membership inference on their users is not bounded.", ""]
    return ["## Privacy (user-level DP-SGD in each silo, RDP accountant)",
            markdown_table(rows, list(rows[0])), "", DP_NOT_COVERED, ""]


def model_card(info: dict) -> str:
    """README.md of the shipped model folder (Hugging Face style front matter + sections)."""
    val = info["val_scores"]
    lines = [
        "---", "license: apache-2.0", "library_name: mergerec-fed", "tags:", "- recommendation",
        "- sequential-recommendation", "- model-merging", "- federated-learning", "---", "",
        f"# {info['method']}: merged sequential recommender for {', '.join(info['domains'])}", "",
        "## Method", method_text(info), "",
        f"Shipped: `{info['method']}`, chosen by this rule: {SELECT_RULE}. Mean validation NDCG@10: "
        + ", ".join(f"{k} {v:.4f}" if v is not None else f"{k} n/a" for k, v in val.items()) + ".", "",
        "## Learned coefficients", coefficient_tables(info["coefficients"]) or "(none: no merge was learned)", "",
        f"## Metrics (test split, full ranking over each domain's catalog; {SEEN_ITEMS[info['seen_items']]})",
        "Recall@10:", "", metrics_table(info["test"], "recall@10"), "", "NDCG@10:", "",
        metrics_table(info["test"], "ndcg@10"), "",
        "## Data", "Trained on the interaction histories of these domains, which never left their silos: "
        + ", ".join(f"{d} ({n} items)" for d, n in info["catalog_sizes"].items())
        + ". Split: leave-one-out per user (last item test, second last validation).", "",
        *privacy_section(info.get("finetune", {})),
        "## Intended use",
        "Next-item recommendation from a user's recent item history, in the domains above and, since items "
        "enter only through their text (title, brand, category), in other catalogs of similar products. "
        "Measure it on a new domain's own validation data first (`mergerec evaluate`).", "",
        "## Limits",
        "- Quality depends on the item texts; items with empty or uninformative titles are hard to rank.",
        "- Learned on the domains above; on unrelated catalogs it may do no better than text similarity.",
        "- The metrics above come from the run's own test splits and may not transfer to other traffic.",
        "- Popularity and exposure biases in the training histories are carried into the recommendations.", "",
        "## Files",
        "`config.json` (backbone configuration, seed, base and weights fingerprints), `model.safetensors` "
        "(weights; the same configuration in its metadata). Load with "
        "`MergedRecommender.from_pretrained(<this folder>)` or `mergerec recommend --model <this folder>`.", "",
        "## Citation", CITATION, "",
    ]
    return "\n".join(lines)


def write_model(cfg, run: RunDir, state: Checkpoint, base: BaseContext, candidates: dict, learned: dict,
                metrics: dict, val_metrics: dict) -> tuple[Path, str, dict]:
    """Select the shipped one of `candidates` (name -> weights), write run_dir/model/ (config.json,
    model.safetensors, README.md)."""
    chosen, scores = select_variant(list(candidates), val_metrics)
    log.info("shipping %s (mean validation NDCG@10: %s)", chosen, json.dumps(scores))
    weights = candidates[chosen]
    gran = chosen.removeprefix("mergerec-")
    domains = learned[gran]["domains"] if gran in learned else state.merges.get(chosen, state.active())
    card_cfg = ModelConfig(backbone=cfg.backbone, seed=cfg.seed, base_fingerprint=base.fingerprint,
                           fingerprint=fingerprint(weights), method=chosen, domains=domains)
    info = {"method": chosen, "domains": card_cfg.domains, "backbone": cfg.backbone.kind, "init": cfg.init_method,
            "strategy": cfg.strategy, "fedavg": state.fedavg.model_dump() if state.fedavg else None,
            "val_scores": scores, "coefficients": learned, "test": metrics, "seen_items": cfg.train.seen_items,
            "catalog_sizes": {d: len(base.catalogs[d]) for d in card_cfg.domains if d in base.catalogs},
            "tower_fit_epochs": cfg.coefficients.tower_fit_epochs if has_item_tower(weights) else 0,
            "finetune": {d: state.finetune[d].model_dump() for d in card_cfg.domains if d in state.finetune}}
    folder = save_model_folder(run.model, weights, card_cfg, model_card(info))
    return folder, chosen, scores


def shipping_candidates(cfg) -> list[str]:
    """The models the shipped one is chosen from, in tie-break order: the merged ones (MergeRec variants, then
    the training-free baselines), or with strategy = fedavg the federated model (its round was chosen on held-out
    validation; a hybrid's round 0 is the best merged model)."""
    if cfg.strategy == "fedavg":
        return ["hybrid" if cfg.fedavg.init == "merged" else "fedavg"]
    return [*(f"mergerec-{g}" for g in cfg.granularities), *cfg.baselines]


def integration_section(info: dict | None) -> list[str]:
    """report.md lines for the integrated-model candidate: what it is and its inference cost ([] if none)."""
    if not info:
        return []
    cost = info["cost"]
    rows = [{"model": name, "seconds per batch": c["seconds_per_batch"], "parameters": c["parameters"]}
            for name, c in (("one merged model", cost["single_merged"]), (info["name"], cost["integrated"]))]
    return [f"## Integrated model `{info['name']}` ({info['spec']['num_domains']} domain block sets, gates "
            f"trained {info['chosen_step']} steps; shared weights: {info['shared']})", "",
            f"Inference cost: scoring a batch of {cost['single_merged']['batch']} histories of "
            f"{cost['single_merged']['history_length']} items against every item of {cost['domain']} "
            f"(median, server CPU): {cost['time_ratio']:.2f}x the time, {cost['parameter_ratio']:.2f}x the "
            "parameters of one merged model.", "",
            markdown_table(rows, ["model", "seconds per batch", "parameters"]), ""]


def report_markdown(report: dict, plots: list[Path]) -> str:
    timings = [{"stage": s, "seconds": t} for s, t in report["timings"].items()]
    nbytes = [{"silo": d, "sent to silo (MB)": b["sent_to_silo"] / 1e6, "received from silo (MB)":
               b["received_from_silo"] / 1e6} for d, b in sorted(report["bytes"].items())]
    sel = report["selection"]
    parts = [
        f"# Run report: {', '.join(report['active'])}", "",
        f"Shipped model: `{sel['chosen']}` in `model/` (rule: {sel['rule']}).", "",
        f"Protocol: full ranking over each domain's catalog; {SEEN_ITEMS[report['seen_items']]}.", "",
        "## Test Recall@10", metrics_table(report["metrics"], "recall@10"), "",
        "## Test NDCG@10", metrics_table(report["metrics"], "ndcg@10"), "",
        "## Validation NDCG@10 of the merged candidates (what picks the shipped model)", metrics_table(report.get("metrics_val") or {}, "ndcg@10")
        if report.get("metrics_val") else "(not computed in this run)", "",
        "## Learned coefficients", coefficient_tables(report["coefficients"]), "",
        *integration_section(report.get("integration")), *fedavg_section(report.get("fedavg")),
        *privacy_section(report.get("finetune") or {}),
        "## Stage timings", markdown_table(timings, ["stage", "seconds"]), "",
        "## Bytes per silo", markdown_table(nbytes, ["silo", "sent to silo (MB)", "received from silo (MB)"]), "",
    ]
    if report["dropped"]:
        parts += ["## Dropped silos", markdown_table(report["dropped"], ["domain", "stage", "reason"]), ""]
    if plots:
        parts += ["## Plots", *[f"![{q.stem}](plots/{q.name})" for q in plots], ""]
    return "\n".join(parts)


def write_artifacts(cfg, run: RunDir, state: Checkpoint, base: BaseContext, candidates: dict) -> dict:
    """Model folder, report.json, report.md and plots of a run whose evaluate stage is done; `candidates`: name ->
    weights of the models the shipped one is chosen from (`shipping_candidates`)."""
    metrics = run.read_json(run.metrics)
    val_metrics = run.read_json(run.metrics_val) if run.metrics_val.exists() else {}
    learned = run.read_json(run.coefficients) if run.coefficients.exists() else {}
    folder, chosen, scores = write_model(cfg, run, state, base, candidates, learned, metrics, val_metrics)
    st = state.model_dump(mode="json")
    report = {"run_dir": str(run.root), "config": cfg.model_dump(mode="json"), "base_fingerprint": base.fingerprint,
              "seen_items": cfg.train.seen_items,
              "domains": st["domains"], "active": state.active(), "dropped": st["dropped"],
              "metrics": metrics, "metrics_val": val_metrics, "validation": st["val"],
              "finetune": st["finetune"], "weave": st["weave"], "strategy": cfg.strategy, "fedavg": st["fedavg"],
              "coefficients": {g: {k: v for k, v in c.items() if k not in ("history", "holdout")}
                               for g, c in learned.items()},
              "selection": {"chosen": chosen, "rule": SELECT_RULE, "mean_val_ndcg@10": scores},
              "timings": st["timings"], "bytes": st["bytes"], "model": str(folder / "model.safetensors"),
              "integration": integration_summary(run)}
    plots = []
    try:
        from server.plots import write_plots

        plots = write_plots(run.plots, metrics, learned)
    except Exception as exc:  # a plotting problem must not cost the run its model and report
        log.warning("plots not written: %s: %s", type(exc).__name__, exc)
    for name, text in (("report.md", report_markdown(report, plots)), ("report.json", json.dumps(report, indent=1))):
        atomic_write(run.root / name, text)
    return report


def results_table(report: dict, k: int = 10) -> str:
    """Every (domain, model) test Recall@k / NDCG@k of a run report, as a markdown table (the console summary)."""
    rows = []
    for domain, per_model in sorted(report["metrics"].items()):
        for model, m in per_model.items():
            rows.append({"domain": domain, "model": model, f"recall@{k}": m["values"][f"recall@{k}"],
                         f"ndcg@{k}": m["values"][f"ndcg@{k}"], "users": m["users"]})
    return markdown_table(rows, ["domain", "model", f"recall@{k}", f"ndcg@{k}", "users"])
