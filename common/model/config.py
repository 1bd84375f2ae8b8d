"""pydantic configs shared by the CLI, benchmarks, server and clients."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveInt, field_validator

from common.core.strict import Strict

#: no metric a silo reports may average over fewer users (it would describe individuals)
MIN_USERS_FOR_METRICS = 5
#: default LoRA targets (glob patterns over parameter names) of the light backbone: attention in/out
#: projections and the feed-forward linears (common/model/lora.py)
LORA_TARGETS = ["*.self_attn.in_proj_weight", "*.self_attn.out_proj.weight", "*.linear1.weight", "*.linear2.weight"]


class BackboneConfig(Strict):
    """Which recommender to build. Every parameter is shared across domains (ID-free)."""

    kind: Literal["light", "text"] = "light"
    encoder: str = Field("minilm", description="'minilm' (bundled, offline), a local model folder, or a hub id")
    # light backbone: frozen item-text features -> adaptor -> causal transformer over the history
    dim: PositiveInt | None = Field(128, description="hidden size; None = the encoder's hidden size")
    layers: PositiveInt = 2
    heads: PositiveInt = 2
    ff_mult: PositiveInt = 2
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    max_items: PositiveInt = Field(50, description="at most this many most recent history items")
    center_items: bool = Field(False, description="light: subtract the catalog's mean item-text embedding and "
                               "re-normalise before the adaptor (removes the direction all of one catalog's "
                               "items share, which differs from catalog to catalog)")
    # text backbone / item features
    item_value_tokens: PositiveInt = Field(32, description="each of title/brand/category cut to this many tokens")
    item_max_tokens: PositiveInt = 128
    seq_max_tokens: PositiveInt = 128
    cache_dir: Path = Field(Path(".cache/item_embeddings"), description="frozen item-text embedding cache")
    base: str = Field("init", description="light backbone's starting weights: 'init' (seeded text-similarity "
                      "initialisation), 'bundled' (the checkpoint pretrained on public domains, shipped in "
                      "common/assets), or a base file written by `python -m common.model.pretrain`")


class TrainConfig(Strict):
    """Local fine-tuning in one silo (stage 1)."""

    epochs: PositiveInt = 20
    batch_size: PositiveInt = 128
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(100, ge=0, description="linear lr warm-up, capped at one epoch's steps (a small "
                              "silo or user subsample still reaches the configured lr)")
    tau: float = Field(0.05, gt=0)
    negatives: Literal["full", "inbatch", "sampled"] = Field("sampled", description="training softmax over every "
                                                           "item, the batch's targets, or sampled items")
    num_negatives: int = Field(2048, ge=3, description="negatives='sampled': items drawn uniformly per batch (at "
                               "least 3: a position masks at most two of them, its target and its current item)")
    mask_current_item: bool = Field(True, description="leave the most recent input item out of the training "
                                    "softmax unless it is the target (evaluation always ranks every item)")
    patience: int = Field(5, ge=1, description="epochs without validation NDCG@10 gain before stopping (on Amazon "
                          "data validation NDCG@10 dips for a few epochs before it passes the untrained model)")
    refit_on_val: bool = Field(True, description="after early stopping, retrain from the start on train + "
                               "validation items for the chosen epoch count (the model tested and sent)")
    selection: Literal["refit", "continue", "held-out-users"] = Field(
        "continue", description="'refit': select the epoch count on validation items, then retrain from the start on "
        "train + validation items (two runs); 'held-out-users': one run on train + validation items of every user "
        "except a seeded val-max-users subsample, whose validation items pick the epoch (its weights are final); "
        "'continue': the held-out-users run, then `continue_epochs` more epochs from the best epoch's weights on "
        "train + validation items of every user (the held-out users' included)")
    continue_epochs: PositiveInt = Field(1, description="selection='continue': epochs on every user's train + "
                                         "validation items after the best epoch")
    l2sp: float = Field(0.0, ge=0, description="L2-SP: weight of sum((theta - theta_start)^2) added to the loss, a "
                        "pull toward the shared base that keeps task vectors small and mergeable (0 = off)")
    freeze: list[str] = Field(default_factory=list, description="parameter-name prefixes kept at the base's "
                              "values (e.g. 'adaptor', 'position'): their task-vector entries stay zero")
    finetune: Literal["full", "lora"] = Field("full", description="'full': every parameter is trained and the "
                                              "silo sends a dense task vector; 'lora': only low-rank factors of "
                                              "the lora_targets are trained and sent (common/model/lora.py)")
    lora_rank: PositiveInt = Field(8, le=1024, description="LoRA rank r (finetune='lora')")
    lora_alpha: float = Field(16.0, gt=0, allow_inf_nan=False, description="LoRA scale alpha: delta = "
                              "(alpha / r) * B @ A")
    lora_targets: list[str] = Field(default_factory=lambda: list(LORA_TARGETS), min_length=1, description="glob "
                                    "patterns over parameter names of the 2-D weights LoRA adapts")
    max_users: PositiveInt | None = Field(None, description="train on a seeded subsample of users")
    max_steps_per_epoch: PositiveInt | None = None
    eval_batch_size: PositiveInt = 256
    val_max_users: PositiveInt | None = Field(2000, description="early stopping validates on a seeded subsample "
                                              "of this many users (speed; None = all; at least "
                                              "MIN_USERS_FOR_METRICS: its per-epoch metrics leave the silo)")
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    @field_validator("val_max_users")
    @classmethod
    def _aggregates_only(cls, v):
        if v is not None and v < MIN_USERS_FOR_METRICS:
            raise ValueError(f"val_max_users must be at least {MIN_USERS_FOR_METRICS}")
        return v

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
    def for_backbone(cls, kind: str, **overrides) -> "TrainConfig":
        """Sane defaults per backbone. Light, dense fine-tuning: the transformer blocks stay at the base
        (`freeze=["blocks"]`): their task vectors break every other domain, while the adaptor's carry over and
        hold most of the in-domain gain (docs/benchmarks.md, "A base worth merging"). The text encoder uses the
        reference's lr 5e-5, a small batch and a full softmax over its re-encoded item table."""
        light = {"freeze": ["blocks"]} if overrides.get("finetune", "full") == "full" else {}
        base = {"light": light, "text": {"lr": 5e-5, "batch_size": 32, "epochs": 3, "patience": 1,
                                         "negatives": "full", "selection": "refit"}}[kind]
        return cls(**{**base, **overrides})


def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
