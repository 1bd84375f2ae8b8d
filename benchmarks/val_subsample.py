"""Early stopping on a seeded validation subsample: wall time and test quality against validating on every user.

    python -m benchmarks.val_subsample [--data-root DIR] [--domain Toys] [--val-users 0,2000]
                                       [--max-users 6000] [--epochs 8] [--base init] [--cache-dir DIR]

Fine-tunes the light backbone (same code as a silo: common.model.train.fine_tune, early stopping, then the final fit
on train + validation items) once per validation setting (0 = every validation user), from the same seed,
and tests each result on every test user. Writes benchmarks/results/val-subsample.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.core import RESULTS
from common.core.report import results_page, write_results


def run_one(domain: str, data_root: Path, cache_dir: Path, val_users: int, args) -> dict:
    from common.model.backbones import build_backbone
    from common.model.config import BackboneConfig, TrainConfig
    from common.data.format import load_silo
    from common.model.train import evaluate_split, fine_tune

    silo = load_silo(data_root / domain, domain)
    model = build_backbone(BackboneConfig(cache_dir=cache_dir, base=args.base), seed=0)
    dom = model.domain_inputs(silo.catalog)
    cfg = TrainConfig(epochs=args.epochs, patience=args.patience, max_users=args.max_users or None,
                      val_max_users=val_users or None, progress=False)
    t0 = time.perf_counter()
    res = fine_tune(model, silo, dom, cfg)
    seconds = time.perf_counter() - t0
    model.load_state_dict(res.state, strict=False)
    test = evaluate_split(model.eval(), silo, dom, "test")
    return {"domain": domain, "val_users": val_users or "all", "fine_tune_s": round(seconds, 1),
            "epochs": res.epochs, "refit_epochs": res.refit_epochs, "val_ndcg@10": round(res.val["ndcg@10"], 5),
            "test_ndcg@10": round(test["ndcg@10"], 5), "test_recall@10": round(test["recall@10"], 5),
            "test_users": int(test["users"]), "val_history": res.history}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.val_subsample", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=Path("../shared/data/amazon"))
    ap.add_argument("--domain", default="Toys")
    ap.add_argument("--val-users", default="0,2000")
    ap.add_argument("--max-users", type=int, default=6000, help="training users (0 = all)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--base", default="init", help="light base: init | bundled | a base file")
    ap.add_argument("--cache-dir", type=Path, default=Path(".cache/item_embeddings"))
    ap.add_argument("--out", type=Path, default=RESULTS / "val-subsample.json")
    args = ap.parse_args(argv)
    rows = []
    for v in (int(x) for x in args.val_users.split(",")):
        rows.append(run_one(args.domain, args.data_root.resolve(), args.cache_dir, v, args))
        print(json.dumps({k: x for k, x in rows[-1].items() if k != "val_history"}), file=sys.stderr)
    cmd = "python -m benchmarks.val_subsample " + " ".join(argv if argv is not None else sys.argv[1:])
    cols = ["domain", "val_users", "fine_tune_s", "epochs", "refit_epochs", "val_ndcg@10", "test_ndcg@10",
            "test_recall@10", "test_users"]
    page = results_page("Validation subsample", cmd, rows, cols)
    write_results(args.out, {"command": cmd, "rows": rows}, page)
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
