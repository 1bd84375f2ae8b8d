"""Benchmark the recommender core on real data (default ../shared/data/amazon: Beauty, Sports, Toys).

    python -m benchmarks.core [--data ../shared/data/amazon] [--domains Beauty Sports Toys]

Per domain and model: test Recall@10 / NDCG@10 (and @50 in the JSON), wall time, peak memory. Each
(domain, model) job runs in its own subprocess so that its peak RSS is its own. Writes
benchmarks/results/core.json and core.md. Models:

- popularity: training interaction counts
- light zero-shot: the untrained light backbone (= text similarity to the most recent item)
- encoder zero-shot: the raw pretrained encoder on sequence text vs item text
- light fine-tuned: the CPU default, full data
- encoder fine-tuned: MiniLM end to end, on a seeded user subsample (2 CPU cores), see --text-users
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from common.core.report import write_results

RESULTS = Path(__file__).parent / "results"
MODELS = ["popularity", "light-zero-shot", "light-fine-tuned", "encoder-zero-shot", "encoder-fine-tuned"]
DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "amazon"
#: light fine-tuning in the benchmarks (the merge benchmark reuses or reproduces these models)
LIGHT_EPOCHS, LIGHT_PATIENCE, LIGHT_VAL_USERS = 10, 5, 5000


def run_job(data: Path, domain: str, model: str, args) -> dict:
    """One (domain, model) measurement, in this process."""
    import torch

    from common.model.backbones import build_backbone
    from common.model.config import BackboneConfig, TrainConfig
    from common.data.format import load_silo
    from common.model.train import evaluate_split, fine_tune, popularity_metrics

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    silo = load_silo(data / domain)
    out: dict = {"domain": domain, "model": model, "test_users": len(silo.test)}
    if model == "popularity":
        out.update(popularity_metrics(silo, "test", seed=args.seed))
    else:
        kind = "light" if model.startswith("light") else "text"
        bb = BackboneConfig(kind=kind, cache_dir=Path(args.cache) / "item_embeddings")
        base = build_backbone(bb, seed=args.seed)
        dom = base.domain_inputs(silo.catalog)
        eval_users = None if kind == "light" else args.text_eval_users
        saved = Path(args.cache) / "bench-models" / f"{domain}-light-seed{args.seed}.safetensors"
        side = saved.with_suffix(".json")
        prior = (json.loads(side.read_text()) if model == "light-fine-tuned" and args.reuse and side.exists()
                 and saved.exists() else None)
        saved_is_refit = prior is not None and prior.get("refit_epochs", 0) > 0
        if prior is not None and saved_is_refit == args.light_refit:
            # the model an earlier run of the same protocol saved: evaluate it
            from safetensors.torch import load_file

            base.load_state_dict(load_file(str(saved)), strict=False)
            out.update(reused_model=str(saved), **prior)
        elif model.endswith("fine-tuned"):
            over = {"seed": args.seed, "progress": False}
            if kind == "text":
                over.update(max_users=args.text_users, epochs=args.text_epochs, val_max_users=args.text_eval_users)
            else:
                over.update(epochs=args.light_epochs, patience=args.light_patience, val_max_users=args.light_val_users,
                            refit_on_val=args.light_refit)
            cfg = TrainConfig(**over).with_backbone_defaults(kind)
            if prior is not None and not saved_is_refit and cfg.refit_on_val and prior.get("val_history"):
                # an earlier selection run (train only, early stopping) of the same settings chose the epoch
                # count; `refit` is seeded on its own, so this gives the weights a full run would
                from common.model.train import chosen_epoch, refit

                best = chosen_epoch(prior["val_history"])
                steps, secs = refit(base, silo, dom, cfg, best) if best > 0 else (0, 0.0)
                stats = {**prior, "best_epoch": best, "refit_epochs": best, "refit_seconds": round(secs, 1),
                         "selection_reused": True}
            else:
                res = fine_tune(base, silo, dom, cfg)
                stats = dict(epochs=res.epochs, steps=res.steps, train_seconds=round(res.seconds, 1),
                             best_epoch=res.best_epoch, refit_epochs=res.refit_epochs, val_history=res.history)
            stats["train_users"] = args.text_users if kind == "text" else len(silo.train)
            if kind == "light":  # the merge benchmark starts from these very models
                from safetensors.torch import save_file

                from common.model.backbones import shared_state

                saved.parent.mkdir(parents=True, exist_ok=True)
                save_file(shared_state(base), str(saved))
                side.write_text(json.dumps(stats))
            out.update(stats)
        items = None
        if model == "encoder-zero-shot":  # the untrained encoder's item side = the cached item-text embeddings
            from common.model.item_cache import item_text_embeddings

            items = item_text_embeddings(silo.catalog, encoder=bb.encoder, value_tokens=bb.item_value_tokens,
                                         max_tokens=bb.item_max_tokens, cache_dir=bb.cache_dir,
                                         precision=bb.encoder_precision, progress=False)
        out.update(evaluate_split(base, silo, dom, "test", seed=args.seed, max_users=eval_users,
                                  item_embeddings=items))
        out["eval_users"] = out.pop("users")
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def table(rows: list[dict]) -> str:
    from common.core.report import markdown_table

    cols = ["domain", "model", "recall@10", "ndcg@10", "seconds", "train_seconds", "epochs", "refit_epochs", "peak_rss_mb",
            "train_users", "eval_users"]
    return markdown_table(rows, cols)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.core", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--domains", nargs="+", default=["Beauty", "Sports", "Toys"])
    ap.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=".cache")
    ap.add_argument("--light-epochs", type=int, default=LIGHT_EPOCHS, help="at most; early stopping on validation NDCG@10")
    ap.add_argument("--light-patience", type=int, default=LIGHT_PATIENCE, help="epochs without a validation gain before stopping "
                    "(validation NDCG@10 dips for the first epochs before it passes the untrained model's)")
    ap.add_argument("--light-val-users", type=int, default=LIGHT_VAL_USERS, help="validation users for early stopping")
    ap.add_argument("--text-users", type=int, default=1000, help="users the text encoder fine-tunes on")
    ap.add_argument("--text-epochs", type=int, default=1)
    ap.add_argument("--text-eval-users", type=int, default=1000, help="test users for the text-encoder rows")
    ap.add_argument("--no-light-refit", dest="light_refit", action="store_false",
                    help="test the best epoch of the train-only run (no final fit on train + validation items)")
    ap.add_argument("--reuse", action="store_true",
                    help="light-fine-tuned: evaluate the final model saved under <cache>/bench-models; when only an "
                    "earlier selection run's statistics are there, run just the final fit for the epochs it chose")
    ap.add_argument("--out", type=Path, default=RESULTS / "core.json")
    ap.add_argument("--job", nargs=2, metavar=("DOMAIN", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)

    if args.job:
        print(json.dumps(run_job(args.data, args.job[0], args.job[1], args)))
        return 0
    if not args.data.is_dir():
        ap.error(f"data folder not found: {args.data}")
    previous = json.loads(args.out.read_text())["rows"] if args.out.exists() else []
    rows = [r for r in previous if (r["domain"], r["model"]) not in
            {(d, m) for d in args.domains for m in args.models}]
    passthrough = ["--data", str(args.data), "--seed", str(args.seed), "--cache", args.cache,
                   "--light-epochs", str(args.light_epochs), "--light-patience", str(args.light_patience),
                   "--light-val-users", str(args.light_val_users),
                   *(["--reuse"] if args.reuse else []), *([] if args.light_refit else ["--no-light-refit"]),
                   "--text-users", str(args.text_users), "--text-epochs", str(args.text_epochs),
                   "--text-eval-users", str(args.text_eval_users)]
    for domain in args.domains:
        for model in args.models:
            logging.info("running %s / %s", domain, model)
            proc = subprocess.run([sys.executable, "-m", "benchmarks.core", *passthrough, "--job", domain, model],
                                  stdout=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"job {domain}/{model} failed with exit code {proc.returncode}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1])
                        | {"command": "python -m benchmarks.core " + " ".join(argv or sys.argv[1:])})
            rows.sort(key=lambda r: (r["domain"], MODELS.index(r["model"])))
            logging.info("%s", rows[-1])
            report = {"command": "python -m benchmarks.core " + " ".join(argv or sys.argv[1:]),
                      "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
                      "rows": rows}
            write_results(args.out, report, table(rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
