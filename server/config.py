"""Flower run_config (flat kebab-case keys from [tool.flwr.app.config] / --run-config) -> PipelineConfig.

Every key is listed in pyproject.toml with the value "" ("the default"); the defaults live in the pydantic
models each key sets (PIPELINE_KEYS below) and in common.protocol.run_options.RunOptions. So a key given explicitly is
the only thing that overrides a model's default; in particular the training defaults follow the backbone
(`TrainConfig.for_backbone`) unless epochs / batch-size / lr / patience are given.
"""

from __future__ import annotations

from pathlib import Path

import hashlib
import json
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from common.core.strict import Strict
from common.model.config import MIN_USERS_FOR_METRICS, BackboneConfig, TrainConfig
from common.model.integration import IntegrationConfig
from common.model.coefficients import CoefficientConfig
from common.protocol.run_options import OPTION_KEYS, RunOptions, given, list_setting
from server.validation import check_config

class PipelineConfig(Strict):
    backbone: BackboneConfig = BackboneConfig()
    train: TrainConfig = TrainConfig()
    baselines: list[str] = Field(default_factory=lambda: ["weight_average", "task_arithmetic", "ties", "dare_ties"])
    init_method: str = "task_arithmetic"
    granularities: list[Literal["task", "layer"]] = Field(default_factory=lambda: ["task", "layer"], min_length=1)
    coefficients: CoefficientConfig = CoefficientConfig()
    integration: IntegrationConfig = IntegrationConfig()  # optional integrated-model candidate
    pseudo_users: Literal["all", "random", "kmeans"] = "all"
    pseudo_users_n: int | None = Field(None, ge=1)
    teacher_top_k: int | None = Field(64, ge=1)
    evaluate_finetuned: bool = True
    eval_max_users: int | None = Field(None, ge=MIN_USERS_FOR_METRICS)  # silos refuse fewer (aggregates only)
    catalog_root: Path | None = Field(None, description="server's own catalog view: <root>/<domain>/{meta_data,smap}.json")
    min_silos: int = Field(2, ge=1)
    retries: int = Field(1, ge=0)
    timeout_s: float | None = Field(None, gt=0)  # per stage and attempt; None: sized from the data (server/limits.py)
    max_task_vector_ratio: float = Field(10.0, gt=0, description="a task vector whose L2 norm exceeds this "
                                         "many times the base model's norm is refused")
    weave_rounds: int = Field(0, ge=0, le=1000)  # LoRA weaving rounds before merging (server/weaving.py; 0 = off)
    weave_epochs: int = Field(1, ge=1, le=1000)  # local epochs per weaving hop
    seed: int = 0

    @model_validator(mode="after")
    def _known_names(self):
        check_config(self)
        return self

    def fingerprint(self) -> str:
        """Hash of everything that changes results (not timeouts/retries/min_silos/the task-vector bound)."""
        d = self.model_dump(mode="json", exclude={"min_silos", "retries", "timeout_s", "max_task_vector_ratio"})
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


#: run-config key -> (model, field) it sets; model "" is PipelineConfig itself
PIPELINE_KEYS = {
    "backbone": ("backbone", "kind"), "encoder": ("backbone", "encoder"), "base": ("backbone", "base"),
    "center-items": ("backbone", "center_items"),
    "epochs": ("train", "epochs"), "batch-size": ("train", "batch_size"), "lr": ("train", "lr"),
    "patience": ("train", "patience"), "refit-on-val": ("train", "refit_on_val"), "l2sp": ("train", "l2sp"),
    "selection": ("train", "selection"), "negatives": ("train", "negatives"),
    "num-negatives": ("train", "num_negatives"), "continue-epochs": ("train", "continue_epochs"),
    "freeze": ("train", "freeze"), "max-users": ("train", "max_users"), "val-max-users": ("train", "val_max_users"),
    "finetune": ("train", "finetune"), "lora-rank": ("train", "lora_rank"), "lora-alpha": ("train", "lora_alpha"),
    "lora-targets": ("train", "lora_targets"),
    "coef-steps": ("coefficients", "steps"), "coef-lr": ("coefficients", "lr"),
    "coef-batch-size": ("coefficients", "batch_size"), "coef-item-refresh": ("coefficients", "item_refresh_every"),
    "integration": ("integration", "kind"), "integration-steps": ("integration", "steps"),
    "integration-lr": ("integration", "lr"), "gate-hidden": ("integration", "gate_hidden"),
    **{k: ("", k.replace("-", "_")) for k in (
        "catalog-root", "baselines", "init-method", "granularities", "pseudo-users", "pseudo-users-n",
        "teacher-top-k", "eval-max-users", "min-silos", "retries", "timeout-s", "max-task-vector-ratio", "seed",
        "weave-rounds", "weave-epochs")},
}
_ZERO_IS_NONE = {"max-users", "val-max-users", "pseudo-users-n", "teacher-top-k", "eval-max-users"}  # 0 = no limit
_LIST_KEYS = {"freeze", "baselines", "granularities", "lora-targets"}
_FIELD_KEY = {v: k for k, v in PIPELINE_KEYS.items()}
KNOWN_KEYS = frozenset(PIPELINE_KEYS) | OPTION_KEYS


