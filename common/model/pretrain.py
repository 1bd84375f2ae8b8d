"""Pretrain the shared light base on public domains that are not silos.

    python -m common.model.pretrain --data ../shared/data/public --out DIR [--domains Scientific Office]

Starts from the seeded text-similarity initialisation and trains one model on the pooled domains with the
same training code a silo uses (`common.model.train.fine_tune` over a list of domains: each batch comes from one
domain and is scored against that domain's own catalog; early stopping on the mean validation NDCG@10 of the
domains; then the final fit on train + validation items for the chosen epoch count). Seeded: the same
command on the same data and thread count gives the same bytes.

Writes DIR/base.safetensors, DIR/card.json (data, config, epochs, validation metrics, fingerprint, the
command) and DIR/base.json, the one-file bundle that `BackboneConfig.base` accepts (copy it to
common/assets/base_light.json to make it the bundled default).
"""

from __future__ import annotations

import argparse
import copy
import logging
import shlex
import sys
from pathlib import Path

import torch

from common.model.backbones import build_backbone
from common.model.base_model import ARCH_FIELDS, BaseCard, save_base
from common.model.config import BackboneConfig, TrainConfig
from common.data.format import load_silo
from common.core.fingerprint import fingerprint
from common.model.train import fine_tune

log = logging.getLogger("common.model.pretrain")


def pretrain(data: Path, domains: list[str], backbone: BackboneConfig, train: TrainConfig,
             command: str = "") -> tuple[dict[str, torch.Tensor], BaseCard]:
    """Train the light backbone from its seeded initialisation on the pooled `domains` under `data`.
    Returns (state, card). `backbone.base` must be 'init' (pretraining starts from scratch)."""
    if backbone.kind != "light" or backbone.base != "init":
        raise ValueError("pretraining starts from the light backbone's seeded initialisation (kind='light', base='init')")
    silos = [load_silo(data / d, d) for d in domains]
    model = build_backbone(backbone, seed=train.seed)
    doms = [model.domain_inputs(s.catalog) for s in silos]
    res = fine_tune(copy.deepcopy(model), silos, doms, train)
    state = res.state
    card = BaseCard(
        architecture=backbone.model_dump(mode="json", include=set(ARCH_FIELDS)),
        fingerprint=fingerprint(state),
        data=[{"domain": s.domain, "users": s.num_users, "items": len(s.catalog),
               "catalog_fingerprint": s.catalog.fingerprint()} for s in silos],
        train=train.model_dump(mode="json"), epochs=res.epochs, best_epoch=res.best_epoch,
        refit_epochs=res.refit_epochs, validation=res.val, history=res.history, seconds=round(res.seconds, 1),
        command=command, seed=train.seed, threads=torch.get_num_threads(),
    )
    return state, card


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m common.model.pretrain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="folder of domain folders (public, not silos)")
    ap.add_argument("--domains", nargs="+", help="domain folders to pool (default: every folder under --data)")
    ap.add_argument("--out", type=Path, required=True, help="output folder for base.safetensors, card.json, base.json")
    ap.add_argument("--epochs", type=int, default=40, help="at most this many epochs (early stopping)")
    ap.add_argument("--patience", type=int, default=5, help="epochs without a validation gain before stopping")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--val-users", type=int, default=None, help="validate on a seeded subsample of users per domain")
    ap.add_argument("--no-refit", dest="refit", action="store_false",
                    help="keep the best epoch's weights instead of refitting on train + validation items")
    ap.add_argument("--freeze", nargs="*", default=[],
                    help="parameter prefixes kept at the initialisation, e.g. 'adaptor' (keeps the text-similarity "
                    "projection of item texts, so that the base still transfers to unseen catalogs)")
    ap.add_argument("--l2sp", type=float, default=0.0, help="pull toward the initialisation (TrainConfig.l2sp)")
    ap.add_argument("--dim", type=int, default=BackboneConfig().dim)
    ap.add_argument("--layers", type=int, default=BackboneConfig().layers)
    ap.add_argument("--center-items", action="store_true",
                    help="centre each catalog's item-text features (BackboneConfig.center_items; the base then "
                    "requires center-items=true in the run config)")
    ap.add_argument("--cache", type=Path, default=Path(".cache"), help="item-embedding cache folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    domains = args.domains or sorted(p.name for p in args.data.iterdir() if (p / "smap.json").is_file())
    if not domains:
        ap.error(f"no domain folders under {args.data}")
    backbone = BackboneConfig(dim=args.dim, layers=args.layers, center_items=args.center_items,
                              cache_dir=args.cache / "item_embeddings")
    train = TrainConfig(epochs=args.epochs, patience=args.patience, lr=args.lr, batch_size=args.batch_size,
                        val_max_users=args.val_users, refit_on_val=args.refit, freeze=args.freeze, l2sp=args.l2sp,
                        seed=args.seed, progress=False)
    command = "python -m common.model.pretrain " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    state, card = pretrain(args.data, domains, backbone, train, command)
    ckpt, bundle = save_base(state, card, args.out)
    print(f"base {card.fingerprint[:16]}: {ckpt} and {bundle} (val NDCG@10 {card.validation.get('ndcg@10', 0):.4f}, "
          f"best epoch {card.best_epoch}, {card.seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
