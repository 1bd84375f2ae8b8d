"""Benchmark the merge engine in process on real data (default ../shared/data/amazon: Beauty, Sports, Toys).

    python -m benchmarks.merge [--data DIR] [--domains Beauty Sports Toys] [--coef-steps 500]

One run, the same fine-tuned light models for every method (reused from `python -m benchmarks.core` when
present in .cache/bench-models, else fine-tuned here with the same settings). Test Recall@10 / NDCG@10 per
domain and averaged (Recall@50 / NDCG@50 in the JSON) for: pretrained zero-shot, the 3 x 3 matrix of
fine-tuned models, weight averaging, task arithmetic (lambda 0.3 and lambda picked on held-out pseudo-users),
TIES, DARE (TIES and linear), breadcrumbs, AdaMerging, MergeRec task-wise and layer-wise (starting from task
arithmetic at W = 0.2 by default, `--mergerec-init ties` for TIES at W = 1.0), and joint training on pooled
data (non-private reference). Unseen domains: merge two, test on the third, for all three choices.
Writes benchmarks/results/merge.json and merge.md (`--out`).

`--methods` measures a subset (each row of a text-backbone run re-encodes whole catalogs). `--backbone text`
fine-tunes MiniLM end to end on `--text-users` users per domain, a fixed `--text-epochs` on train + val items.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import resource
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from benchmarks.core import DEFAULT_DATA, LIGHT_EPOCHS, LIGHT_PATIENCE, LIGHT_VAL_USERS, RESULTS
from common.backbones import build_backbone, encode_all_items, shared_state
from common.config import BackboneConfig, TrainConfig
from common.data import load_silo
from common.merging import methods as mm
from common.merging.coefficients import (
    CoefficientConfig,
    CoefficientMerger,
    DomainBatchSource,
    encode_items,
    learn_coefficients,
    pseudo_user_losses,
)
from common.merging.pseudo_users import select_pseudo_users
from common.merging.task_vectors import fingerprint
from common.merging.teacher import teacher_topk
from common.report import markdown_table
from common.train import evaluate_split, fine_tune, refit

log = logging.getLogger("benchmarks.merge")
TRAINING_FREE = ["weight_average", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs"]
#: the row labels of the training-free merges (task arithmetic at the reference's lambda 0.3)
FREE_LABELS = {name: "task_arithmetic@0.3" if name == "task_arithmetic" else name for name in TRAINING_FREE}
#: what `--methods` can pick ("finetuned" = every fine-tuned model on every domain)
METHODS = ["pretrained", "finetuned", *FREE_LABELS.values(), "task_arithmetic@picked", "adamerging",
           "mergerec-task", "mergerec-layer"]
LAMBDAS = [0.1, 0.2, 0.3, 0.5, 0.7, 1.0]
#: MergeRec options measured against the default (dropout on, item embeddings frozen at init, last W)
ABLATIONS = [("dropout off", {"dropout": False}), ("items refreshed every 50 steps", {"item_refresh_every": 50}),
             ("W picked on 10% held-out pseudo-users", {"holdout_fraction": 0.1})]


def fingerprint_config(cfg: TrainConfig) -> str:
    """Short hash of the training settings that change the fine-tuned weights (cache key)."""
    import hashlib

    return hashlib.sha256(cfg.model_dump_json(exclude={"progress", "device"}).encode()).hexdigest()[:10]


class Stages:
    """Wall time and peak RSS (process high-water mark, MB) at the end of each stage."""

    def __init__(self):
        self.rows: list[dict] = []

    def __call__(self, name: str):
        stages = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()
                log.info("stage %s ...", name)

            def __exit__(self, *exc):
                dt = time.perf_counter() - self.t0
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                stages.rows.append({"stage": name, "seconds": round(dt, 1), "peak_rss_mb": round(peak, 1)})
                log.info("stage %s: %.1fs, peak RSS %.0f MB", name, dt, peak)

        return _Ctx()


def compare(summary: list[dict]) -> list[dict]:
    """In-domain and the mean over the unseen-domain scenarios: the best training-free merge (task arithmetic
    at the picked lambda included) against MergeRec task- and layer-wise, by average test Recall@10."""
    free = set(FREE_LABELS.values()) | {"task_arithmetic@picked"}
    out = []
    for label, keep in (("in-domain", lambda s: s == "in-domain"), ("unseen (mean of 3)", lambda s: s.startswith("unseen-"))):
        scen = [r for r in summary if keep(r["scenario"])]
        by_method: dict[str, list[float]] = {}
        for r in scen:
            by_method.setdefault(r["method"], []).append(r["avg R@10"])
        n = max((len(v) for v in by_method.values()), default=0)
        mean = {m: sum(v) / len(v) for m, v in by_method.items() if len(v) == n}
        tf = {m: v for m, v in mean.items() if m in free}
        ours = {g: mean[f"mergerec-{g}"] for g in ("task", "layer") if f"mergerec-{g}" in mean}
        if not tf or not ours:  # a `--methods` run without one side
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.merge", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--domains", nargs="+", default=["Beauty", "Sports", "Toys"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=".cache")
    ap.add_argument("--backbone", default="light", choices=["light", "text"],
                    help="text: MiniLM fine-tuned end to end on --text-users users per domain (slow on CPU: every "
                    "evaluation re-encodes the catalog)")
    ap.add_argument("--encoder", default="minilm", help="text encoder ('minilm' bundled, or a local folder)")
    ap.add_argument("--text-users", type=int, default=1000, help="text backbone: users each silo fine-tunes on")
    ap.add_argument("--text-epochs", type=int, default=1,
                    help="text backbone: epochs on train + val items (a fixed final fit, no early-stopping run)")
    ap.add_argument("--pseudo-users", type=int, default=None,
                    help="a seeded random sample of this many items per domain as pseudo-users (default: all)")
    ap.add_argument("--base", default="init",
                    help="light backbone's base: 'init' (seeded text-similarity init), 'bundled' (pretrained on "
                    "public domains, common/assets), or a base file from `python -m common.pretrain`")
    ap.add_argument("--light-epochs", type=int, default=LIGHT_EPOCHS)
    ap.add_argument("--light-lr", type=float, default=TrainConfig().lr)
    ap.add_argument("--light-patience", type=int, default=LIGHT_PATIENCE)
    ap.add_argument("--light-val-users", type=int, default=LIGHT_VAL_USERS)
    ap.add_argument("--l2sp", type=float, default=0.0, help="fine-tuning pull toward the base (TrainConfig.l2sp)")
    ap.add_argument("--freeze", nargs="*", default=[], help="parameter prefixes kept at the base (TrainConfig.freeze)")
    ap.add_argument("--coef-steps", type=int, default=500)
    ap.add_argument("--teacher-top-k", type=int, default=256)
    ap.add_argument("--joint-epochs", type=int, default=8,
                    help="joint training: epochs on the pooled train + validation items (the single-domain light "
                    "models' early stopping chose 8 on Beauty, Sports and Toys); 0 skips it")
    ap.add_argument("--holdout", type=float, default=0.1, help="pseudo-users held out to pick lambda")
    ap.add_argument("--no-ablations", dest="ablations", action="store_false",
                    help="skip the MergeRec option ablations and the other init (both in-domain only)")
    ap.add_argument("--mergerec-init", default="task_arithmetic", choices=["ties", "task_arithmetic"],
                    help="training-free merge MergeRec starts from (init W 1.0 for TIES, 0.2 for task arithmetic)")
    ap.add_argument("--no-unseen", dest="unseen", action="store_false", help="in-domain scenario only")
    ap.add_argument("--eval-users", type=int, default=None,
                    help="test on a seeded subsample of this many users per domain (default: all)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS, metavar="METHOD",
                    help="measure only these (default: all of " + ", ".join(METHODS) + "); the ablations run only "
                    "with mergerec-layer, and joint training is --joint-epochs")
    ap.add_argument("--out", type=Path, default=RESULTS / "merge.json")
    args = ap.parse_args(argv)
    wanted = set(args.methods)
    learned_wanted = wanted & {"task_arithmetic@picked", "adamerging", "mergerec-task", "mergerec-layer"}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not args.data.is_dir():
        ap.error(f"data folder not found: {args.data}")
    torch.manual_seed(args.seed)
    stage = Stages()
    doms_names = args.domains

    with stage("load + item embeddings"):
        silos = {d: load_silo(args.data / d) for d in doms_names}
        bb = BackboneConfig(kind=args.backbone, encoder=args.encoder, cache_dir=Path(args.cache) / "item_embeddings",
                            base=args.base)
        base = build_backbone(bb, seed=args.seed)
        base_state = shared_state(base)
        base_fp = fingerprint(base_state)
        dom = {d: base.domain_inputs(silos[d].catalog) for d in doms_names}

    if args.backbone == "light":  # the core benchmark's settings (its models are reused when present)
        train_cfg = TrainConfig(epochs=args.light_epochs, patience=args.light_patience, lr=args.light_lr,
                                val_max_users=args.light_val_users, l2sp=args.l2sp, freeze=args.freeze,
                                seed=args.seed, progress=False)
        default = TrainConfig(epochs=LIGHT_EPOCHS, patience=LIGHT_PATIENCE, val_max_users=LIGHT_VAL_USERS,
                              seed=args.seed, progress=False)
        # the core benchmark's models are reused only for its exact settings; anything else gets its own cache
        same = args.base == "init" and train_cfg == default
        tag = "light" if same else f"light-{base_fp[:12]}-{fingerprint_config(train_cfg)}"
    else:  # MiniLM end to end on a user subsample (2 CPU cores)
        train_cfg = TrainConfig.for_backbone("text", max_users=args.text_users, epochs=args.text_epochs,
                                             val_max_users=args.eval_users, seed=args.seed, progress=False)
        tag = f"text-{Path(args.encoder).name}-users{args.text_users}-fit{args.text_epochs}"
    finetuned, ft_stats = {}, {}
    with stage("fine-tune (or load) per domain"):
        for d in doms_names if wanted - {"pretrained"} else []:  # zero-shot alone needs no fine-tuning
            path = Path(args.cache) / "bench-models" / f"{d}-{tag}-seed{args.seed}.safetensors"
            side = path.with_suffix(".json")
            if path.exists():
                finetuned[d] = load_file(str(path))
                ft_stats[d] = json.loads(side.read_text()) if side.exists() else {"reused": str(path)}
            else:
                if args.backbone == "light":
                    res = fine_tune(copy.deepcopy(base), silos[d], dom[d], train_cfg)
                    finetuned[d] = res.state
                    ft_stats[d] = {"epochs": res.epochs, "best_epoch": res.best_epoch, "refit_epochs": res.refit_epochs,
                                   "seconds": round(res.seconds, 1), "val_history": res.history}
                    if tag != "light":  # the core benchmark owns the "light" models; keep ours for the next run
                        path.parent.mkdir(parents=True, exist_ok=True)
                        save_file({n: t.contiguous() for n, t in res.state.items()}, str(path))
                        side.write_text(json.dumps(ft_stats[d]))
                else:  # the final fit alone, --text-epochs on train + val items: a selection run on a user
                    # subsample would be noise, and may keep the start (a zero task vector) on 2 cores
                    model = copy.deepcopy(base)
                    refit(model, silos[d], dom[d], train_cfg, args.text_epochs)
                    finetuned[d] = shared_state(model)
                    path.parent.mkdir(parents=True, exist_ok=True)  # slow on 2 cores: keep it for the next run
                    save_file({n: t.contiguous() for n, t in finetuned[d].items()}, str(path))
    tvs = {d: {n: finetuned[d][n] - base_state[n] for n in base_state} for d in finetuned}
    tv_bytes = sum(t.numel() for t in base_state.values()) * 4

    def model_with(state):
        m = copy.deepcopy(base)
        m.load_state_dict(state, strict=False)
        return m.eval()

    test_cache: dict = {}

    def test(state_name: str, state, d: str) -> dict:
        key = (state_name, d)
        if key not in test_cache:
            test_cache[key] = evaluate_split(model_with(state), silos[d], dom[d], "test", seed=args.seed,
                                           max_users=args.eval_users)
        return test_cache[key]

    teachers, pseudo = {}, {}
    with stage("pseudo-users + teacher top-k (silo side)"):
        for d in doms_names if learned_wanted else []:  # only what learns from pseudo-users needs them
            pseudo[d] = select_pseudo_users(dom[d].num_items, "random" if args.pseudo_users else "all",
                                            n=args.pseudo_users, seed=args.seed)
            ft = model_with(finetuned[d])
            with torch.no_grad():
                items = encode_all_items(ft, dom[d])
                teachers[d] = teacher_topk(lambda ids, m=ft, dd=dom[d]: m(dd, "histories", ids.view(-1, 1)),
                                           items, pseudo[d], args.teacher_top_k)
    logit_bytes = {d: int(teachers[d].indices.numel() * 8) for d in teachers}

    rows: list[dict] = []

    def record(scenario: str, method: str, state, eval_domains: list[str], extra: dict | None = None):
        for d in eval_domains:
            m = test(f"{scenario}/{method}", state, d)
            rows.append({"scenario": scenario, "method": method, "domain": d, **{k: m[k] for k in
                         ("recall@10", "ndcg@10", "recall@50", "ndcg@50")}, **(extra or {})})

    def sources(domains: list[str], holdout: float = 0.0):
        """(train sources, held-out sources) of pseudo-users with their teachers."""
        train, held = [], []
        g = torch.Generator().manual_seed(args.seed)
        for d in domains:
            p = pseudo[d]
            perm = torch.randperm(len(p), generator=g)
            n_hold = int(len(p) * holdout)
            for part, out in ((perm[n_hold:], train), (perm[:n_hold], held)):
                if len(part):
                    idx = part.sort().values
                    t = teachers[d]
                    sub = type(t)(item_ids=t.item_ids[idx], indices=t.indices[idx], values=t.values[idx],
                                  num_items=t.num_items)
                    out.append(DomainBatchSource(dom_inputs=dom[d], pseudo_item_ids=p[idx], teacher=sub, name=d))
        return train, held

    def heldout_loss(state, held) -> float:
        cfg = CoefficientConfig()
        params = {n: t for n, t in state.items()}
        total, count = 0.0, 0
        with torch.no_grad():
            for s in held:
                items = encode_items(base.eval(), params, s, 4096)
                rows_ = torch.arange(len(s.pseudo_item_ids))
                for a in range(0, len(rows_), 512):
                    losses = pseudo_user_losses(base.eval(), params, s, rows_[a:a + 512], items, cfg)
                    total += float(losses.sum())
                    count += len(losses)
        return total / max(count, 1)

    coef_log = {}

    def run_scenario(scenario: str, merged: list[str], eval_domains: list[str]):
        vecs = [tvs[d] for d in merged if d in tvs]  # none when only zero-shot rows are wanted
        with stage(f"{scenario}: training-free merges"):
            for name, label in FREE_LABELS.items():
                if label in wanted:
                    plan = mm.process(vecs, name, seed=args.seed)
                    record(scenario, label, mm.merge(base_state, plan.vectors, plan.weights), eval_domains)
        if "task_arithmetic@picked" in wanted:
            with stage(f"{scenario}: task arithmetic, lambda picked on held-out pseudo-users"):
                _, held = sources(merged, args.holdout)
                plan = mm.process(vecs, "task_arithmetic", seed=args.seed)
                losses = {lam: heldout_loss(mm.merge(base_state, plan.vectors, [lam] * len(vecs)), held)
                          for lam in LAMBDAS}
                best = min(losses, key=losses.get)
                record(scenario, "task_arithmetic@picked", mm.merge(base_state, plan.vectors, [best] * len(vecs)),
                       eval_domains, {"lambda": best})
                coef_log[f"{scenario}/task_arithmetic_lambda"] = {"picked": best, "heldout_loss": losses}
        train_src = sources(merged)[0] if learned_wanted else []
        learned = [(label, gran, loss, init, {}) for label, gran, loss, init in (
            ("adamerging", "layer", "adamerging", "task_arithmetic"),
            ("mergerec-task", "task", "mergerec", args.mergerec_init),
            ("mergerec-layer", "layer", "mergerec", args.mergerec_init)) if label in wanted]
        if args.ablations and scenario == "in-domain" and "mergerec-layer" in wanted:  # options issue 3 measures
            learned += [(f"mergerec-layer {name}", "layer", "mergerec", args.mergerec_init, over)
                        for name, over in ABLATIONS]
            other = "ties" if args.mergerec_init == "task_arithmetic" else "task_arithmetic"
            learned += [(f"mergerec-{g} from {other}", g, "mergerec", other, {}) for g in ("task", "layer")]
        for label, gran, loss, init_method, over in learned:
            with stage(f"{scenario}: {label}"):
                plan = mm.process(vecs, init_method, seed=args.seed)
                cfg = CoefficientConfig(granularity=gran, loss=loss, steps=args.coef_steps, seed=args.seed, **over)
                res = learn_coefficients(base, base_state, plan.vectors, base.layer_of, train_src, cfg,
                                         progress=False, method=init_method)
                state = CoefficientMerger(base_state, plan.vectors, base.layer_of, gran).merged_state(res.W)
                record(scenario, label, state, eval_domains)
                coef_log[f"{scenario}/{label}"] = {"groups": list(res.groups), "W": res.W.tolist(),
                                                   "first_loss": res.history[0]["loss"] if res.history else None,
                                                   "last_loss": res.history[-1]["loss"] if res.history else None}

    def save(done: bool) -> list[str]:
        """Write merge.json / merge.md with every row so far (after each scenario: nothing lost if a
        later stage fails or the run is stopped)."""
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
        sent = {d: {"task_vector_bytes": tv_bytes, "teacher_logit_bytes": logit_bytes.get(d, 0)} for d in doms_names}
        report = {"command": "python -m benchmarks.merge " + " ".join(argv or sys.argv[1:]), "rows": rows,
                  "summary": summary, "stages": stage.rows, "base": {"spec": args.base, "fingerprint": base_fp},
                  "fine_tuning": {"config": train_cfg.model_dump(mode="json"), "per_domain": ft_stats}, "coefficients": coef_log, "bytes_sent_per_silo": sent,
                  "mergerec_vs_training_free": compare(summary), "targets": targets(summary),
                  "bytes_note": "every method needs the task vector; only MergeRec also needs the teacher logits",
                  "config": vars(args) | {"data": str(args.data), "out": str(args.out)}, "complete": done}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        md = []
        for scenario in dict.fromkeys(r["scenario"] for r in summary):
            part = [r for r in summary if r["scenario"] == scenario]
            cols = ["method"] + [c for c in part[0] if c not in ("scenario", "method")]
            md.append(f"### {scenario}\n\n" + markdown_table(part, cols))
        verdict = compare(summary)
        if verdict:
            md.append("### MergeRec vs the best training-free merge (average test Recall@10)\n\n"
                      + markdown_table(verdict, list(verdict[0])))
        goal = targets(summary)
        if goal:
            md.append("### MergeRec against the base, the fine-tuned models and the training-free merges\n\n"
                      + markdown_table(goal, list(dict.fromkeys(k for r in goal for k in r))))
        md.append("### stages\n\n" + markdown_table(stage.rows, ["stage", "seconds", "peak_rss_mb"]))
        md.append("### bytes a silo sends\n\n" + markdown_table(
            [{"domain": d, **v} for d, v in sent.items()], ["domain", "task_vector_bytes", "teacher_logit_bytes"]))
        args.out.with_suffix(".md").write_text("\n\n".join(md) + "\n")
        return md

    with stage("zero-shot + fine-tuned matrix"):
        if "pretrained" in wanted:
            record("in-domain", "pretrained", base_state, doms_names)
        for src in doms_names if "finetuned" in wanted else []:
            record("in-domain", f"finetuned-{src}", finetuned[src], doms_names)
    run_scenario("in-domain", doms_names, doms_names)
    save(False)
    for held_out in doms_names if args.unseen else []:
        merged = [d for d in doms_names if d != held_out]
        scenario = f"unseen-{held_out}"
        if "pretrained" in wanted:
            record(scenario, "pretrained", base_state, [held_out])
        for src in merged if "finetuned" in wanted else []:
            record(scenario, f"finetuned-{src}", finetuned[src], [held_out])
        run_scenario(scenario, merged, [held_out])
        save(False)
    if args.joint_epochs:
        with stage("joint training on pooled data (reference)"):
            # the final fit alone, for the epoch count early stopping chose for the single-domain models
            # (a pooled selection run would double an already long stage on 2 cores)
            joint = copy.deepcopy(base)
            refit(joint, [silos[d] for d in doms_names], [dom[d] for d in doms_names], train_cfg, args.joint_epochs)
            record("in-domain", "joint (pooled, non-private)", shared_state(joint), doms_names,
                   {"epochs": args.joint_epochs})

    print("\n\n".join(save(True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
