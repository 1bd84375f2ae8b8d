"""ID-free sequential recommenders behind one interface (see docs/design.md, "Model contract").

Both backbones embed a user's history and an item into the same L2-normalised space; score = cosine.
Items enter only through their text, so every parameter is shared across domains and can be merged.

- ``LightRecommender`` (CPU default): frozen pretrained item-text embeddings (cached once per catalog) ->
  trainable linear adaptor -> small causal transformer over the history. Initialised so that the untrained
  ("pretrained") model scores a candidate by its text similarity to the most recent history item (exactly
  when dim = F; through a fixed random +-1 projection, which roughly preserves cosines, when dim != F).
- ``TextRecommender``: the pretrained text encoder itself, fine-tuned end to end; a history is embedded from
  its sequence text (most recent first, "; "-joined, token budget), an item from its item text.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from common.model.config import BackboneConfig

if TYPE_CHECKING:
    from common.data.format import CatalogView

PAD = -1
#: name prefix of the light backbone's item MLP residual (trained only by the server's item-tower fit)
ITEM_MLP = "adaptor_mlp."


@dataclass
class DomainInputs:
    """Per-domain item inputs of a model (never user data). Built by `Recommender.domain_inputs`."""

    domain: str
    num_items: int
    features: torch.Tensor | None = None  # light: [N, F] frozen item-text embeddings
    texts: list[str] | None = None  # text: item texts, row = item id
    feature_mean: torch.Tensor | None = None  # light, center_items: [F] the catalog mean subtracted from features


def pad_histories(histories: list[list[int]], max_items: int) -> torch.Tensor:
    """Right-aligned LongTensor [B, L] of the last `max_items` items of each history, -1 padded on the left."""
    rows = [list(h[-max_items:]) for h in histories]
    width = max(1, max((len(r) for r in rows), default=1))
    # padded in Python, converted once: one tensor copy per batch instead of one per row
    return torch.tensor([[PAD] * (width - len(r)) + r for r in rows], dtype=torch.long).view(len(rows), width)


class Recommender(nn.Module):
    """Interface. forward(dom, "items", ids[n]) -> [n,d]; forward(dom, "histories", hist[B,L]) -> [B,d]."""

    causal: bool = False  # True: forward(dom, "positions", hist) gives an embedding per position

    def domain_inputs(self, catalog: CatalogView, **kw) -> DomainInputs:
        raise NotImplementedError

    def layer_of(self, param_name: str) -> str:
        raise NotImplementedError


class LightRecommender(Recommender):
    causal = True

    def __init__(self, cfg: BackboneConfig, feature_dim: int):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim or feature_dim
        self.adaptor = nn.Linear(feature_dim, dim)
        self.position = nn.Embedding(cfg.max_items, dim)
        layer = nn.TransformerEncoderLayer(
            dim, cfg.heads, dim * cfg.ff_mult, cfg.dropout, batch_first=True, norm_first=True, activation="gelu"
        )
        self.blocks = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self._init_as_text_similarity()
        # built after the rest, so the other parameters are the same whatever its width
        self.adaptor_mlp = item_mlp(feature_dim, cfg.adaptor_hidden, dim)

    def _init_as_text_similarity(self) -> None:
        """Adaptor = identity (dim = F) or a random +-1/sqrt(dim) projection (Johnson-Lindenstrauss);
        zero positions and zero residual outputs: the untrained model embeds a history as its last item's
        (projected) text embedding. Only the seeded RNG is used (no LAPACK), so every process, whatever its
        thread count, builds the bit-identical base that the fingerprint check expects."""
        with torch.no_grad():
            w = self.adaptor.weight
            if w.shape[0] == w.shape[1]:
                w.copy_(torch.eye(*w.shape))
            else:
                signs = torch.randint(0, 2, w.shape, dtype=torch.int64).to(w.dtype) * 2 - 1
                w.copy_(signs / math.sqrt(w.shape[0]))
            self.adaptor.bias.zero_()
            self.position.weight.zero_()
            for blk in self.blocks.layers:
                blk.self_attn.out_proj.weight.zero_()
                blk.self_attn.out_proj.bias.zero_()
                blk.linear2.weight.zero_()
                blk.linear2.bias.zero_()

    def domain_inputs(self, catalog: CatalogView, *, features: torch.Tensor | None = None,
                      center_like: DomainInputs | None = None, **kw) -> DomainInputs:
        """The catalog's frozen item-text features [N, F] (cached), centred when `cfg.center_items`: on the
        catalog's own mean, or on `center_like`'s (items added to an indexed catalog keep its geometry)."""
        if features is None:
            from common.model.item_cache import item_text_embeddings

            features = item_text_embeddings(
                catalog,
                encoder=self.cfg.encoder,
                value_tokens=self.cfg.item_value_tokens,
                max_tokens=self.cfg.item_max_tokens,
                cache_dir=self.cfg.cache_dir,
                precision=self.cfg.encoder_precision,
                **kw,
            )
        if features.shape[0] != len(catalog):
            raise ValueError(f"{catalog.domain}: {features.shape[0]} feature rows for {len(catalog)} items")
        mean = None
        if self.cfg.center_items:
            mean = center_like.feature_mean if center_like is not None else features.mean(0)
            features = F.normalize(features - mean, dim=-1)
        return DomainInputs(catalog.domain, len(catalog), features=features, feature_mean=mean)

    def _items(self, dom: DomainInputs, ids: torch.Tensor) -> torch.Tensor:
        x = dom.features.to(self.adaptor.weight.device)[ids]
        out = self.adaptor(x)
        return out + self.adaptor_mlp(x) if mlp_contributes(self.adaptor_mlp) else out

    def block_inputs(self, dom: DomainInputs, hist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [B, L, dim], attention mask [B * heads, L, L]): what the first transformer block receives.
        Also used by `common.model.integration.IntegratedRecommender`, which has the same adaptor/position/cfg."""
        b, length = hist.shape
        valid = hist >= 0
        x = self._items(dom, hist.clamp_min(0)) * valid.unsqueeze(-1)
        # absolute position from the start of the (truncated) history; padding sits left of position 0
        pos = (valid.long().cumsum(1) - 1).clamp_min(0)
        x = x + self.position(pos)
        causal = torch.ones(length, length, dtype=torch.bool, device=hist.device).tril()
        allowed = causal & (valid.unsqueeze(1) | torch.eye(length, dtype=torch.bool, device=hist.device))
        mask = torch.zeros(b, length, length, device=x.device, dtype=x.dtype)
        mask.masked_fill_(~allowed, float("-inf"))
        return x, mask.repeat_interleave(self.cfg.heads, dim=0)

    def _positions(self, dom: DomainInputs, hist: torch.Tensor) -> torch.Tensor:
        x, mask = self.block_inputs(dom, hist)
        return self.blocks(x, mask=mask)

    def forward(self, dom: DomainInputs, kind: str, x: torch.Tensor) -> torch.Tensor:
        if kind == "items":
            return F.normalize(self._items(dom, x), dim=-1)
        if kind == "histories":
            return F.normalize(self._positions(dom, x)[:, -1], dim=-1)
        if kind == "positions":
            return F.normalize(self._positions(dom, x), dim=-1)
        raise ValueError(f"unknown forward kind {kind!r}")

    def layer_of(self, param_name: str) -> str:
        """'layer<i>' for transformer block i; the adaptor and the position embeddings are layers of their own
        (with the blocks frozen they are all that a task vector changes: layer-wise merging still learns 2 numbers
        per domain); the adaptor's MLP residual belongs to the adaptor's group (one item tower)."""
        m = re.match(r"blocks\.layers\.(\d+)\.", param_name)
        if m:
            return f"layer{int(m.group(1))}"
        top = param_name.split(".", 1)[0]
        if top == "adaptor_mlp":
            return "adaptor"
        return top if top in ("adaptor", "position") else "rest"


