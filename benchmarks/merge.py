"""Benchmark the merge methods on real data (default ../shared/data/amazon: Beauty, Sports, Toys).

    python -m benchmarks.merge [--data DIR] [--domains Beauty Sports Toys] [--run-config "coef-steps=500 ..."]

A driver over the federation's own code, never a second implementation: the in-domain scenario IS a run of
the pipeline (server/pipeline.py) over in-process silos (clients/silo.py), configured exactly like `flwr run`
(pyproject's [tool.flwr.app.config] + `--run-config`). Its report gives the pretrained base, every fine-tuned
model on every domain, the training-free merges (the run's `baselines`, here every registered method) and
MergeRec at the run's `granularities` (task-wise by default). The rows the federation does not compute reuse the
run's stored task vectors, pseudo-users and teacher logits and the pipeline's own parts (`Merges.learn`,
`Merges.merged_states`, `Merges.evaluate_at`: the silos evaluate, only aggregates come back):
- MergeRec at the granularity the run did not learn, and without its item-tower fit;
- task arithmetic with lambda picked on held-out pseudo-users (`mean_loss`, the coefficient learner's held-out loss);
- AdaMerging (entropy loss) and MergeRec option ablations (in-domain);
- unseen domains: merge two domains' vectors, test on the third (for each choice of the third);
- joint training on the pooled data (a non-private reference, `--joint-epochs`, 0 = skip).

The run directory (`--run-dir`, default .cache/bench-runs/<config fingerprint>) is the pipeline's: running
again resumes, so fine-tuning is paid once. Writes benchmarks/results/merge.json and merge.md by default, a name
no claim uses; the merge claims name their files with `--out` (merge-base-init.json, ...: docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import sys
from pathlib import Path

import torch

from benchmarks.core import DEFAULT_DATA, RESULTS
from benchmarks.driver import Stages, silo_pipeline
from common.model.backbones import shared_state
from common.data.format import load_silo
from common.merging import methods as mm
from common.model.coefficients import mean_loss, split_rows
from common.core.report import markdown_table, write_results
from common.model.train import refit
from server.config import app_defaults, parse_overrides, pipeline_config
from server.pipeline import Pipeline

log = logging.getLogger("benchmarks.merge")
TRAINING_FREE = ["weight_average", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs"]
#: row labels of the training-free merges (task arithmetic at the registry's lambda 0.3)
FREE_LABELS = {name: "task_arithmetic@0.3" if name == "task_arithmetic" else name for name in TRAINING_FREE}
LAMBDAS = [0.1, 0.2, 0.3, 0.5, 0.7, 1.0]
#: extra rows the federation does not compute (`--extras`)
EXTRAS = ["picked", "adamerging", "ablations", "unseen"]
#: MergeRec options measured against the default (dropout on, item embeddings frozen at init, last W)
ABLATIONS = [("dropout off", {"dropout": False}), ("items refreshed every 50 steps", {"item_refresh_every": 50}),
             ("W picked on 10% held-out pseudo-users", {"holdout_fraction": 0.1})]
#: MergeRec without its last step, the item-tower fit (common/model/tower_fit.py): in-domain and unseen
NO_FIT = ("mergerec-task without item-tower fit", "task", "mergerec", None, {"tower_fit_epochs": 0})
METRICS = ("recall@10", "ndcg@10", "recall@50", "ndcg@50")


def compare(summary: list[dict]) -> list[dict]:
    """In-domain and the mean over the unseen-domain scenarios: the best training-free merge (task arithmetic
    at the picked lambda included) against MergeRec task- and layer-wise, by average test Recall@10."""
    free = set(FREE_LABELS.values()) | {"task_arithmetic@picked"}
    out = []
    n_unseen = len({r["scenario"] for r in summary if r["scenario"].startswith("unseen-")})
    for label, keep in (("in-domain", lambda s: s == "in-domain"),
                        (f"unseen (mean of {n_unseen})", lambda s: s.startswith("unseen-"))):
        scen = [r for r in summary if keep(r["scenario"])]
        by_method: dict[str, list[float]] = {}
        for r in scen:
            by_method.setdefault(r["method"], []).append(r["avg R@10"])
        n = max((len(v) for v in by_method.values()), default=0)
        mean = {m: sum(v) / len(v) for m, v in by_method.items() if len(v) == n}
        tf = {m: v for m, v in mean.items() if m in free}
        ours = {g: mean[f"mergerec-{g}"] for g in ("task", "layer") if f"mergerec-{g}" in mean}
        if not tf or not ours:  # a run without one side
            continue
        best = max(tf, key=tf.get)
        row = {"case": label, "best training-free": best, "its R@10": tf[best],
               **{f"MergeRec {g}": v for g, v in ours.items()}}
        row["best MergeRec - best training-free"] = max(ours.values()) - tf[best]
        out.append(row)
    return out


def targets(summary: list[dict]) -> list[dict]:
    """The product's test per scenario and MergeRec granularity: MergeRec against the base it started from on
    every evaluated domain, against the mean of the in-domain fine-tuned models (each on its own domain), and
    against the best training-free merge (average test Recall@10)."""
    out = []
    free = set(FREE_LABELS.values()) | {"task_arithmetic@picked"}
    for scenario in dict.fromkeys(r["scenario"] for r in summary):
        rows = {r["method"]: r for r in summary if r["scenario"] == scenario}
        base = rows.get("pretrained")
        domains = [k[:-5] for k in (base or {}) if k.endswith(" R@10") and k != "avg R@10"]
        own = [rows[f"finetuned-{d}"][f"{d} R@10"] for d in domains if f"finetuned-{d}" in rows]
        tf = {m: r["avg R@10"] for m, r in rows.items() if m in free}
        for gran in ("task", "layer"):
            ours = rows.get(f"mergerec-{gran}")
            if ours is None or base is None:
                continue
            row = {"scenario": scenario, "method": f"mergerec-{gran}", "avg R@10": ours["avg R@10"],
                   "domains >= base": f"{sum(ours[f'{d} R@10'] >= base[f'{d} R@10'] for d in domains)}/{len(domains)}"}
            if scenario == "in-domain" and len(own) == len(domains):
                row["/ mean own fine-tuned"] = round(ours["avg R@10"] / (sum(own) / len(own)), 3)
            if tf:
                best = max(tf, key=tf.get)
                row["/ best training-free"] = round(ours["avg R@10"] / tf[best], 3) if tf[best] else None
                row["best training-free"] = best
            out.append(row)
    return out


def summarise(rows: list[dict]) -> list[dict]:
    """One row per (scenario, method): per-domain Recall@10 / NDCG@10 and their averages."""
    summary = []
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows if r["scenario"] == scenario):
            rs = [r for r in rows if r["scenario"] == scenario and r["method"] == method]
            row = {"scenario": scenario, "method": method}
            for r in rs:
                row[f"{r['domain']} R@10"] = r["recall@10"]
                row[f"{r['domain']} N@10"] = r["ndcg@10"]
            row["avg R@10"] = sum(r["recall@10"] for r in rs) / len(rs)
            row["avg N@10"] = sum(r["ndcg@10"] for r in rs) / len(rs)
            summary.append(row)
    return summary


class Bench:
    """The pipeline run plus the benchmark-only rows, with every result kept in `rows`."""

    def __init__(self, pipe: Pipeline, stage: Stages):
        self.p, self.stage = pipe, stage
        self.rows: list[dict] = []
        self.coefficients: dict = {}
        self.bytes: dict = {}

    def record(self, scenario: str, metrics: dict, extra: dict | None = None, label=lambda m: m) -> None:
        """metrics: domain -> model name -> AggregateMetrics dict (a pipeline report / `evaluate_at`)."""
        for d, per_model in metrics.items():
            for name, m in per_model.items():
                self.rows.append({"scenario": scenario, "method": label(name), "domain": d,
                                  **{k: m["values"][k] for k in METRICS}, "users": m["users"], **(extra or {})})

    def pipeline_rows(self, report: dict) -> None:
        # the federation's own traffic, before the benchmark's extra evaluations add to the run's counters
        self.bytes = copy.deepcopy(report["bytes"])
        self.record("in-domain", report["metrics"], label=lambda m: FREE_LABELS.get(m, m))
        for gran, c in report["coefficients"].items():
            self.coefficients[f"in-domain/mergerec-{gran}"] = {"groups": c["groups"], "W": c["W"],
                                                               "final_loss": c["final_loss"]}

    def picked_lambda(self, scenario: str, merged: list[str], evaluate_on: list[str], holdout: float) -> None:
        """Task arithmetic with one lambda for all tasks, picked by the held-out pseudo-user loss."""
        p = self.p
        sources = p.merges.coefficient_sources(merged)
        _, held = split_rows(sources, holdout, torch.Generator().manual_seed(p.cfg.seed))
        if not any(h.numel() for h in held):
            raise ValueError(f"{scenario}: no held-out pseudo-users to pick lambda on (too few pseudo-users)")
        tvs = p.vectors.load(merged)
        plan = mm.process([tvs[d] for d in merged], "task_arithmetic", seed=p.cfg.seed)
        losses = {lam: mean_loss(p.base.model, mm.merge(p.base.state, plan.vectors, [lam] * len(merged)), sources,
                                 held, p.cfg.coefficients) for lam in LAMBDAS}
        best = min(losses, key=losses.get)
        state = mm.merge(p.base.state, plan.vectors, [best] * len(merged))
        self.record(scenario, p.merges.evaluate_at({"task_arithmetic@picked": state}, evaluate_on), {"lambda": best})
        self.coefficients[f"{scenario}/task_arithmetic_lambda"] = {"picked": best, "heldout_loss": losses}

    def learned(self, scenario: str, merged: list[str], evaluate_on: list[str], variants: list[tuple]) -> None:
        """variants: (label, granularity, loss, init method, CoefficientConfig overrides)."""
        p = self.p
        for label, gran, loss, init, over in variants:
            with self.stage(f"{scenario}: {label}"):
                ccfg = p.cfg.coefficients.model_copy(update={"granularity": gran, "loss": loss, **over})
                res, state = p.merges.learn(merged, ccfg, init)
                self.record(scenario, p.merges.evaluate_at({label: state}, evaluate_on))
                self.coefficients[f"{scenario}/{label}"] = {
                    "groups": list(res.groups), "W": res.W.tolist(),
                    "first_loss": res.history[0]["loss"] if res.history else None,
                    "last_loss": res.history[-1]["loss"] if res.history else None}

    def unseen(self, held_out: str, domains: list[str], extras: list[str], holdout: float) -> None:
        """Merge the other domains' vectors, test on `held_out`; base and fine-tuned rows come from the run."""
        p = self.p
        scenario, merged = f"unseen-{held_out}", [d for d in domains if d != held_out]
        known = [r for r in self.rows if r["scenario"] == "in-domain" and r["domain"] == held_out
                 and (r["method"] == "pretrained" or r["method"] in {f"finetuned-{d}" for d in merged})]
        self.rows += [{**r, "scenario": scenario} for r in known]
        with self.stage(f"{scenario}: training-free merges"):
            free = p.merges.merged_states(merged, methods=TRAINING_FREE)
            self.record(scenario, p.merges.evaluate_at(free, [held_out]), label=lambda m: FREE_LABELS.get(m, m))
        if "picked" in extras:
            with self.stage(f"{scenario}: task arithmetic, lambda picked on held-out pseudo-users"):
                self.picked_lambda(scenario, merged, [held_out], holdout)
        variants = [(f"mergerec-{g}", g, "mergerec", None, {}) for g in ("task", "layer")] + [NO_FIT]
        if "adamerging" in extras:
            variants.insert(0, ("adamerging", "layer", "adamerging", "task_arithmetic", {}))
        self.learned(scenario, merged, [held_out], variants)

    def in_domain_extras(self, domains: list[str], extras: list[str], holdout: float) -> None:
        p = self.p
        if "picked" in extras:
            with self.stage("in-domain: task arithmetic, lambda picked on held-out pseudo-users"):
                self.picked_lambda("in-domain", domains, domains, holdout)
        # both granularities in every table, whichever the run learned (its `granularities`)
        variants = [(f"mergerec-{g}", g, "mergerec", None, {}) for g in ("task", "layer")
                    if g not in p.cfg.granularities] + [NO_FIT]
        if "adamerging" in extras:
            variants.append(("adamerging", "layer", "adamerging", "task_arithmetic", {}))
        if "ablations" in extras:
            init = p.cfg.init_method
            variants += [(f"mergerec-layer {name}", "layer", "mergerec", init, over) for name, over in ABLATIONS]
            other = "ties" if init == "task_arithmetic" else "task_arithmetic"
            variants += [(f"mergerec-{g} from {other}", g, "mergerec", other, {}) for g in ("task", "layer")]
        self.learned("in-domain", domains, domains, variants)

    def joint(self, data: Path, domains: list[str], epochs: int) -> None:
        """Joint training on the pooled train + validation items (non-private reference): the final fit alone,
        for `epochs` (a pooled selection run would double an already long stage on 2 cores)."""
        p = self.p
        silos = [load_silo(data / d, d) for d in domains]
        joint = copy.deepcopy(p.base.model)
        refit(joint, silos, [p.base.model.domain_inputs(s.catalog) for s in silos], p.cfg.train, epochs)
        self.record("in-domain", p.merges.evaluate_at({"joint (pooled, non-private)": shared_state(joint)}, domains),
                    {"epochs": epochs})


