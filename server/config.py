"""Flower run_config (flat kebab-case keys from [tool.flwr.app.config] / --run-config) -> PipelineConfig.

Every key is listed in pyproject.toml with the value "" ("the default"); the defaults live in the pydantic
models each key sets (PIPELINE_KEYS below) and in common.protocol.run_options.RunOptions, and so do the one-line
descriptions pyproject's comments show (`python -m server.config` prints the table). So a key given explicitly is
the only thing that overrides a model's default, and `PipelineConfig()` is what `flwr run .` runs with no
overrides; in particular the training defaults follow the backbone (`TrainConfig.BACKBONE_DEFAULTS`, applied by
PipelineConfig to every training field not given explicitly).

The run-config check is the models' own validation: the silos validate the same models (TrainConfig,
BackboneConfig and the shared bounds in common/model/config.py inside common/protocol/messages.py's requests), so a
value the check accepts is not one a silo refuses.
"""

from __future__ import annotations

from pathlib import Path

import hashlib
import json
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from common.core.strict import Strict
from common.core.runs import new_run_dir
from common.model.config import INT32_MAX, MAX_EPOCHS, MIN_USERS_FOR_METRICS, BackboneConfig, Count, Seed, TrainConfig
from common.model.integration import IntegrationConfig
from common.model.coefficients import CoefficientConfig
from common.protocol.eval_policy import DEFAULT_EVAL_BUDGET, EvalPolicy
from common.protocol.run_options import OPTION_KEYS, RunOptions, given, list_setting
from server.validation import check_config


class FedAvgConfig(Strict):
    """Federated averaging (strategy = fedavg; server/fedavg.py)."""

    rounds: int = Field(10, ge=1, le=10_000, description="federated rounds (strategy=fedavg)")
    local_epochs: int = Field(1, ge=1, le=MAX_EPOCHS, description="local epochs per round (strategy=fedavg)")
    prox_mu: float = Field(0.0, ge=0.0, le=1e6, description="FedProx proximal weight mu (0 = plain FedAvg)")
    init: Literal["base", "merged"] = Field("base", description="rounds start from the shared base, or from the best "
                                            "merged model after the MergeRec stages (the hybrid)")
    # rounds average small updates from one shared point each time: the interference that makes one-shot merging
    # keep the blocks frozen does not arise, so every parameter trains unless named here
    freeze: list[str] = Field(default_factory=list, description="parameter prefixes kept fixed in federated rounds "
                              "(none = train everything)")


