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


def test_code_version_ignores_result_files_only(tmp_path):
    """A driver rewriting its own result file mid-run is not a code change; any other tracked edit is."""
    import subprocess

    from common.core.report import code_version

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "x.json").write_text("{}")
    (tmp_path / "code.py").write_text("a = 1\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    clean = code_version(tmp_path)
    assert len(clean) == 12 and "+" not in clean
    (tmp_path / "benchmarks" / "results" / "x.json").write_text('{"a": 1}')
    assert code_version(tmp_path) == clean
    (tmp_path / "code.py").write_text("a = 2\n")
    assert code_version(tmp_path) == clean + "+changes"
