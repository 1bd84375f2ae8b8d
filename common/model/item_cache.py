"""Frozen item-text embeddings, computed once per (encoder, catalog) and cached on disk.

Key = sha256(encoder fingerprint, catalog content fingerprint, text settings, and the encoding precision when it
is not float32). The file is a safetensors
tensor [N, H] (L2-normalised, float32) written atomically, so a crash never leaves a half file behind.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.data.format import CatalogView
from common.core.files import atomic_path
from common.model.encoder import encode_texts, encoder_fingerprint, load_encoder, load_tokenizer, resolve_precision
from common.data.text import catalog_texts

log = logging.getLogger(__name__)


def cache_key(catalog: CatalogView, encoder: str, value_tokens: int, max_tokens: int,
              precision: str = "float32") -> str:
    """`precision` resolved ("float32" | "bfloat16"); float32 keeps the key files written before it existed."""
    h = hashlib.sha256()
    parts = [encoder_fingerprint(encoder), catalog.fingerprint(), str(value_tokens), str(max_tokens)]
    if precision != "float32":
        parts.append(precision)
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def item_text_embeddings(
    catalog: CatalogView,
    *,
    encoder: str = "minilm",
    value_tokens: int = 32,
    max_tokens: int = 128,
    cache_dir: str | Path | None = ".cache/item_embeddings",
    device: str | torch.device = "cpu",
    precision: str = "auto",
    progress: bool = True,
) -> torch.Tensor:
    """[N, H] frozen pretrained embeddings of the catalog's item texts (row = item id), float32.
    `precision`: the encoder's ("auto" | "float32" | "bfloat16", common.model.encoder.resolve_precision)."""
    path = None
    precision = resolve_precision(precision, device)
    if cache_dir is not None:
        key = cache_key(catalog, encoder, value_tokens, max_tokens, precision)
        path = Path(cache_dir) / f"{catalog.domain}-{key}.safetensors"
        if path.exists():
            emb = load_file(str(path))["embeddings"]
            if emb.shape[0] == len(catalog):
                return emb
            log.warning("ignoring cache file %s with %d rows for %d items", path, emb.shape[0], len(catalog))
    tok = load_tokenizer(encoder)
    texts = catalog_texts(catalog, tok, value_tokens)
    enc = load_encoder(encoder).to(device)
    emb = encode_texts(enc, tok, texts, max_length=max_tokens, device=device, precision=precision, progress=progress,
                       desc=f"item texts {catalog.domain}")
    if path is not None:
        with atomic_path(path) as tmp:
            save_file({"embeddings": emb.contiguous()}, str(tmp))
    return emb
