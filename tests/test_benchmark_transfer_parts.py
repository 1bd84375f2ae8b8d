"""benchmarks/transfer_parts.py on demo data: a state that differs from the base only in its blocks must score
like the base once its blocks are reset, and like itself when only its blocks are taken."""

from __future__ import annotations

import pytest

import json

import torch
from safetensors.torch import save_file

from benchmarks import transfer_parts
from common.model.backbones import build_backbone, shared_state
from common.model.config import BackboneConfig
from common.data.demo import make_domain

pytestmark = pytest.mark.slow  # more than a few seconds on 2 cores: not in `make test-fast`


def test_part_swaps_recover_the_base_and_the_tuned_model(tmp_path):
    make_domain(tmp_path / "data", "garden", seed=0)
    backbone = f"cache_dir={tmp_path / 'cache'}"
    base = shared_state(build_backbone(BackboneConfig(cache_dir=tmp_path / "cache"), seed=0))
    gen = torch.Generator().manual_seed(1)
    tuned = {k: v + 0.5 * torch.randn(v.shape, generator=gen) if k.startswith("blocks") else v for k, v in base.items()}
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    out = tmp_path / "t.json"
    assert transfer_parts.main(["--finetuned", str(tmp_path / "tuned.safetensors"), "--source", "garden",
                                "--domains", "garden", "--data-root", str(tmp_path / "data"), "--backbone", backbone,
                                "--users", "0", "--out", str(out)]) == 0
    rows = {r["model"]: (r["recall@10"], r["ndcg@10"]) for r in json.loads(out.read_text())["rows"]}
    # base, fine-tuned, and two rows per part (adaptor, adaptor_mlp: the item MLP residual, blocks, position)
    assert len(rows) == 2 + 2 * 4
    assert rows["fine-tuned, blocks reset"] == rows["base"] == rows["base + fine-tuned adaptor"]
    assert rows["base + fine-tuned blocks"] == rows["fine-tuned"] == rows["fine-tuned, position reset"]
    assert rows["fine-tuned"] != rows["base"]  # the perturbation is large enough to change the ranking