class PipelineConfig(Strict):
    """The whole pipeline's configuration. A training field not given explicitly takes the backbone's default
    (`TrainConfig.BACKBONE_DEFAULTS`) and fine-tuning draws no progress bar (silos log one line per epoch); a
    `seed` given here seeds fine-tuning and coefficient learning too, unless they name their own."""

    backbone: BackboneConfig = BackboneConfig()
    train: TrainConfig = TrainConfig()
    baselines: list[str] = Field(default_factory=lambda: ["weight_average", "task_arithmetic", "ties", "dare_ties"],
                                 description="training-free merges to evaluate")
    init_method: str = Field("task_arithmetic", description="MergeRec starts from this merge")
    # task-wise only by default: layer-wise scored below it on validation on every real domain at twice the server
    # time (docs/benchmarks.md, claim 2); "task,layer" learns both and ships the better one on validation
    granularities: list[Literal["task", "layer"]] = Field(default_factory=lambda: ["task"], min_length=1,
                                                          description="MergeRec coefficients: task and/or layer")
    coefficients: CoefficientConfig = CoefficientConfig()
    integration: IntegrationConfig = IntegrationConfig()  # optional integrated-model candidate
    pseudo_users: Literal["all", "random", "kmeans"] = Field("all", description="which catalog items become "
                                                             "pseudo-users: all | random | kmeans")
    pseudo_users_n: Count | None = Field(None, description="pseudo-users per domain (none / 0 = all items)")
    teacher_top_k: Count | None = Field(64, description="teacher logits per pseudo-user a silo sends (none / 0 = "
                                        "all items)")
    # "own" by default: the reference the merged model is judged against, with no silo receiving another's model;
    # "all" adds the transfer table (each silo's model on every other domain, benchmarks.merge's unseen rows)
    evaluate_finetuned: Literal["own", "all", "none"] = Field(
        "own", description="fine-tuned models scored at test: own (each silo its own) | all (every silo every "
        "silo's) | none")
    # the simulated (and in-process benchmark) silos' evaluation policy (common/protocol/eval_policy.py): never in
    # a request; a deployed silo sets its own in node-config
    eval_max_users: int | None = Field(None, ge=MIN_USERS_FOR_METRICS, le=INT32_MAX, description="simulated "
                                       "silos evaluate on their own fixed subsample of this many users per split "
                                       "(none / 0 = all)")
    eval_budget: int | None = Field(DEFAULT_EVAL_BUDGET, ge=1, le=INT32_MAX, description="simulated silos answer "
                                    "at most this many model evaluations per split and run (none / 0 = no limit)")
    eval_epsilon: float | None = Field(None, gt=0, le=1e6, description="simulated silos add Laplace noise of "
                                       "scale 1/(users x this) to every metric they release (none / 0 = exact)")
    catalog_root: Path | None = Field(None, description="the server's own catalog view, <root>/<domain>/"
                                      "{meta_data,smap}.json (none = silos send item texts)")
    min_silos: int = Field(2, ge=1, le=100_000, description="go on without failed silos while at least this many "
                           "remain")
    retries: int = Field(1, ge=0, le=100, description="retries per stage and silo")
    # None: sized from the data (server/limits.py)
    timeout_s: float | None = Field(None, gt=0, description="seconds per stage and attempt (none / auto = sized "
                                    "from the data)")
    max_task_vector_ratio: float = Field(10.0, gt=0, description="refuse a task vector whose L2 norm exceeds this "
                                         "many times the base model's")
    weave_rounds: int = Field(0, ge=0, le=1000, description="LoRA modules travel the ring of silos this many "
                              "rounds before merging (0 = off)")
    weave_epochs: int = Field(1, ge=1, le=1000, description="local epochs per weaving hop")
    seed: Seed = Field(0, description="seeds the base, fine-tuning and coefficient learning")
    strategy: Literal["mergerec", "fedavg"] = Field("mergerec", description="mergerec: one-shot fine-tuning and "
                                                    "merging | fedavg: rounds of federated averaging")
    fedavg: FedAvgConfig = FedAvgConfig()

    @field_validator("evaluate_finetuned", mode="before")
    @classmethod
    def _old_bool(cls, v):  # run directories written when this was a bool: true meant every silo's model everywhere
        return {True: "all", False: "none"}.get(v, v) if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _defaults_and_names(self):
        seed = {"seed": self.seed} if "seed" in self.model_fields_set else {}
        train = self.train.with_defaults(progress=False, **seed,
                                         **TrainConfig.backbone_defaults(self.backbone.kind, self.train.finetune))
        object.__setattr__(self, "train", train)
        follow = {**seed, "seen_items": self.train.seen_items}  # one key each: coefficient learning follows
        follow = {k: v for k, v in follow.items() if k not in self.coefficients.model_fields_set}
        if follow:
            object.__setattr__(self, "coefficients", self.coefficients.model_copy(update=follow))
        check_config(self)
        return self

    def silo_policy(self, **override) -> EvalPolicy:
        """The evaluation policy these settings give a simulated or in-process silo (`override`: EvalPolicy fields,
        e.g. a benchmark's budget=None)."""
        return EvalPolicy(**{"max_users": self.eval_max_users, "budget": self.eval_budget,
                             "epsilon": self.eval_epsilon, **override})

    def fingerprint(self) -> str:
        """Hash of everything that changes results (not timeouts/retries/min_silos/the task-vector bound/the
        evaluation budget)."""
        d = self.model_dump(mode="json", exclude={"min_silos", "retries", "timeout_s", "max_task_vector_ratio",
                                                         "eval_budget"})
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


