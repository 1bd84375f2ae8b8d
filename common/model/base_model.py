"""The shared base model as a file: a pretrained checkpoint every silo starts from.

`BackboneConfig.base` names the initial weights of the light backbone:

- ``"init"``: the seeded text-similarity initialisation (no training; the comparison point);
- ``"bundled"``: the checkpoint shipped with the code, ``common/assets/base_light.json``, made by
  ``python -m common.model.pretrain`` on public, non-silo domains (reproducible from the command in its card);
- a path to a ``.json`` base bundle or a ``.safetensors`` checkpoint written by ``python -m common.model.pretrain``.

A bundle is one JSON file (the Flower app bundle carries only .py/.toml/.md/.yaml/.json files, so the base
travels with the code to every SuperNode): ``{"format": "mergerec-base-v1", "card": {...}, "sha256": ...,
"safetensors_base64": ...}``. The weights' SHA-256 is checked on load; the state fingerprint that silos
compare at the handshake (`common.merging.task_vectors.fingerprint`) covers every weight byte, so a silo with a
different base file is refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load as st_load
from safetensors.torch import load_file, save as st_save

from common.core.files import atomic_write

BUNDLED = Path(__file__).resolve().parents[1] / "assets" / "base_light.json"
FORMAT = "mergerec-base-v1"
#: BackboneConfig fields that define the architecture a checkpoint was trained for
ARCH_FIELDS = ("kind", "encoder", "dim", "layers", "heads", "ff_mult", "max_items", "item_value_tokens",
               "item_max_tokens", "center_items")


class BaseFileError(ValueError):
    """A base checkpoint is missing, damaged, or made for another architecture. The message names the file."""


class BaseCard(BaseModel):
    """What a pretrained base is: enough to judge it and to rebuild it bit for bit."""

    model_config = ConfigDict(extra="allow")

    architecture: dict
    fingerprint: str
    data: list[dict] = []
    train: dict = {}
    epochs: int = 0
    best_epoch: int = 0
    refit_epochs: int = 0
    validation: dict = {}
    history: list[dict] = []
    seconds: float = 0.0
    command: str = ""


def _canonical(raw: bytes) -> bytes:
    """The same safetensors file with its JSON header written with sorted keys: safetensors emits the metadata
    dict in hash order, so two saves of equal tensors could differ in bytes. Data bytes and offsets are kept."""
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # keep the data 8-byte aligned, as safetensors does
    return len(header).to_bytes(8, "little") + header + raw[8 + n:]


def save_base(state: dict[str, torch.Tensor], card: BaseCard, out_dir: Path) -> tuple[Path, Path]:
    """Write ``out_dir/base.safetensors`` (card in its metadata), ``out_dir/card.json`` and the one-file bundle
    ``out_dir/base.json``. Returns (checkpoint, bundle)."""
    raw = _canonical(st_save({n: t.detach().cpu().contiguous() for n, t in sorted(state.items())},
                             metadata={"format": FORMAT, "fingerprint": card.fingerprint}))
    ckpt, bundle = out_dir / "base.safetensors", out_dir / "base.json"
    atomic_write(ckpt, raw)
    atomic_write(out_dir / "card.json", card.model_dump_json(indent=1).encode())
    doc = {"format": FORMAT, "card": card.model_dump(mode="json"), "sha256": hashlib.sha256(raw).hexdigest(),
           "safetensors_base64": base64.b64encode(raw).decode()}
    atomic_write(bundle, json.dumps(doc).encode())
    return ckpt, bundle


def resolve(spec: str) -> Path:
    """The file a `BackboneConfig.base` value names ("bundled" or a path)."""
    path = BUNDLED if spec == "bundled" else Path(spec).expanduser()
    if not path.is_file():
        hint = " (run `python -m common.model.pretrain` to make one)" if spec != "bundled" else ""
        raise BaseFileError(f"base checkpoint {path}: file not found{hint}")
    return path


def load_base(spec: str) -> tuple[dict[str, torch.Tensor], BaseCard | None]:
    """(state, card) of the base named by `spec`; BaseFileError naming the file when it cannot be used."""
    path = resolve(spec)
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
            side = path.with_name("card.json")
            card = BaseCard.model_validate_json(side.read_text()) if side.is_file() else None
            return state, card
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise BaseFileError(f"base checkpoint {path}: not a {FORMAT} bundle")
        raw = base64.b64decode(doc["safetensors_base64"], validate=True)
        if hashlib.sha256(raw).hexdigest() != doc["sha256"]:
            raise BaseFileError(f"base checkpoint {path}: weights do not match their SHA-256 (damaged or edited)")
        return st_load(raw), BaseCard.model_validate(doc["card"])
    except BaseFileError:
        raise
    except Exception as exc:  # JSON, base64, safetensors or pydantic errors: name the file
        raise BaseFileError(f"base checkpoint {path}: unreadable ({type(exc).__name__}: {exc})") from exc


def check_architecture(card: BaseCard | None, backbone, path: str) -> None:
    """Refuse a checkpoint trained for another architecture (a clear message, not a shape error)."""
    if card is None:
        return
    want = backbone.model_dump(mode="json", include=set(ARCH_FIELDS))
    # a field a card predates was at its default when the checkpoint was made
    have = {k: card.architecture.get(k, type(backbone).model_fields[k].default) for k in want}
    diff = {k: (have[k], v) for k, v in want.items() if have[k] != v}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in sorted(diff.items()))
        raise BaseFileError(f"base checkpoint {path} was made for another backbone ({detail})")
