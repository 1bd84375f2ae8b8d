"""Membership inference against silo and merged models, with and without user-level DP-SGD.

    python -m benchmarks.privacy [--data ../shared/data/amazon] [--domains Beauty Sports Toys] [--target Toys]
                                 [--epsilons inf 8 4 1] [--max-users 2000] [--run-config "k=v ..."]
                                 [--cache DIR] [--run-dir DIR] [--out benchmarks/results/privacy.json]
    python -m benchmarks.privacy --smoke      # demo data, tiny sizes: proves the driver (a test runs it)

A driver over the pipeline's own code. For each epsilon it runs `server.pipeline.Pipeline` over in-process silos
(configured like `flwr run`: pyproject defaults, these options, `dp-epsilon`), each silo fine-tuning on a seeded
subsample of `--max-users` users (the machine's budget, stated in the result file); then it attacks the target
domain's fine-tuned silo model and the shipped merged model with a loss-threshold membership-inference attack:
score = minus the model's mean next-item cross-entropy (full softmax, `common.model.train._batch_loss`) over a
user's train + validation sequence; members = the users the target silo trained on
(`common.model.train.trained_users`), non-members = users of the same domain it never trained on, `--attack-users`
of each (seeded). Reports the attack's AUC and TPR at 1% FPR next to test NDCG@10 / Recall@10 of the silo's own
and the merged model (the pipeline's evaluation). First, to show the attack works, a deliberately overfitted model:
the target silo's model trained without DP, blocks unfrozen, no dropout, `--overfit-epochs` epochs on
`--overfit-users` users at `--overfit-lr`, no early stopping.

Resumable: every part's result is a file in `--run-dir` as soon as it is measured (and each epsilon's pipeline
has its own run directory); a rerun skips what is there. The result file is written once every part is done.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.core import DEFAULT_DATA, RESULTS
from benchmarks.driver import silo_pipeline
from common.core.files import atomic_write
from common.core.report import markdown_table, relative_paths, write_results

log = logging.getLogger("benchmarks.privacy")

#: the sizes of `--smoke` (demo data): a test runs the driver with these
SMOKE = {"max_users": 30, "attack_users": 10, "overfit_users": 20, "overfit_epochs": 3, "overfit_lr": 5e-3, "epsilons": ["inf", "8"],
         "run_config": "epochs=2 coef-steps=5 teacher-top-k=8 baselines='task_arithmetic' granularities='task' "
                       "val-max-users=5 tower-fit-epochs=0 num-negatives=16"}


def auc_and_tpr(members: np.ndarray, non_members: np.ndarray, fpr: float = 0.01) -> tuple[float, float]:
    """(ROC AUC, TPR at `fpr`) of the attack "member when score > threshold". AUC: the probability that a random
    member scores above a random non-member (ties count half). TPR at fpr: members above the threshold that at
    most `fpr` of the non-members exceed."""
    scores = np.concatenate([members, non_members])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for s in np.unique(scores):  # ties: their mean rank
        tie = scores == s
        ranks[tie] = ranks[tie].mean()
    n1, n0 = len(members), len(non_members)
    auc = (ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)
    allowed = math.floor(fpr * n0)  # non-members allowed above the threshold
    threshold = np.sort(non_members)[::-1][allowed] if allowed < n0 else -np.inf
    return float(auc), float((members > threshold).mean())


def user_scores(model, silo, dom, users: list[int], train_cfg) -> np.ndarray:
    """Minus each user's mean next-item cross-entropy under `model` (eval mode, full softmax over the catalog,
    the training loss's seen-item rule) on their train + validation sequence: what a loss-threshold attacker
    computes."""
    import torch

    from common.model import train
    from common.model.backbones import encode_all_items

    cfg = train_cfg.model_copy(update={"negatives": "full"})
    model.eval()
    out = []
    with torch.no_grad():
        items = encode_all_items(model, dom)
        for u in users:
            seq = [*silo.train[u], *([silo.val[silo.users[u]]] if silo.users[u] in silo.val else [])]
            seq = seq[-(model.cfg.max_items + 1):]
            row = (seq[:-1], seq[1:]) if model.causal else (seq[:-1][-model.cfg.max_items:], [seq[-1]])
            out.append(-float(train._batch_loss(model, dom, [row], cfg, items, items.device)))
    return np.array(out)


def attack_sets(silo, causal: bool, train_cfg, n: int, seed: int) -> tuple[list[int], list[int]]:
    """(members, non-members): `n` of each (fewer if the silo has fewer), seeded, as indices into silo.users."""
    from common.model.train import trained_users

    rng = np.random.default_rng(seed)
    members = trained_users(silo, causal, train_cfg)
    trained = set(members)
    others = [u for u in range(len(silo.users)) if u not in trained and len(silo.train[u]) >= 1]
    k = min(n, len(members), len(others))
    return sorted(rng.choice(members, k, replace=False).tolist()), sorted(rng.choice(others, k, replace=False).tolist())


def attack(model, silo, dom, train_cfg, args) -> dict:
    members, others = attack_sets(silo, model.causal, train_cfg, args.attack_users, args.seed)
    m, o = user_scores(model, silo, dom, members, train_cfg), user_scores(model, silo, dom, others, train_cfg)
    auc, tpr = auc_and_tpr(m, o)
    return {"attack_auc": round(auc, 4), "tpr@1%fpr": round(tpr, 4), "attack_users": len(members),
            "member_loss": round(float(-m.mean()), 4), "non_member_loss": round(float(-o.mean()), 4)}


def _silo(args, domain: str):
    from common.data.format import load_silo

    return load_silo(args.data / domain, domain)


def overfit(args) -> dict:
    """The attack on a deliberately overfitted silo model (no DP, everything trained, no dropout, no early stop)."""
    from common.model import train
    from common.model.backbones import build_backbone
    from server.config import app_defaults, parse_overrides, pipeline_config

    over = parse_overrides(args.run_config) | {"cache-dir": str(args.cache)}
    cfg, _, _ = pipeline_config(app_defaults() | over)
    tcfg = cfg.train.model_copy(update={"max_users": args.overfit_users, "freeze": [], "selection": "held-out-users",
                                        "lr": args.overfit_lr})
    silo = _silo(args, args.target)
    model = build_backbone(cfg.backbone.model_copy(update={"dropout": 0.0}), seed=cfg.seed)
    dom = model.domain_inputs(silo.catalog)
    t0 = time.perf_counter()
    train.refit(model, silo, dom, tcfg, args.overfit_epochs)  # exactly these epochs, no selection
    test = train.evaluate_split(model, silo, dom, "test", max_users=cfg.eval_max_users, seed=0)
    return {"model": "overfitted silo model", "epsilon": "inf", "domain": args.target, **attack(model, silo, dom, tcfg, args),
            "test_ndcg@10": round(test["ndcg@10"], 4), "test_recall@10": round(test["recall@10"], 4),
            "train_users": len(train.trained_users(silo, model.causal, tcfg)), "epochs": args.overfit_epochs,
            "seconds": round(time.perf_counter() - t0, 1)}


def one_epsilon(eps: str, args) -> list[dict]:
    """Pipeline at `eps` (inf = no DP), then the attack on the target's silo model and on the shipped model."""
    from safetensors.torch import load_file

    from common.model.backbones import build_backbone
    from server.config import app_defaults, parse_overrides, pipeline_config

    over = parse_overrides(args.run_config) | {"cache-dir": str(args.cache), "max-users": args.max_users,
                                              "dp-epsilon": "none" if eps == "inf" else float(eps)}
    cfg, _, _ = pipeline_config(app_defaults() | over)
    run_dir = args.run_dir / f"eps-{eps}"
    t0 = time.perf_counter()
    report = silo_pipeline(cfg, args.data, args.domains, run_dir, args.cache).run()
    seconds = time.perf_counter() - t0
    silo = _silo(args, args.target)
    base = build_backbone(cfg.backbone.model_copy(update={"cache_dir": args.cache / "item_embeddings"}), seed=cfg.seed)
    dom = base.domain_inputs(silo.catalog)
    own = next((run_dir / "silo-state" / args.target).glob("finetuned-*.safetensors"))
    shipped = report["selection"]["chosen"]
    rows = []
    for label, path, name in (("silo model", own, f"finetuned-{args.target}"),
                              (f"merged model ({shipped})", run_dir / "model" / "model.safetensors", shipped)):
        model = copy.deepcopy(base)
        model.load_state_dict(load_file(str(path)), strict=False)
        test = report["metrics"][args.target][name]
        means = [report["metrics"][d][name]["values"] for d in report["metrics"] if name in report["metrics"][d]]
        rows.append({"model": label, "epsilon": eps, "domain": args.target,
                     **attack(model, silo, dom, cfg.train, args),
                     "test_ndcg@10": round(test["values"]["ndcg@10"], 4),
                     "test_recall@10": round(test["values"]["recall@10"], 4),
                     "mean_test_ndcg@10": round(float(np.mean([v["ndcg@10"] for v in means])), 4),
                     "eval_users": test["users"]})
    dp = {d: f.get("dp") for d, f in report["finetune"].items()}
    for r in rows:
        r["dp"] = dp
        r["pipeline_seconds"] = round(seconds, 1)
        r["dp_epsilon_spent"] = None if eps == "inf" else round(max(x["epsilon"] for x in dp.values()), 3)
    return rows