#: run-config key -> (model, field) it sets; model "" is PipelineConfig itself
PIPELINE_KEYS = {
    "backbone": ("backbone", "kind"), "encoder": ("backbone", "encoder"), "base": ("backbone", "base"),
    "center-items": ("backbone", "center_items"), "encoder-precision": ("backbone", "encoder_precision"),
    "epochs": ("train", "epochs"), "batch-size": ("train", "batch_size"), "lr": ("train", "lr"),
    "patience": ("train", "patience"), "selection": ("train", "selection"), "negatives": ("train", "negatives"),
    "num-negatives": ("train", "num_negatives"), "continue-epochs": ("train", "continue_epochs"),
    "freeze": ("train", "freeze"), "max-users": ("train", "max_users"), "val-max-users": ("train", "val_max_users"),
    "finetune": ("train", "finetune"), "lora-rank": ("train", "lora_rank"), "lora-alpha": ("train", "lora_alpha"),
    "lora-targets": ("train", "lora_targets"), "seen-items": ("train", "seen_items"),
    "coef-steps": ("coefficients", "steps"), "coef-lr": ("coefficients", "lr"),
    "coef-batch-size": ("coefficients", "batch_size"), "tower-fit-epochs": ("coefficients", "tower_fit_epochs"),
    "adaptor-hidden": ("backbone", "adaptor_hidden"),
    "integration": ("integration", "kind"), "integration-steps": ("integration", "steps"),
    "integration-lr": ("integration", "lr"), "gate-hidden": ("integration", "gate_hidden"),
    "fedavg-rounds": ("fedavg", "rounds"), "fedavg-epochs": ("fedavg", "local_epochs"),
    "fedprox-mu": ("fedavg", "prox_mu"), "fedavg-init": ("fedavg", "init"), "fedavg-freeze": ("fedavg", "freeze"),
    "dp-epsilon": ("train", "dp_epsilon"), "dp-delta": ("train", "dp_delta"), "dp-clip": ("train", "dp_clip"),
    **{k: ("", k.replace("-", "_")) for k in (
        "catalog-root", "baselines", "init-method", "granularities", "pseudo-users", "pseudo-users-n",
        "teacher-top-k", "evaluate-finetuned", "eval-max-users", "eval-budget", "eval-epsilon", "min-silos", "retries", "timeout-s", "max-task-vector-ratio", "seed",
        "weave-rounds", "weave-epochs", "strategy")},
}
#: 0 or "none" = no limit (None)
_ZERO_IS_NONE = {"max-users", "val-max-users", "pseudo-users-n", "teacher-top-k", "eval-max-users", "eval-budget",
                 "eval-epsilon"}
