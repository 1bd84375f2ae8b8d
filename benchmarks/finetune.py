"""Fine-tuning levers: wall time and test quality of a silo's fine-tuning under different TrainConfig settings.

    python -m benchmarks.finetune --domains Sports,Toys --variants "full:" "s1024:negatives=sampled,num_negatives=1024"
                                  [--data-root DIR] [--train KEY=VALUE,...] [--backbone KEY=VALUE,...] [--test-users 5000] [--out FILE]

Each variant is NAME:KEY=VALUE,... (TrainConfig fields, on top of the pipeline's defaults for the backbone,
`TrainConfig.with_backbone_defaults`, and `--train`; list fields as a|b, or none). A driver,
not a second implementation: it fine-tunes exactly as a silo does (common.model.train.fine_tune: early stopping,
then the final fit), one thread, from the same base and seed, and tests the result on a seeded user
subsample of the test split, the same subsample the benchmark drivers' silos evaluate on (`eval-max-users`,
seed 0; benchmarks/driver.py; a federated silo draws its own with a secret seed). Writes benchmarks/results/finetune.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.core import RESULTS
from common.core.report import write_table_results


def parse_settings(text: str) -> dict:
    """'a=1,b=sampled' -> {'a': '1', 'b': 'sampled'} (pydantic converts the strings); '' -> {}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise SystemExit(f"bad setting {part!r}: expected KEY=VALUE")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


LIST_FIELDS = {"freeze", "lora_targets"}


def run_one(domain: str, name: str, settings: dict, args) -> dict:
    import torch

    from common.model.backbones import build_backbone
    from common.model.config import BackboneConfig, TrainConfig
    from common.data.format import load_silo
    from common.protocol.run_options import list_setting
    from common.model.train import evaluate_split, fine_tune

    torch.set_num_threads(args.threads)
    silo = load_silo(args.data_root / domain, domain)
    model = build_backbone(BackboneConfig(**{"cache_dir": args.cache_dir, "base": args.base,
                                             **parse_settings(args.backbone)}), seed=0)
    dom = model.domain_inputs(silo.catalog)
    over = {"progress": False, **parse_settings(args.train), **settings}
    for key in LIST_FIELDS & set(over):  # "a|b" -> ["a", "b"]; "none" -> [] (as in the run-config)
        over[key] = list_setting(over[key], sep="|")
    cfg = TrainConfig(**over).with_backbone_defaults(model.cfg.kind)  # the pipeline's defaults for this backbone
    t0 = time.perf_counter()
    res = fine_tune(model, silo, dom, cfg)
    seconds = time.perf_counter() - t0
    model.load_state_dict(res.state, strict=False)
    test = evaluate_split(model.eval(), silo, dom, "test", max_users=args.test_users or None, seed=0)
    return {"domain": domain, "variant": name, "settings": settings, "fine_tune_s": round(seconds, 1),
            "epochs": res.epochs, "best_epoch": res.best_epoch, "refit_epochs": res.refit_epochs,
            "steps": res.steps, "val_ndcg@10": round(res.val["ndcg@10"], 5),
            "test_ndcg@10": round(test["ndcg@10"], 5), "test_recall@10": round(test["recall@10"], 5),
            "test_users": int(test["users"]), "val_history": res.history}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.finetune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=Path("../shared/data/amazon"))
    ap.add_argument("--domains", default="Beauty,Sports,Toys")
    ap.add_argument("--variants", nargs="+", default=["full:"], help="NAME:KEY=VALUE,... (TrainConfig fields)")
    ap.add_argument("--train", default="", help="settings shared by every variant, KEY=VALUE,...")
    ap.add_argument("--backbone", default="", help="BackboneConfig settings, KEY=VALUE,... (e.g. center_items=true)")
    ap.add_argument("--test-users", type=int, default=5000, help="seeded test subsample (0 = every user)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--base", default="init", help="light base: init | bundled | a base file")
    ap.add_argument("--cache-dir", type=Path, default=Path(".cache/item_embeddings"))
    ap.add_argument("--out", type=Path, default=RESULTS / "finetune.json")
    args = ap.parse_args(argv)
    args.data_root = args.data_root.resolve()
    variants = []
    for v in args.variants:
        name, sep, text = v.partition(":")
        if not sep or not name:
            raise SystemExit(f"bad variant {v!r}: expected NAME:KEY=VALUE,...")
        variants.append((name, parse_settings(text)))
    rows = []
    cmd = "python -m benchmarks.finetune " + " ".join(argv if argv is not None else sys.argv[1:])
    cols = ["domain", "variant", "fine_tune_s", "epochs", "best_epoch", "refit_epochs", "steps", "val_ndcg@10",
            "test_ndcg@10", "test_recall@10", "test_users"]
    for domain in args.domains.split(","):
        for name, settings in variants:
            rows.append(run_one(domain, name, settings, args))
            print(json.dumps({k: x for k, x in rows[-1].items() if k != "val_history"}), file=sys.stderr, flush=True)
            # written after every row: a long run that dies keeps what it measured
            page = write_table_results(args.out, {"command": cmd, "train": args.train, "rows": rows},
                                       "Fine-tuning levers", cols)
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
