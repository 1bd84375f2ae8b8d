"""benchmarks/encoder_precision.py on demo data: float32 at batch 32 is the reference (cosine 1); the other
settings are measured against it."""

from __future__ import annotations

import json

from benchmarks import encoder_precision
from common.data.demo import make_domain


def test_encoder_precision_writes_every_row(tmp_path):
    make_domain(tmp_path / "data", "garden", seed=0)
    out = tmp_path / "q.json"
    assert encoder_precision.main(["--data-root", str(tmp_path / "data"), "--domain", "garden", "--items", "24",
                                   "--out", str(out)]) == 0
    rows = {r["encoder"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["float32, batch 32", "float32, batch 128", "bfloat16 autocast, batch 32",
                          "bfloat16 autocast, batch 128", "int8 dynamic, batch 32"]
    assert rows["float32, batch 32"]["cos_to_fp32_min"] > 0.9999 and rows["float32, batch 32"]["items"] == 24
    assert rows["float32, batch 128"]["cos_to_fp32_min"] > 0.9999  # padding does not change an embedding
    assert rows["bfloat16 autocast, batch 32"]["cos_to_fp32_min"] > 0.999
    assert 0.5 < rows["int8 dynamic, batch 32"]["cos_to_fp32_mean"] < 1.0  # quantisation moves them, not far
    assert out.with_suffix(".md").read_text().startswith("# Item-text encoder")
