"""Command line: `python -m common.cli demo-run` (what `make run` calls until the federation exists) and
`python -m common.cli local --data DIR` (fine-tune and evaluate each domain folder in its own silo)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from common.config import BackboneConfig, TrainConfig
from common.report import markdown_table

COLUMNS = ["domain", "model", "recall@10", "ndcg@10", "recall@50", "ndcg@50", "seconds"]


def run_local(domain_dirs: list[Path], backbone: BackboneConfig, train: TrainConfig) -> list[dict]:
    """Each domain on its own: popularity, untrained (pretrained) model, fine-tuned model. Test metrics."""
    import copy

    from common.backbones import build_backbone
    from common.data import load_silo
    from common.train import evaluate_split, fine_tune, popularity_metrics

    base = build_backbone(backbone, seed=train.seed)
    rows = []
    for path in domain_dirs:
        silo = load_silo(path)
        model = copy.deepcopy(base)
        dom = model.domain_inputs(silo.catalog)
        rows.append({"domain": silo.domain, "model": "popularity", **popularity_metrics(silo, "test", seed=train.seed)})
        t0 = time.perf_counter()
        zero = evaluate_split(model, silo, dom, "test", seed=train.seed)
        rows.append({"domain": silo.domain, "model": "pretrained", **zero, "seconds": time.perf_counter() - t0})
        res = fine_tune(model, silo, dom, train)
        test = evaluate_split(model, silo, dom, "test", seed=train.seed)
        rows.append({"domain": silo.domain, "model": "fine-tuned", **test, "seconds": res.seconds})
        logging.info("%s: fine-tuned in %.1fs (%d epochs), test NDCG@10 %.4f", silo.domain, res.seconds,
                     res.epochs, test["ndcg@10"])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m common.cli")
    sub = ap.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo-run", help="generate the demo domains and fine-tune/evaluate each locally")
    demo.add_argument("--data", type=Path, default=Path(".cache/demo-data"))
    local = sub.add_parser("local", help="fine-tune and evaluate every domain folder under --data")
    local.add_argument("--data", type=Path, required=True)
    local.add_argument("--domains", nargs="*", help="subfolders to use (default: all)")
    for p in (demo, local):
        p.add_argument("--backbone", choices=["light", "text"], default="light")
        p.add_argument("--epochs", type=int)
        p.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")

    if args.cmd == "demo-run":
        from common.demo import make_demo

        dirs = make_demo(args.data, seed=args.seed)
    else:
        names = args.domains or sorted(p.name for p in args.data.iterdir() if (p / "smap.json").exists())
        dirs = [args.data / n for n in names]
        missing = [str(d) for d in dirs if not d.is_dir()]
        if missing:
            ap.error(f"no such domain folder: {', '.join(missing)}")
    overrides = {"seed": args.seed, **({"epochs": args.epochs} if args.epochs else {})}
    rows = run_local(dirs, BackboneConfig(kind=args.backbone), TrainConfig.for_backbone(args.backbone, **overrides))
    print(markdown_table(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