def write(bench: Bench, report: dict, args, command: str, done: bool) -> str:
    """merge.json (every row, summary, verdicts, stages, bytes, coefficients) and merge.md; returns the md."""
    summary = summarise(bench.rows)
    doc = {"command": command, "rows": bench.rows, "summary": summary, "stages": bench.stage.rows,
           "base": {"spec": bench.p.cfg.backbone.base, "fingerprint": bench.p.base.fingerprint},
           "run_config": bench.p.cfg.model_dump(mode="json"), "run_dir": str(args.run_dir),
           "fine_tuning": report.get("finetune"), "validation": report.get("validation"),
           "coefficients": bench.coefficients, "bytes_per_silo": bench.bytes,
           "mergerec_vs_training_free": compare(summary), "targets": targets(summary),
           "bytes_note": "every method needs the task vector; only MergeRec also needs the teacher logits",
           "complete": done}
    md = []
    for scenario in dict.fromkeys(r["scenario"] for r in summary):
        part = [r for r in summary if r["scenario"] == scenario]
        md.append(f"### {scenario}\n\n" + markdown_table(part, ["method"] + [c for c in part[0] if c not in ("scenario", "method")]))
    for title, table in (("MergeRec vs the best training-free merge (average test Recall@10)", compare(summary)),
                         ("MergeRec against the base, the fine-tuned models and the training-free merges", targets(summary))):
        if table:
            md.append(f"### {title}\n\n" + markdown_table(table, list(dict.fromkeys(k for r in table for k in r))))
    md.append("### stages\n\n" + markdown_table(bench.stage.rows, ["stage", "seconds", "peak_rss_mb"]))
    if bench.bytes:
        md.append("### bytes per silo (the federated run)\n\n" + markdown_table(
            [{"domain": d, **v} for d, v in bench.bytes.items()], ["domain", "sent_to_silo", "received_from_silo"]))
    text = "\n\n".join(md) + "\n"
    write_results(args.out, doc, text)
    return text


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.merge", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with one sub-folder per domain")
    ap.add_argument("--domains", nargs="+", default=["Beauty", "Sports", "Toys"])
    ap.add_argument("--run-config", default="", help='"key=value ..." over pyproject\'s [tool.flwr.app.config], '
                    "exactly as for `flwr run` (e.g. 'epochs=10 eval-max-users=5000 base=\"bundled\"'); the "
                    "benchmark only adds baselines = every training-free method unless given")
    ap.add_argument("--cache", type=Path, default=Path(".cache"), help="item-embedding cache and silo state")
    ap.add_argument("--run-dir", type=Path, default=None,
                    help="the pipeline's run directory (default .cache/bench-runs/<config fingerprint>; resumes)")
    ap.add_argument("--extras", nargs="*", choices=EXTRAS, default=EXTRAS, metavar="EXTRA",
                    help="benchmark-only rows (default all of " + ", ".join(EXTRAS) + ")")
    ap.add_argument("--holdout", type=float, default=0.1, help="pseudo-users held out to pick lambda")
    ap.add_argument("--joint-epochs", type=int, default=8,
                    help="joint training on the pooled train + validation items; 0 skips it")
    ap.add_argument("--out", type=Path, default=RESULTS / "merge.json")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        ap.error(f"data folder not found: {args.data}")
    if "picked" in args.extras and not 0 < args.holdout < 1:
        ap.error("--holdout must be in (0, 1) to pick lambda on held-out pseudo-users")
    return args