_LIST_KEYS = {"freeze", "baselines", "granularities", "lora-targets", "fedavg-freeze"}
_FIELD_KEY = {v: k for k, v in PIPELINE_KEYS.items()}
KNOWN_KEYS = frozenset(PIPELINE_KEYS) | OPTION_KEYS
_MODELS = {"": PipelineConfig, "backbone": BackboneConfig, "train": TrainConfig, "coefficients": CoefficientConfig,
           "integration": IntegrationConfig, "fedavg": FedAvgConfig}


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
    parts: dict[str, dict] = {"": {}, "backbone": {}, "train": {}, "coefficients": {}, "integration": {}, "fedavg": {}}
    for key, value in rc.items():
        if key not in PIPELINE_KEYS:
            continue
        if key in _LIST_KEYS:
            value = list_setting(value)
        if key in _ZERO_IS_NONE and str(value).strip().lower() in ("0", "none"):
            value = None
        if key == "timeout-s" and isinstance(value, str) and value.strip().lower() in ("auto", "none"):
            value = None  # sized from the data (server/limits.py)
        if key in ("dp-epsilon", "dp-delta") and str(value).strip().lower() in ("none", "inf", "infinity"):
            value = None  # no DP / delta = 1 / users
        model, field = PIPELINE_KEYS[key]
        parts[model][field] = value
    opts = RunOptions.from_run_config(rc)
    if opts.cache_dir is not None:
        parts["backbone"]["cache_dir"] = opts.cache_dir / "item_embeddings"
    # each part is built on its own, so that a validation error names its model (and so the run-config key);
    # PipelineConfig then applies the backbone's training defaults and the one seed to the fields not given
    cfg = PipelineConfig(backbone=BackboneConfig(**parts["backbone"]), train=TrainConfig(**parts["train"]),
                         coefficients=CoefficientConfig(**parts["coefficients"]),
                         integration=IntegrationConfig(**parts["integration"]), fedavg=FedAvgConfig(**parts["fedavg"]),
                         **parts[""])
    _check_paths(cfg)
    server = {"min_nodes": opts.min_nodes, "node_wait_s": opts.node_wait_s, "domains": opts.domains,
              "record_messages": str(opts.record_messages or ""), "expect_domains": opts.expect_domains}
    return cfg, opts.run_dir or new_run_dir(), server


def _check_paths(cfg: PipelineConfig) -> None:
    """The server builds the base model itself before any silo is contacted: an encoder folder or base file
    given as a path must exist here (a bare name such as a hub id is left to the encoder's loader)."""
    for key, value in (("encoder", cfg.backbone.encoder), ("base", cfg.backbone.base)):
        looks_like_path = value.startswith(("/", ".", "~")) or value.endswith(".safetensors")
        if looks_like_path and not Path(value).expanduser().exists():
            raise ConfigError(f"bad run-config: {key}: no such file or folder (got {value!r:.200})")


def _fmt(v) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v)) or "(none)"
    return "(none)" if v is None or v == "" else str(v)


def defaults() -> dict[str, str]:
    """Each run-config key's default as text, read from the models (training keys: per backbone)."""
    light, text = PipelineConfig(), PipelineConfig(backbone=BackboneConfig(kind="text"))
    parts = {"": light, "backbone": light.backbone, "coefficients": light.coefficients,
             "integration": light.integration, "fedavg": light.fedavg}
    out = {k.replace("_", "-"): _fmt(getattr(RunOptions(), k)) for k in RunOptions.model_fields}
    for key, (model, field) in PIPELINE_KEYS.items():
        if model == "train":
            a, b = getattr(light.train, field), getattr(text.train, field)
            out[key] = _fmt(a) if a == b else f"{_fmt(a)} (light) / {_fmt(b)} (text)"
        else:
            out[key] = _fmt(getattr(parts[model], field))
    return out


def descriptions() -> dict[str, str]:
    """Each run-config key's one-line description: the description of the pydantic field it sets."""
    out = {kebab: RunOptions.model_fields[kebab.replace("-", "_")].description for kebab in
           (k.replace("_", "-") for k in RunOptions.model_fields)}
    out.update({key: _MODELS[model].model_fields[field].description for key, (model, field) in PIPELINE_KEYS.items()})
    bad = sorted(k for k, text in out.items() if not text or "\n" in text)
    if bad:
        raise RuntimeError(f"run-config key(s) {bad}: their pydantic field needs a one-line description")
    return out


def pyproject_block() -> str:
    """The [tool.flwr.app.config] table pyproject.toml carries (a test keeps them equal)."""
    lines = ["[tool.flwr.app.config]",
             "# Generated by `python -m server.config`. Every run-config key; \"\" = the default in the comment, which",
             "# lives in code (server/config.py, common/protocol/run_options.py). Override: --run-config \"key=value ...\".",
             "# The text after the default is the pydantic field's description."]
    help_text = descriptions()
    for key, default in defaults().items():
        lines.append(f'{key} = ""'.ljust(27) + f"# {default}: {help_text[key]}")
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