def base_row(args) -> list[dict]:
    """The untrained shared base (trained on no user, so private at any epsilon): its test metrics from the first
    epsilon's pipeline report (the pipeline evaluates it as `pretrained`)."""
    report = json.loads((args.run_dir / f"eps-{args.epsilons[0]}" / "report.json").read_text())
    test = report["metrics"][args.target]["pretrained"]
    means = [report["metrics"][d]["pretrained"]["values"]["ndcg@10"] for d in report["metrics"]]
    return [{"model": "untrained base (no fine-tuning)", "epsilon": "0", "domain": args.target,
             "test_ndcg@10": round(test["values"]["ndcg@10"], 4), "test_recall@10": round(test["values"]["recall@10"], 4),
             "mean_test_ndcg@10": round(float(np.mean(means)), 4), "eval_users": test["users"]}]


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.privacy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--domains", nargs="+", default=["Beauty", "Sports", "Toys"])
    ap.add_argument("--target", default="Toys", help="the domain whose users are attacked")
    ap.add_argument("--epsilons", nargs="+", default=["inf", "8", "4", "1"])
    ap.add_argument("--max-users", type=int, default=2000, help="each silo fine-tunes on a seeded subsample of this "
                    "many users (the machine's budget)")
    ap.add_argument("--attack-users", type=int, default=500, help="members and non-members each")
    ap.add_argument("--overfit-users", type=int, default=300)
    ap.add_argument("--overfit-epochs", type=int, default=30)
    ap.add_argument("--overfit-lr", type=float, default=5e-3)
    ap.add_argument("--run-config", default="", help="pipeline run-config overrides (flwr syntax) for every run")
    ap.add_argument("--cache", type=Path, default=Path(".cache"))
    ap.add_argument("--run-dir", type=Path, default=Path(".cache/privacy-run"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "privacy.json")
    ap.add_argument("--smoke", action="store_true", help="demo data, tiny sizes (proves the driver)")
    args = ap.parse_args(argv)
    if args.smoke:
        from common.data.demo import make_demo

        args.data = args.run_dir / "demo-data"
        if not args.data.is_dir():
            make_demo(args.data)
        args.domains = sorted(p.name for p in args.data.iterdir() if p.is_dir())
        args.target = args.domains[0]
        for k, v in SMOKE.items():
            setattr(args, k, v)
    if not args.data.is_dir():
        ap.error(f"data folder not found: {args.data}")
    if args.target not in args.domains:
        ap.error(f"--target {args.target} is not among --domains")
    bad = [e for e in args.epsilons if e != "inf" and not (e.replace(".", "", 1).isdigit() and float(e) > 0)]
    if bad:
        ap.error(f"--epsilons: each must be inf or a positive number (got {bad})")
    return args


COLUMNS = ["model", "epsilon", "dp_epsilon_spent", "attack_auc", "tpr@1%fpr", "attack_users", "member_loss",
           "non_member_loss", "test_ndcg@10", "test_recall@10", "mean_test_ndcg@10"]


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    # paths of this machine as relative ones (result files hold no absolute path)
    command = "python -m benchmarks.privacy " + shlex.join(relative_paths(list(argv if argv is not None
                                                                              else sys.argv[1:])))
    args.run_dir.mkdir(parents=True, exist_ok=True)
    parts = [("overfit", lambda: [overfit(args)])] + [(f"eps-{e}", lambda e=e: one_epsilon(e, args))
                                                       for e in args.epsilons] + [("base", lambda: base_row(args))]
    rows = []
    for name, job in parts:  # each part's rows are kept in the run directory as soon as they are measured
        done = args.run_dir / f"{name}.json"
        if done.exists():
            log.info("%s: reusing %s", name, done)
        else:
            log.info("%s ...", name)
            atomic_write(done, json.dumps(job(), indent=1))
        rows += json.loads(done.read_text())
    # written once, at the end: the commit it records is the code's, not one with this file half-written
    doc = {"command": command, "target": args.target, "domains": args.domains,
           "sizing": {"max_users_per_silo": args.max_users, "attack_users": args.attack_users,
                      "overfit_users": args.overfit_users, "overfit_epochs": args.overfit_epochs,
                      "overfit_lr": args.overfit_lr, "run_config": args.run_config},
           "attack": "loss threshold: minus the mean next-item cross-entropy (full softmax) over a user's "
                     "train + validation sequence; members = trained users, non-members = untrained users of "
                     "the same domain", "rows": rows}
    write_results(args.out, doc, markdown_table(rows, COLUMNS))
    print(markdown_table(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
