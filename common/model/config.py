"""pydantic configs shared by the CLI, benchmarks, server and clients."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from common.core.strict import Strict
from common.model.metrics import SeenItems

#: no metric a silo reports may average over fewer users (it would describe individuals)
MIN_USERS_FOR_METRICS = 5
#: bounds shared by the run-config check and the silos' request models (common/protocol/messages.py): a value
#: the server accepts is never one a silo refuses or overflows on
INT32_MAX = 2**31 - 1
MAX_EPOCHS = 10_000  # a FinetuneReply carries one history entry per epoch (+ the starting weights)
SEED_MAX = 2**63 - 1  # torch.manual_seed / torch.Generator take a 64-bit seed
#: a random seed: torch's generators take it as a 64-bit integer
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
#: a count that reaches torch (sizes, subsample sizes): at least 1, fits an int32
Count = Annotated[int, Field(ge=1, le=INT32_MAX)]
#: default LoRA targets (glob patterns over parameter names) of the light backbone: attention in/out
#: projections and the feed-forward linears (common/model/lora.py)
LORA_TARGETS = ["*.self_attn.in_proj_weight", "*.self_attn.out_proj.weight", "*.linear1.weight", "*.linear2.weight"]


class BackboneConfig(Strict):
    """Which recommender to build. Every parameter is shared across domains (ID-free).

    Field descriptions are one line each: they are the comments of pyproject.toml's run-config table
    (`python -m server.config`)."""

    kind: Literal["light", "text"] = Field("light", description="light (frozen item-text features, adaptor, small "
                                           "transformer) | text (fine-tuned MiniLM)")
    encoder: str = Field("minilm", description="'minilm' (bundled, offline), a local model folder, or a hub id")
    # light backbone: frozen item-text features -> adaptor -> causal transformer over the history
    dim: PositiveInt | None = Field(128, description="hidden size; None = the encoder's hidden size")
    layers: PositiveInt = 2
    heads: PositiveInt = 2
    ff_mult: PositiveInt = 2
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    max_items: PositiveInt = Field(50, description="at most this many most recent history items")
    adaptor_hidden: int = Field(1024, ge=0, le=65536, description="light: width of the item adaptor's MLP residual "
                                "(zero at the base, never trained in a silo, fitted by the server when merging; "
                                "0 = none)")
    # center_items removes the direction all of one catalog's items share, which differs from catalog to catalog
    center_items: bool = Field(False, description="light: subtract each catalog's mean item-text embedding (and "
                               "re-normalise) before the adaptor")
    # text backbone / item features
    item_value_tokens: PositiveInt = Field(32, description="each of title/brand/category cut to this many tokens")
    item_max_tokens: PositiveInt = 128
    encoder_precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="item-text encoding: auto (bfloat16 where the CPU/GPU multiplies it natively: ~2x "
        "faster, cosine to float32 >= 0.99997) | float32 | bfloat16")
    seq_max_tokens: PositiveInt = 128
    cache_dir: Path = Field(Path(".cache/item_embeddings"), description="frozen item-text embedding cache")
    # 'init': seeded text-similarity initialisation; 'bundled': the checkpoint pretrained on public domains,
    # shipped in common/assets; or a base file written by `python -m common.model.pretrain`
    base: str = Field("init", description="light backbone's starting weights: init (seeded) | bundled (pretrained "
                      "on public domains) | a base file")


class TrainConfig(Strict):
    """Local fine-tuning in one silo (stage 1).

    Some defaults depend on the backbone (`BACKBONE_DEFAULTS`): a field not given explicitly takes its
    backbone's default when a PipelineConfig is built (or through `with_backbone_defaults`); a field given
    explicitly always wins."""

    epochs: int = Field(20, ge=1, le=MAX_EPOCHS, description="at most; early stopping on validation NDCG@10")
    batch_size: Count = Field(128, description="fine-tuning batch size")
    lr: float = Field(1e-3, gt=0, description="fine-tuning learning rate")
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(100, ge=0, le=INT32_MAX, description="linear lr warm-up, capped at one epoch's "
                              "steps (a small silo or user subsample still reaches the configured lr)")
    tau: float = Field(0.05, gt=0)
    negatives: Literal["full", "inbatch", "sampled"] = Field("sampled", description="training softmax: full (every "
                                                           "item) | sampled | inbatch (the batch's targets)")
    # at least 3: a position masks at most two of them, its target and its current item
    num_negatives: int = Field(2048, ge=3, le=INT32_MAX, description="negatives=sampled: items drawn uniformly "
                               "per batch (at least 3)")
    seen_items: SeenItems = Field("exclude", description="items a user has already seen: exclude (left out of "
                                  "the ranking, as users get it) | rank (ranked with the rest)")
    mask_current_item: bool = Field(True, description="seen-items=rank: leave the most recent input item out of "
                                    "the training softmax unless it is the target")
    # on Amazon data validation NDCG@10 dips for a few epochs before it passes the untrained model
    patience: int = Field(5, ge=1, le=MAX_EPOCHS, description="epochs without a validation NDCG@10 gain before "
                          "stopping")
    # Python only (not a run-config key: measured useless); `selection` decides the final fit
    refit_on_val: bool = Field(True, description="after early stopping, retrain from the start on train + "
                               "validation items for the chosen epoch count (the model tested and sent)")
    # 'refit': select the epoch count on validation items, then retrain from the start on train + validation items
    # (two runs); 'held-out-users': one run on train + validation items of every user except a seeded
    # val_max_users subsample, whose validation items pick the epoch (its weights are final); 'continue': the
    # held-out-users run, then `continue_epochs` more epochs from the best epoch's weights on train + validation
    # items of every user (the held-out users' included)
    selection: Literal["refit", "continue", "held-out-users"] = Field(
        "continue", description="refit (select, then retrain on train + val) | held-out-users (one run) | continue "
        "(held-out-users, then continue-epochs more on every user's train + val)")
    continue_epochs: int = Field(1, ge=1, le=MAX_EPOCHS, description="selection=continue: epochs on every user's "
                                 "train + val after the best epoch")
    # Python only (not a run-config key: measured useless)
    l2sp: float = Field(0.0, ge=0, description="L2-SP: weight of sum((theta - theta_start)^2) added to the loss, a "
                        "pull toward the shared base that keeps task vectors small and mergeable (0 = off)")
    freeze: list[str] = Field(default_factory=list, description="parameter-name prefixes kept at the base, their "
                              "task-vector entries zero (none = train everything)")
    # 'lora': only low-rank factors of the lora_targets are trained and sent (common/model/lora.py)
    finetune: Literal["full", "lora"] = Field("full", description="full (dense task vector) | lora (silos train "
                                              "and send LoRA factors)")
    lora_rank: PositiveInt = Field(8, le=1024, description="LoRA rank r (finetune=lora)")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scale alpha: delta = (alpha / r) * B @ A")
    lora_targets: list[str] = Field(default_factory=lambda: list(LORA_TARGETS), min_length=1, description="glob "
                                    "patterns over parameter names of the 2-D weights LoRA adapts")
    max_users: Count | None = Field(None, description="train on a seeded subsample of this many users (none / 0 "
                                    "= all)")
    max_steps_per_epoch: Count | None = None
    eval_batch_size: Count = 256
    # at least MIN_USERS_FOR_METRICS: its per-epoch metrics leave the silo
    val_max_users: Count | None = Field(2000, description="early stopping validates on a seeded subsample of "
                                        "this many users (none / 0 = all)")
    # user-level DP-SGD (common/model/dp.py): each user's gradient clipped, users Poisson-sampled, Gaussian noise
    dp_epsilon: float | None = Field(None, gt=0, le=1e6, description="user-level DP-SGD: the silo's target epsilon "
                                     "over the planned steps (none = no DP)")
    dp_delta: float | None = Field(None, gt=0, lt=1, description="DP delta (none = 1 / the silo's training users)")
    dp_clip: float = Field(1.0, gt=0, le=1e6, description="DP: each user's gradient is clipped to this L2 norm")
    seed: Seed = 0
    device: str = "auto"
    progress: bool = True

    #: defaults that differ per backbone, for the fields not given explicitly. Light, dense fine-tuning keeps the
    #: transformer blocks at the base (`freeze=["blocks"]`): their task vectors break every other domain, while
    #: the adaptor's carry over and hold most of the in-domain gain (docs/benchmarks.md, "A base worth merging");
    #: LoRA adapts the blocks, so it freezes nothing. The text encoder uses the reference's lr 5e-5, a small batch
    #: and a full softmax over its re-encoded item table.
    BACKBONE_DEFAULTS: ClassVar[dict[str, dict]] = {
        "light": {"freeze": ["blocks"]},
        "text": {"lr": 5e-5, "batch_size": 32, "epochs": 3, "patience": 1, "negatives": "full",
                 "selection": "refit"},
    }

    @field_validator("val_max_users")
    @classmethod
    def _aggregates_only(cls, v):
        if v is not None and v < MIN_USERS_FOR_METRICS:
            raise ValueError(f"val_max_users must be at least {MIN_USERS_FOR_METRICS}")
        return v

    @model_validator(mode="after")
    def _dp_selection(self):
        if self.dp_epsilon is not None and self.refits:
            raise ValueError("dp-epsilon needs selection continue or held-out-users (refit validates on the users it "
                             "trains on, outside the accounted training)")
        return self

    @property
    def refits(self) -> bool:
        """Whether fine-tuning trains twice: selection on validation items, then the final fit from the start."""
        return self.refit_on_val and self.selection == "refit"

    @property
    def final_fit_epochs(self) -> int | None:
        """Epochs of the final fit on train + validation items after selection: None = as many as the selection
        chose ('refit', from the start), k = `continue_epochs` from the best epoch ('continue'), 0 = none
        ('held-out-users', or no final fit)."""
        if not self.refit_on_val or self.selection == "held-out-users":
            return 0
        return None if self.selection == "refit" else self.continue_epochs

    @classmethod
    def backbone_defaults(cls, kind: str, finetune: str = "full") -> dict:
        """The defaults of backbone `kind` for every field some backbone sets (BACKBONE_DEFAULTS; a field
        another backbone sets has its plain default here), LoRA freezing nothing."""
        plain = {k: cls.model_fields[k].get_default(call_default_factory=True)
                 for table in cls.BACKBONE_DEFAULTS.values() for k in table}
        out = {**plain, **cls.BACKBONE_DEFAULTS[kind]}
        if finetune != "full":
            out["freeze"] = cls.model_fields["freeze"].get_default(call_default_factory=True)
        return out

    def with_defaults(self, **defaults) -> "TrainConfig":
        """A copy with `defaults` for every field not given explicitly (`model_fields_set`); the fields given stay
        the only ones marked as given, so applying other defaults later still works."""
        given = set(self.model_fields_set)
        fill = {k: v for k, v in defaults.items() if k not in given and getattr(self, k) != v}
        if not fill:
            return self
        out = type(self).model_validate({**self.model_dump(), **fill})
        object.__setattr__(out, "__pydantic_fields_set__", given)
        return out

    def with_backbone_defaults(self, kind: str) -> "TrainConfig":
        """This configuration with backbone `kind`'s defaults for every field not given explicitly."""
        return self.with_defaults(**self.backbone_defaults(kind, self.finetune))


def resolve_device(device: str):
    """"auto" (CUDA when available, else CPU) or a torch device name; ValueError for a name torch does not know
    or a CUDA device on a machine without CUDA."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"cannot use {device!r}: CUDA is not available on this machine (torch "
                             f"{torch.__version__}); use cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"cannot use {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev
