"""Use a model: top-k recommendations for a history, and full-ranking evaluation on a domain folder.

    rec = MergedRecommender.from_pretrained("runs/latest/model")
    rec.index(".cache/demo-data/garden")           # or any list of item texts / metadata dicts
    rec.recommend(["GAR00012", "GAR00107"], k=10)

The model is ID-free: items enter only through their text, so any catalog can be indexed (also a shop that
took no part in training) and a history may name catalog items by key or give raw item texts (an item not
in the catalog is encoded from its text). Items already in the history are left out of the results unless
`exclude_seen=False`. Scores are the model's cosine scores, computed exactly as the pipeline's evaluation
computes them (common/model/train.py), and `evaluate` runs that same evaluation code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
from pydantic import BaseModel

from common.model.backbones import DomainInputs, Recommender, build_backbone, encode_all_items, pad_histories
from common.model.config import resolve_device
from common.data.format import CatalogView, ItemMeta, load_catalog, load_silo
from common.core.fingerprint import fingerprint
from common.api.model_folder import ModelConfig, ModelFolderError, load_weights

HistoryItem = Union[str, dict, ItemMeta]


class Recommendation(BaseModel):
    rank: int
    key: str
    title: str
    score: float


def _meta(entry: HistoryItem) -> ItemMeta:
    if isinstance(entry, ItemMeta):
        return entry
    if isinstance(entry, dict):
        return ItemMeta(**{k: str(entry.get(k, "")) for k in ("title", "brand", "category")})
    return ItemMeta(title=str(entry), brand="", category="")


def catalog_from_items(items: list[HistoryItem], domain: str = "catalog") -> CatalogView:
    """A catalog from item texts (key = the text) or dicts with title/brand/category (key = their "key",
    else the position as a string)."""
    keys, metas = [], []
    for i, it in enumerate(items):
        if isinstance(it, str):
            keys.append(it)
        else:
            keys.append(str(it.get("key", i)) if isinstance(it, dict) else str(i))
        metas.append(_meta(it))
    return CatalogView(domain=domain, item_keys=tuple(keys), items=tuple(metas))


def _concat(a: DomainInputs, b: DomainInputs) -> DomainInputs:
    feats = None if a.features is None else torch.cat([a.features, b.features.to(a.features.dtype)])
    texts = None if a.texts is None else [*a.texts, *b.texts]
    return DomainInputs(a.domain, a.num_items + b.num_items, features=feats, texts=texts, feature_mean=a.feature_mean)


class MergedRecommender:
    """One model (merged, fine-tuned or the base) with its item encoder, ready to score a catalog."""

    def __init__(self, model: Recommender, config: ModelConfig):
        self.model = model.eval()
        self.config = config
        self.catalog: CatalogView | None = None
        self.dom: DomainInputs | None = None
        self.items: torch.Tensor | None = None

    @classmethod
    def from_pretrained(cls, model: str | Path, *, cache_dir: str | Path | None = None, encoder: str | None = None,
                        device: str = "cpu") -> MergedRecommender:
        """Load a model folder (config.json + model.safetensors), a weights file with its configuration in
        the metadata (a silo's fine-tuned model), or `base:init` / `base:bundled` (the shared base).
        cache_dir / encoder override where item-text embeddings are cached and which text encoder is used."""
        cfg, state = load_weights(model)
        update = {**({"cache_dir": Path(cache_dir)} if cache_dir else {}), **({"encoder": encoder} if encoder else {})}
        backbone = cfg.backbone.model_copy(update=update)
        net = build_backbone(backbone, seed=cfg.seed)
        if state is not None:
            own = dict(net.named_parameters())
            missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            bad = [n for n in own if n in state and tuple(state[n].shape) != tuple(own[n].shape)]
            if missing or extra or bad:
                raise ModelFolderError(f"{model}: weights do not fit the configured backbone (missing "
                                       f"{missing[:3]}, unexpected {extra[:3]}, other shape {bad[:3]})")
            if cfg.fingerprint and fingerprint(state) != cfg.fingerprint:
                raise ModelFolderError(f"{model}: weights fingerprint differs from the one its configuration "
                                       "records (the file was changed)")
            with torch.no_grad():
                for n, p in own.items():
                    p.copy_(state[n].to(p.dtype))
        net.to(resolve_device(device))
        return cls(net, cfg.model_copy(update={"backbone": backbone}))

    # ------------------------------------------------------------------ catalog
    def index(self, catalog: str | Path | CatalogView | list[HistoryItem], domain: str | None = None) -> MergedRecommender:
        """Make `catalog` the candidate set: a domain folder (meta_data.json + smap.json), a CatalogView, or a
        list of item texts / {"key", "title", "brand", "category"} dicts. Returns self."""
        if isinstance(catalog, (str, Path)):
            cat = load_catalog(catalog, domain)
        elif isinstance(catalog, CatalogView):
            cat = catalog
        else:
            cat = catalog_from_items(list(catalog), domain or "catalog")
        self.catalog = cat
        self.dom = self.model.domain_inputs(cat)
        self.items = encode_all_items(self.model, self.dom)
        self._by_key = {k: i for i, k in enumerate(cat.item_keys)}
        self._by_text: dict[tuple, int] = {}
        for i, m in enumerate(cat.items):
            self._by_text.setdefault((m.title, m.brand, m.category), i)
            self._by_text.setdefault((m.title,), i)
        return self

    def _require_index(self) -> None:
        if self.catalog is None:
            raise RuntimeError("call index(catalog) first")

    def resolve(self, history: list[HistoryItem]) -> tuple[list[int], list[ItemMeta]]:
        """History entries -> item ids; ids >= len(catalog) point into the returned list of new items
        (entries matching no catalog key or item text)."""
        self._require_index()
        ids, new = [], []
        for entry in history:
            if isinstance(entry, str) and entry in self._by_key:
                ids.append(self._by_key[entry])
                continue
            m = _meta(entry)
            hit = self._by_text.get((m.title, m.brand, m.category))
            if hit is None and not m.brand and not m.category:
                hit = self._by_text.get((m.title,))
            if hit is None:
                hit = len(self.catalog) + len(new)
                new.append(m)
            ids.append(hit)
        return ids, new

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score_ids(self, histories: list[list[int]], dom: DomainInputs | None = None) -> torch.Tensor:
        """[B, N] cosine scores of every catalog item for histories of item ids (the evaluation's formula)."""
        self._require_index()
        device = next(self.model.parameters()).device
        hist = pad_histories(histories, self.model.cfg.max_items).to(device)
        return (self.model(dom or self.dom, "histories", hist) @ self.items.T).cpu()

    def scores(self, histories: list[list[HistoryItem]]) -> tuple[torch.Tensor, list[list[int]]]:
        """Scores [B, N] for histories of keys / texts, and each history's resolved ids."""
        resolved = [self.resolve(h) for h in histories]
        new = [m for _, extra in resolved for m in extra]
        ids, offset = [], len(self.catalog)
        for hist_ids, extra in resolved:  # renumber each history's new items into one shared extension
            shift = offset - len(self.catalog)
            ids.append([i if i < len(self.catalog) else i + shift for i in hist_ids])
            offset += len(extra)
        dom = self.dom
        if new:
            keys = tuple(f"\0new-{i}" for i in range(len(new)))
            extra_dom = self.model.domain_inputs(CatalogView(self.catalog.domain, keys, tuple(new)), progress=False,
                                                 center_like=self.dom)
            dom = _concat(self.dom, extra_dom)
        return self.score_ids(ids, dom), ids

    def recommend_many(self, histories: list[list[HistoryItem]], k: int = 10,
                       exclude_seen: bool = True) -> list[list[Recommendation]]:
        """Top-k catalog items for each history (batch scoring)."""
        if k < 1:
            raise ValueError("k must be >= 1")
        scores, ids = self.scores(histories)
        out = []
        for row, hist in zip(scores, ids):
            row = row.clone()
            if exclude_seen:
                seen = [i for i in hist if i < len(self.catalog)]
                if seen:
                    row[torch.tensor(seen)] = float("-inf")
            top = torch.topk(row, min(k, int(torch.isfinite(row).sum())))
            out.append([Recommendation(rank=r + 1, key=self.catalog.item_keys[i], title=self.catalog.items[i].title,
                                       score=float(s)) for r, (s, i) in enumerate(zip(top.values.tolist(),
                                                                                     top.indices.tolist()))])
        return out

    def recommend(self, history: list[HistoryItem], k: int = 10, exclude_seen: bool = True) -> list[Recommendation]:
        """Top-k catalog items for one history (item keys or raw item texts, oldest first)."""
        return self.recommend_many([history], k, exclude_seen)[0]

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, domain_dir: str | Path, split: str = "test", *, max_users: int | None = None,
                 seed: int = 0, seen_items: str = "exclude") -> dict[str, float]:
        """Full-ranking Recall@k / NDCG@k on a domain folder's `val` or `test` split: the same code (and so
        the same numbers for the same model, split, max_users, seed and seen-items protocol) as the pipeline's
        evaluation. `seen_items`: "exclude" (a user's history is not ranked, as `recommend` serves it) or
        "rank"."""
        from common.protocol.messages import MIN_USERS_FOR_METRICS
        from common.model.train import evaluate_split

        if split not in ("val", "test"):
            raise ValueError("split must be 'val' or 'test'")
        silo = load_silo(domain_dir, min_users=MIN_USERS_FOR_METRICS)
        if seen_items not in ("exclude", "rank"):
            raise ValueError("seen_items must be 'exclude' or 'rank'")
        return evaluate_split(self.model, silo, self.model.domain_inputs(silo.catalog), split,
                              max_users=max_users, seed=seed, seen_items=seen_items)
