"""Small models for tests: a tiny BERT (random weights, MiniLM's tokenizer) saved to a folder."""

from __future__ import annotations

from pathlib import Path


def make_tiny_encoder(folder: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Write a 2-layer, 32-wide BERT with MiniLM's vocabulary to `folder`; returns the folder."""
    import torch
    from transformers import BertConfig, BertModel

    from common.model.encoder import load_tokenizer

    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    tok = load_tokenizer("minilm")
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=256)
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
