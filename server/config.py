"""Flower run_config (flat kebab-case keys from [tool.flwr.app.config] / --run-config) -> PipelineConfig."""

from __future__ import annotations

from pathlib import Path

from common.config import BackboneConfig, TrainConfig
from common.merging.coefficients import CoefficientConfig
from server.pipeline import PipelineConfig

_LISTS = {"baselines", "granularities"}


def _list(v) -> list[str]:
    return [x.strip() for x in str(v).split(",") if x.strip()]


def pipeline_config(rc: dict) -> tuple[PipelineConfig, Path, dict]:
    """Returns (pipeline config, run directory, server options). Unknown keys are an error."""
    rc = dict(rc)
    known_other = {"run-dir", "domains", "data-root", "silo-state-root", "cache-dir", "min-nodes", "node-wait-s", "record-messages"}
    opt = lambda k, d=None: rc.get(k, d)  # noqa: E731
    backbone = BackboneConfig(kind=opt("backbone", "light"), encoder=opt("encoder", "minilm"), base=opt("base", "init"),
                              **({"cache_dir": Path(opt("cache-dir")) / "item_embeddings"} if opt("cache-dir") else {}))
    train_over = {k: v for k, v in {"epochs": opt("epochs"), "batch_size": opt("batch-size"), "lr": opt("lr"),
                                     "patience": opt("patience"), "max_users": opt("max-users") or None,
                                     "refit_on_val": opt("refit-on-val"), "l2sp": opt("l2sp"),
                                     "freeze": _list(opt("freeze")) if opt("freeze") is not None else None,
                                     "seed": opt("seed", 0), "progress": False}.items() if v is not None}
    train = TrainConfig.for_backbone(backbone.kind, **train_over)
    coef = CoefficientConfig(**{k: v for k, v in {"steps": opt("coef-steps"), "lr": opt("coef-lr"),
                                                   "batch_size": opt("coef-batch-size"), "seed": opt("seed", 0)}.items()
                                if v is not None})
    catalog_root = opt("catalog-root") or None
    cfg = PipelineConfig(
        backbone=backbone, train=train, coefficients=coef,
        baselines=_list(opt("baselines", "weight_average,task_arithmetic,ties,dare_ties")),
        init_method=opt("init-method", "task_arithmetic"),
        granularities=_list(opt("granularities", "task,layer")),
        pseudo_users=opt("pseudo-users", "all"), pseudo_users_n=opt("pseudo-users-n") or None,
        teacher_top_k=opt("teacher-top-k", 256) or None,
        eval_max_users=opt("eval-max-users") or None,
        catalog_root=Path(catalog_root) if catalog_root else None,
        min_silos=opt("min-silos", 2), retries=opt("retries", 1), timeout_s=opt("timeout-s", 3600.0),
        seed=opt("seed", 0),
    )
    used = {"backbone", "encoder", "base", "epochs", "batch-size", "lr", "patience", "refit-on-val", "l2sp", "freeze", "max-users", "seed", "coef-steps",
            "coef-lr", "coef-batch-size", "catalog-root", "baselines", "init-method", "granularities",
            "pseudo-users", "pseudo-users-n", "teacher-top-k", "eval-max-users", "min-silos", "retries",
            "timeout-s"} | known_other
    unknown = sorted(set(rc) - used)
    if unknown:
        raise ValueError(f"unknown run-config key(s): {', '.join(unknown)}")
    server = {"min_nodes": int(opt("min-nodes", 1)), "node_wait_s": float(opt("node-wait-s", 120)),
              "record_messages": str(opt("record-messages", "") or "")}
    return cfg, Path(str(opt("run-dir", "runs/latest"))), server
