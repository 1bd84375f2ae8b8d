"""benchmarks/encoder_quant.py on demo data: the fp32 row is the reference (cosine 1), the int8 row is measured."""

from __future__ import annotations

import json

from benchmarks import encoder_quant
from common.data.demo import make_domain


def test_encoder_quant_writes_both_rows(tmp_path):
    make_domain(tmp_path / "data", "garden", seed=0)
    out = tmp_path / "q.json"
    assert encoder_quant.main(["--data-root", str(tmp_path / "data"), "--domain", "garden", "--items", "24",
                               "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["encoder"] for r in rows] == ["fp32", "int8 dynamic"]
    assert rows[0]["cos_to_fp32_min"] > 0.9999 and rows[0]["items"] == 24
    assert 0.5 < rows[1]["cos_to_fp32_mean"] < 1.0  # quantisation moves the embeddings, but not far
    assert out.with_suffix(".md").read_text().startswith("# Item-text encoder")