def mlp_contributes(mlp: nn.Sequential | None) -> bool:
    """Whether the item adaptor's MLP residual can change the item tower's output or receive a gradient: False
    when there is none, or when its last layer is exactly zero and not being trained (a silo's residual, frozen at
    zero, and every model before the server's item-tower fit). Skipping it then gives the same numbers
    (out + 0 = out) without its cost, the largest part of the item tower's (F x hidden x 2 multiply-adds per item)."""
    if mlp is None:
        return False
    last = mlp[2]
    if torch.is_grad_enabled() and (last.weight.requires_grad or last.bias.requires_grad):
        return True
    return bool(last.weight.any()) or bool(last.bias.any())


def item_mlp(feature_dim: int, hidden: int, dim: int) -> nn.Sequential | None:
    """The item adaptor's MLP residual, Linear(F, hidden) -> GELU -> Linear(hidden, dim), with a zero last layer
    (zero output: the model computes what it would without it); None when `hidden` is 0. Silos never train it
    (common/model/train.py); the server fits it when merging (common/model/tower_fit.py)."""
    if not hidden:
        return None
    mlp = nn.Sequential(nn.Linear(feature_dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
    with torch.no_grad():
        mlp[2].weight.zero_()
        mlp[2].bias.zero_()
    return mlp


class TextRecommender(Recommender):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        from common.model.encoder import load_encoder, load_tokenizer

        self.cfg = cfg
        self.encoder = load_encoder(cfg.encoder)
        self.tokenizer = load_tokenizer(cfg.encoder)

    def domain_inputs(self, catalog: CatalogView, **kw) -> DomainInputs:
        from common.data.text import catalog_texts

        texts = catalog_texts(catalog, self.tokenizer, self.cfg.item_value_tokens)
        return DomainInputs(catalog.domain, len(catalog), texts=texts)

    def _encode(self, texts: list[str], max_tokens: int) -> torch.Tensor:
        from common.model.encoder import mean_pool

        device = next(self.encoder.parameters()).device
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
        batch = batch.to(device)
        hidden = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return F.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)

    def forward(self, dom: DomainInputs, kind: str, x: torch.Tensor) -> torch.Tensor:
        if kind == "items":
            return self._encode([dom.texts[i] for i in x.tolist()], self.cfg.item_max_tokens)
        if kind == "histories":
            from common.data.text import sequence_texts

            histories = [[i for i in row if i >= 0] for row in x.tolist()]
            texts = sequence_texts(histories, dom.texts, self.tokenizer, self.cfg.seq_max_tokens - 2,
                                   self.cfg.max_items)
            return self._encode(texts, self.cfg.seq_max_tokens)
        raise ValueError(f"unknown forward kind {kind!r}")

    def layer_of(self, param_name: str) -> str:
        m = re.search(r"encoder\.layer\.(\d+)\.", param_name)
        return f"layer{int(m.group(1))}" if m else "rest"


def build_backbone(cfg: BackboneConfig, *, seed: int = 0) -> Recommender:
    """The shared pretrained model every silo starts from. Deterministic given (cfg, seed)."""
    torch.manual_seed(seed)
    if cfg.kind == "text":
        if cfg.base != "init":
            raise ValueError("base: the text backbone starts from its encoder's own weights; use base='init'")
        return TextRecommender(cfg)
    from common.model.encoder import encoder_width

    model = LightRecommender(cfg, encoder_width(cfg.encoder))
    if cfg.base != "init":
        load_base_weights(model, cfg)
    return model


def load_base_weights(model: Recommender, cfg: BackboneConfig) -> None:
    """Replace `model`'s weights by the base checkpoint `cfg.base` (every parameter, exactly; a missing,
    extra or mis-shaped tensor is a BaseFileError naming the file)."""
    from common.model.base_model import BaseFileError, check_architecture, load_base
    from common.merging.task_vectors import BaseMismatchError, check_compatible

    state, card = load_base(cfg.base)
    check_architecture(card, cfg, cfg.base)
    # a base made without the item MLP residual (or with it): the residual's seeded, zero-output init is part of
    # the base either way, since nothing before the server's merge trains it
    own = shared_state(model)
    state = {**{n: t for n, t in state.items() if not n.startswith(ITEM_MLP)},
             **{n: t for n, t in own.items() if n.startswith(ITEM_MLP)}}
    try:
        check_compatible(state, own, f"base checkpoint {cfg.base}")
    except BaseMismatchError as exc:
        raise BaseFileError(str(exc)) from exc
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state[name].to(p.dtype))


def shared_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, detached, on CPU: what a task vector / merged model is made of."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters()}


def items_in_batches(forward, dom: DomainInputs, device, batch_size: int = 1024) -> torch.Tensor:
    """[N, d] = forward(ids) over every item id of the domain, in batches (keeps the graph if grad is enabled).
    Text items go in order of text length (batches of similar length carry little padding); rows come back
    in item-id order."""
    texts = getattr(dom, "texts", None)
    if texts is None:
        order = torch.arange(dom.num_items)
    else:
        order = torch.as_tensor(sorted(range(dom.num_items), key=lambda i: len(texts[i])), dtype=torch.long)
        batch_size = min(batch_size, 256)
    out = torch.cat([forward(order[s : s + batch_size].to(device)) for s in range(0, dom.num_items, batch_size)])
    return out.index_select(0, torch.argsort(order).to(out.device))


@torch.no_grad()
def encode_all_items(model: Recommender, dom: DomainInputs, batch_size: int = 1024) -> torch.Tensor:
    """[N, d] item embeddings of a whole catalog, batched, no grad."""
    device = next(model.parameters()).device
    return items_in_batches(lambda ids: model(dom, "items", ids), dom, device, batch_size)
