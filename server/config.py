"""Flower run_config (flat kebab-case keys from [tool.flwr.app.config] / --run-config) -> PipelineConfig."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from common.config import BackboneConfig, TrainConfig
from common.merging.coefficients import CoefficientConfig
from server.pipeline import PipelineConfig

_LISTS = {"baselines", "granularities"}
_USED = {"backbone", "encoder", "base", "epochs", "batch-size", "lr", "patience", "refit-on-val", "l2sp", "freeze",
         "max-users", "seed",
         "coef-steps", "coef-lr", "coef-batch-size", "catalog-root", "baselines", "init-method", "granularities",
         "pseudo-users", "pseudo-users-n", "teacher-top-k", "eval-max-users", "min-silos", "retries", "timeout-s",
         "max-task-vector-ratio",
         # server options, not part of PipelineConfig
         "run-dir", "domains", "data-root", "silo-state-root", "cache-dir", "min-nodes", "node-wait-s",
         "record-messages", "expect-domains"}


def _list(v) -> list[str]:
    return [x.strip() for x in str(v).split(",") if x.strip()]


class ConfigError(ValueError):
    """A bad run-config; the message names the run-config key."""


# pydantic field (top-level or nested) -> run-config key, where the two differ beyond "_" vs "-"
_KEYS = {("backbone", "kind"): "backbone", ("coefficients", "steps"): "coef-steps", ("coefficients", "lr"): "coef-lr",
         ("coefficients", "batch_size"): "coef-batch-size", ("timeout_s",): "timeout-s"}


def _key(model: str, loc: tuple) -> str:
    loc = tuple(str(x) for x in loc if not isinstance(x, int))
    if not loc:
        return "run-config"
    full = (model, *loc) if model else loc
    for n in (2, 1):
        if tuple(full[:n]) in _KEYS:
            return _KEYS[tuple(full[:n])]
    return loc[-1].replace("_", "-") if model in ("train", "coefficients", "backbone") else loc[0].replace("_", "-")


def _config_error(exc: ValidationError, model: str) -> ConfigError:
    parts = []
    for err in exc.errors(include_url=False)[:3]:
        msg = err["msg"].removeprefix("Value error, ")
        key = _key(model, tuple(err.get("loc") or ()))
        parts.append(msg if key == "run-config" else f"{key}: {msg} (got {err.get('input')!r:.60})")
    return ConfigError("bad run-config: " + "; ".join(parts))


def pipeline_config(rc: dict) -> tuple[PipelineConfig, Path, dict]:
    """Returns (pipeline config, run directory, server options). Unknown keys and bad values are a
    ConfigError naming the key, raised before any silo is contacted."""
    rc = dict(rc)
    unknown = sorted(set(rc) - _USED)
    if unknown:
        raise ConfigError(f"unknown run-config key(s): {', '.join(unknown)}")
    try:
        return _build(rc)
    except ValidationError as exc:
        model = {"TrainConfig": "train", "CoefficientConfig": "coefficients", "BackboneConfig": "backbone"}
        raise _config_error(exc, model.get(exc.title, "")) from None


def _build(rc: dict) -> tuple[PipelineConfig, Path, dict]:
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
        max_task_vector_ratio=opt("max-task-vector-ratio", 10.0), seed=opt("seed", 0),
    )
    server = {"min_nodes": int(opt("min-nodes", 0)), "node_wait_s": float(opt("node-wait-s", 120)),
              "domains": _list(opt("domains", "") or ""),
              "record_messages": str(opt("record-messages", "") or ""),
              "expect_domains": _list(opt("expect-domains", "") or "")}
    return cfg, Path(str(opt("run-dir", "runs/latest"))), server
