"""Benchmark result files: the commit of the code that made them, and no absolute path of the machine."""

import json

from common.core.report import ROOT, write_results


def test_result_files_record_the_commit_and_relative_paths(tmp_path):
    out = tmp_path / "r.json"
    write_results(out, {"data_root": str(ROOT.parent / "shared" / "data"), "rows": [{"run": str(ROOT / "runs" / "x")}],
                        "command": "python -m benchmarks.x --out /tmp/x.json"}, "# table")
    doc = json.loads(out.read_text())
    assert doc["data_root"] == "../shared/data" and doc["rows"][0]["run"] == "runs/x"
    assert doc["commit"] != "" and not doc["commit"].startswith("/")
    assert not any(v.startswith("/") for v in (doc["data_root"], doc["rows"][0]["run"]))
    assert out.with_suffix(".md").read_text() == "# table\n"
