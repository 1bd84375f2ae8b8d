"""The shared base model as the server knows it, and the catalogs it learned at the handshake.

Everything here is public to every silo (the base's weights or fingerprint, item texts), never user data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from common.core.fingerprint import fingerprint
from common.data.format import CatalogView
from common.model.backbones import DomainInputs, Recommender, build_backbone, shared_state
from common.model.lora import LoraSpec, dense_bytes
from common.protocol.messages import BaseSpec
from server.validation import state_norm


class ConfigProblem(ValueError):
    """A run-config value the server cannot start with (the message starts with the key)."""


@dataclass
class BaseContext:
    """model: the base Recommender; state: its shared parameters (what task vectors and merges are made of);
    spec: what every request names (backbone, seed, fingerprint); lora: the run's LoraSpec when finetune = lora;
    catalogs: domain -> CatalogView and users: domain -> the silo's user count, filled by the handshake."""

    model: Recommender
    state: dict[str, torch.Tensor]
    fingerprint: str
    norm: float
    shapes: dict[str, tuple[int, ...]]
    spec: BaseSpec
    lora: LoraSpec | None
    dense_bytes: int
    catalogs: dict[str, CatalogView] = field(default_factory=dict)
    users: dict[str, int] = field(default_factory=dict)

    @classmethod
    def build(cls, cfg) -> "BaseContext":
        """The base of PipelineConfig `cfg` (deterministic given backbone and seed)."""
        model = build_backbone(cfg.backbone, seed=cfg.seed)
        state = shared_state(model)
        fp = fingerprint(state)
        shapes = {n: tuple(t.shape) for n, t in state.items()}
        lora = None
        if cfg.train.finetune == "lora":
            try:
                lora = LoraSpec(cfg.train, shapes)
            except ValueError as exc:
                raise ConfigProblem(f"bad run-config: {exc}") from None
        return cls(model=model, state=state, fingerprint=fp, norm=state_norm(state), shapes=shapes,
                   spec=BaseSpec(backbone=cfg.backbone, seed=cfg.seed, fingerprint=fp), lora=lora,
                   dense_bytes=dense_bytes(state))

    def dom(self, domain: str) -> DomainInputs:
        """The base model's inputs for a domain's catalog (item-text features, cached)."""
        return self.model.domain_inputs(self.catalogs[domain])

    def max_items(self) -> int:
        return max(map(len, self.catalogs.values()), default=0)