class ConfigError(ValueError):
    """A bad run-config; the message names the run-config key."""


def _key(model: str, loc: tuple) -> str:
    loc = tuple(str(x) for x in loc if not isinstance(x, int))
    if not loc:
        return "run-config"
    if (model, loc[0]) in _FIELD_KEY:
        return _FIELD_KEY[(model, loc[0])]
    if model == "" and len(loc) > 1 and (loc[0], loc[1]) in _FIELD_KEY:  # nested model inside PipelineConfig
        return _FIELD_KEY[(loc[0], loc[1])]
    return loc[-1].replace("_", "-")


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
    rc = given(rc)
    unknown = sorted(set(rc) - KNOWN_KEYS)
    if unknown:
        raise ConfigError(f"unknown run-config key(s): {', '.join(unknown)}")
    try:
        return _build(rc)
    except ValidationError as exc:
        model = {"TrainConfig": "train", "CoefficientConfig": "coefficients", "BackboneConfig": "backbone",
                 "IntegrationConfig": "integration"}
        raise _config_error(exc, model.get(exc.title, "")) from None


def _build(rc: dict) -> tuple[PipelineConfig, Path, dict]:
    parts: dict[str, dict] = {"": {}, "backbone": {}, "train": {}, "coefficients": {}, "integration": {}}
    for key, value in rc.items():
        if key not in PIPELINE_KEYS:
            continue
        if key in _LIST_KEYS:
            value = list_setting(value)
        if key in _ZERO_IS_NONE and str(value).strip() == "0":
            value = None
        if key == "timeout-s" and isinstance(value, str) and value.strip().lower() == "auto":
            value = None  # sized from the data (server/limits.py)
        model, field = PIPELINE_KEYS[key]
        parts[model][field] = value
    opts = RunOptions.from_run_config(rc)
    if opts.cache_dir is not None:
        parts["backbone"]["cache_dir"] = opts.cache_dir / "item_embeddings"
    if "seed" in parts[""]:  # one seed for the base, fine-tuning and coefficient learning
        parts["train"]["seed"] = parts["coefficients"]["seed"] = parts[""]["seed"]
    backbone = BackboneConfig(**parts["backbone"])
    train = TrainConfig.for_backbone(backbone.kind, **parts["train"], progress=False)
    cfg = PipelineConfig(backbone=backbone, train=train, coefficients=CoefficientConfig(**parts["coefficients"]),
                         integration=IntegrationConfig(**parts["integration"]), **parts[""])
    server = {"min_nodes": opts.min_nodes, "node_wait_s": opts.node_wait_s, "domains": opts.domains,
              "record_messages": str(opts.record_messages or ""), "expect_domains": opts.expect_domains}
    return cfg, opts.run_dir, server


