"""A model as a folder, Hugging Face style: `config.json`, `model.safetensors` (with metadata), `README.md`.

`config.json` (a `ModelConfig`) says how to rebuild the network: the backbone configuration, the seed the
base was built with, the base model's fingerprint and the fingerprint of the weights. The safetensors file
carries the same configuration in its metadata, so a lone weights file (e.g. a silo's fine-tuned model)
can be loaded too. `README.md` is the model card (written by the server, see server/artifacts.py).

`load_weights(spec)` accepts:
- a model folder written by `save_model_folder` (`config.json` + `model.safetensors`), or by an older
  version (`model_card.json` + `merged.safetensors`);
- a `.safetensors` file whose metadata holds the configuration (`mergerec_config`);
- `base:init` / `base:bundled` / `base:<file>`: the shared base model itself, with default settings.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field
from safetensors import safe_open
from safetensors.torch import save_file

from common.core.strict import Strict
from common.model.config import BackboneConfig, Seed
from common.core.files import atomic_path, atomic_write

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
LEGACY_CARD = "model_card.json"  # older runs: model_card.json + merged.safetensors
META_KEY = "mergerec_config"
FORMAT = "mergerec-model"


class ModelFolderError(ValueError):
    """A model folder or weights file that cannot be used; the message names the path."""


class ModelConfig(Strict):
    """What `config.json` holds (and the weights file's metadata repeats)."""

    format: str = FORMAT
    version: int = 1
    backbone: BackboneConfig
    seed: Seed = 0
    base_fingerprint: str = ""
    fingerprint: str = Field("", description="SHA-256 fingerprint of the weights (common.merging.task_vectors)")
    method: str = Field("", description="how the weights were made, e.g. mergerec-layer, finetuned-<domain>")
    domains: list[str] = Field(default_factory=list)


def save_model_folder(out_dir: str | Path, state: dict[str, torch.Tensor], config: ModelConfig,
                      card: str | None = None) -> Path:
    """Write config.json, model.safetensors (config in its metadata) and, if given, README.md. Returns out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file({n: t.detach().cpu().contiguous() for n, t in state.items()}, str(tmp),
                  metadata=weights_metadata(config))
    atomic_write(out / CONFIG_FILE, config.model_dump_json(indent=1) + "\n")
    if card is not None:
        atomic_write(out / CARD_FILE, card)
    return out


def weights_metadata(config: ModelConfig) -> dict[str, str]:
    """safetensors metadata that makes a lone weights file loadable by `load_weights`."""
    return {"format": "pt", META_KEY: config.model_dump_json()}


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; a damaged file, or weights holding NaN / Inf (a model that
    would score every item NaN), are a ModelFolderError naming the file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            state, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # a damaged or foreign file: say which
        raise ModelFolderError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    bad = [n for n, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise ModelFolderError(f"{path}: weights {bad[0]!r}{more} hold NaN or Inf values; refusing this model")
    return state, meta


def _parse_config(text: str, where: str) -> ModelConfig:
    try:
        cfg = ModelConfig.model_validate_json(text)
    except ValueError as exc:
        raise ModelFolderError(f"{where}: not a valid model configuration ({str(exc).splitlines()[0]})") from None
    if cfg.format != FORMAT:
        raise ModelFolderError(f"{where}: format {cfg.format!r}, expected {FORMAT!r}")
    return cfg


def _legacy_folder(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A model folder written before this format: model_card.json + merged.safetensors."""
    import json

    try:
        card = json.loads((path / LEGACY_CARD).read_text())
        cfg = ModelConfig(backbone=BackboneConfig(**card["backbone"]), seed=card.get("seed", 0),
                          base_fingerprint=card.get("base_fingerprint", ""),
                          fingerprint=card.get("merged_fingerprint", ""), method=card.get("method", ""),
                          domains=card.get("domains", []))
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelFolderError(f"{path / LEGACY_CARD}: not a readable model card ({type(exc).__name__})") from None
    state, _ = _read_safetensors(path / "merged.safetensors")
    return cfg, state


def load_weights(spec: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor] | None]:
    """(configuration, weights) of a model folder or weights file; weights None for `base:...` (the base as
    built from its configuration)."""
    text = str(spec)
    if text.startswith("base:"):
        return ModelConfig(backbone=BackboneConfig(base=text.removeprefix("base:") or "init")), None
    path = Path(spec)
    if path.is_dir() and not (path / CONFIG_FILE).exists() and (path / LEGACY_CARD).is_file():
        return _legacy_folder(path)
    if path.is_dir():
        cfg_path, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
        for p in (cfg_path, weights):
            if not p.is_file():
                raise ModelFolderError(f"{path}: not a model folder ({p.name} is missing)")
        cfg = _parse_config(cfg_path.read_text(), str(cfg_path))
        state, _ = _read_safetensors(weights)
        return cfg, state
    if path.is_file() and path.suffix == ".safetensors":
        state, meta = _read_safetensors(path)
        if META_KEY not in meta:
            raise ModelFolderError(f"{path}: its metadata has no {META_KEY!r}; pass the model folder instead")
        return _parse_config(meta[META_KEY], f"{path} (metadata)"), state
    raise ModelFolderError(f"{path}: no such model folder or .safetensors file")