def build(args) -> Pipeline:
    """The pipeline over one in-process silo per domain, configured like `flwr run` (pyproject + overrides)."""
    over = parse_overrides(args.run_config)
    over.setdefault("baselines", ",".join(TRAINING_FREE))
    over.setdefault("evaluate-finetuned", "all")  # the unseen rows read other domains' own models on the held-out one
    over.setdefault("cache-dir", str(args.cache))
    cfg, _, _ = pipeline_config(app_defaults() | over)
    if args.run_dir is None:
        key = hashlib.sha256(json.dumps([cfg.fingerprint(), str(args.data.resolve()), args.domains]).encode())
        args.run_dir = args.cache / "bench-runs" / key.hexdigest()[:12]
    return silo_pipeline(cfg, args.data, args.domains, args.run_dir, args.cache)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    command = "python -m benchmarks.merge " + " ".join(argv if argv is not None else sys.argv[1:])
    stage = Stages()
    pipe = build(args)
    with stage("pipeline (handshake, fine-tuning, merges, pseudo-users, teacher, MergeRec, evaluation)"):
        report = pipe.run()
    bench = Bench(pipe, stage)
    bench.pipeline_rows(report)
    domains = sorted(pipe.active())
    bench.in_domain_extras(domains, args.extras, args.holdout)
    write(bench, report, args, command, False)
    for held_out in domains if "unseen" in args.extras else []:
        bench.unseen(held_out, domains, args.extras, args.holdout)
        write(bench, report, args, command, False)
    if args.joint_epochs:
        with stage("joint training on pooled data (reference)"):
            bench.joint(args.data, domains, args.joint_epochs)
    print(write(bench, report, args, command, True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