#: one line per key for pyproject.toml's comments (the models' own field descriptions are longer)
HELP = {
    "run-dir": "checkpoints, report, model/ (same dir again = resume)",
    "domains": "simulation: partition i -> domains[i]", "data-root": "simulation: <data-root>/<domain> is silo i's data",
    "silo-state-root": "simulation: silos' fine-tuned weights ('' = .cache/silo-state)",
    "cache-dir": "item-embedding cache ('' = .cache)", "min-nodes": "SuperNodes to wait for (0 = one per domain)",
    "node-wait-s": "seconds to wait for them", "record-messages": "a folder: every message both ways (audits)",
    "expect-domains": "comma list that must take part: each one missing is in report.json",
    "catalog-root": "the server's own catalog view ('' = silos send item texts)",
    "min-silos": "go on without failed silos while at least this many remain", "retries": "per stage and silo",
    "timeout-s": "per stage and attempt; (none) or auto = sized from the data", "max-task-vector-ratio": "refuse a task vector whose norm exceeds this x the base's",
    "backbone": "light | text", "encoder": "'minilm' (bundled) or a local model folder",
    "base": "light base: init | bundled | a base file",
    "center-items": "light: centre each catalog's item-text embeddings before the adaptor", "epochs": "at most; early stopping on validation NDCG@10",
    "batch-size": "fine-tuning batch", "lr": "fine-tuning learning rate", "patience": "epochs without a validation gain",
    "refit-on-val": "retrain on train + validation items for the chosen epochs", "l2sp": "pull toward the base",
    "selection": "refit (select, then retrain on train + val) | held-out-users (one run) | continue "
                 "(held-out-users, then continue-epochs more on every user's train + val)",
    "continue-epochs": "selection=continue: epochs on train + val after the best epoch",
    "negatives": "training softmax: full | sampled | inbatch", "num-negatives": "negatives=sampled: items per batch",
    "freeze": "parameter prefixes kept at the base (none = train everything)", "max-users": "0 = all users",
    "val-max-users": "early stopping validates on this many users (0 = all)",
    "baselines": "training-free merges to evaluate", "init-method": "MergeRec starts from this merge",
    "granularities": "MergeRec coefficients: task and/or layer", "coef-steps": "coefficient-learning steps",
    "coef-lr": "coefficient-learning lr", "coef-batch-size": "pseudo-users per step",
    "coef-item-refresh": "K: recompute the merged item embeddings every K coefficient steps (0 = frozen at the initial W, the reference)",
    "integration": "none | xcross: also evaluate per-layer gated domain blocks",
    "integration-steps": "gate-training steps", "integration-lr": "gate-training lr",
    "gate-hidden": "integrated model: 0 = linear gate per layer, H = MLP with H hidden units",
    "pseudo-users": "all | random | kmeans", "pseudo-users-n": "0 = all items", "teacher-top-k": "0 = all items",
    "eval-max-users": "0 = every test user", "seed": "base, fine-tuning and coefficient learning",
    "finetune": "full (dense task vector) | lora (silos train and send LoRA factors)",
    "lora-rank": "LoRA rank r", "lora-alpha": "LoRA scale: delta = (alpha / r) * B @ A",
    "lora-targets": "glob patterns of the 2-D weights LoRA adapts",
    "weave-rounds": "LoRA modules travel the ring of silos before merging (0 = off)",
    "weave-epochs": "local epochs per weaving hop",
}


def _fmt(v) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v)) or "(none)"
    return "(none)" if v is None or v == "" else str(v)


def defaults() -> dict[str, str]:
    """Each run-config key's default as text, read from the models (training keys: per backbone)."""
    light, text = TrainConfig.for_backbone("light"), TrainConfig.for_backbone("text")
    models = {"": PipelineConfig(), "backbone": BackboneConfig(), "coefficients": CoefficientConfig(),
              "integration": IntegrationConfig()}
    out = {k.replace("_", "-"): _fmt(getattr(RunOptions(), k)) for k in RunOptions.model_fields}
    for key, (model, field) in PIPELINE_KEYS.items():
        if model == "train":
            a, b = getattr(light, field), getattr(text, field)
            out[key] = _fmt(a) if a == b else f"{_fmt(a)} (light) / {_fmt(b)} (text)"
        else:
            out[key] = _fmt(getattr(models[model], field))
    return out


def pyproject_block() -> str:
    """The [tool.flwr.app.config] table pyproject.toml carries (a test keeps them equal)."""
    lines = ["[tool.flwr.app.config]",
             "# Generated by `python -m server.config`. Every run-config key; \"\" = the default in the comment, which",
             "# lives in code (server/config.py, common/protocol/run_options.py). Override: --run-config \"key=value ...\"."]
    for key, default in defaults().items():
        lines.append(f'{key} = ""'.ljust(27) + f"# {default}: {HELP[key]}")
    return "\n".join(lines) + "\n"


def app_defaults() -> dict:
    """The `[tool.flwr.app.config]` table of the project's pyproject.toml: what `flwr run .` starts from (empty
    when the project is installed without its pyproject.toml)."""
    import tomllib

    path = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not path.is_file():
        return {}
    return tomllib.loads(path.read_text())["tool"]["flwr"]["app"]["config"]


def parse_overrides(text: str) -> dict:
    """`--run-config` syntax, as Flower reads it: space-separated key=value with TOML values
    ('epochs=2 backbone="text"'). A malformed entry is a ConfigError naming it."""
    import shlex
    import tomllib

    out = {}
    for item in shlex.split(text or "", posix=False):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"bad run-config entry {item!r}: expected key=value")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            raise ConfigError(f"bad run-config value for {key}: {value!r} is not a TOML value") from None
    return out


if __name__ == "__main__":
    print(pyproject_block(), end="")
