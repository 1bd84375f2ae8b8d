"""Check what a finished MergeRec run left in its run directory (used by `make e2e` / `make e2e-containers`).

    python -m deployment.check_artifacts RUN_DIR --domains garden,kitchen,outdoor

Passes when report.json names every expected domain as active (none dropped), holds metrics for every
domain with values in [0, 1] including at least one learned MergeRec merge, and the merged model file and
one task vector per domain exist and are not empty. Prints a one-line summary per domain.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def check(run_dir: Path, domains: list[str]) -> list[str]:
    """Problems found (empty = all good)."""
    run_dir = Path(run_dir)
    problems: list[str] = []
    report_path = run_dir / "report.json"
    if not report_path.is_file():
        return [f"{report_path} is missing"]
    try:
        report = json.loads(report_path.read_text())
    except json.JSONDecodeError as exc:
        return [f"{report_path} is not JSON: {exc}"]
    active = sorted(report.get("active", []))
    if active != sorted(domains):
        problems.append(f"active domains {active} != expected {sorted(domains)}")
    if report.get("dropped"):
        problems.append(f"dropped silos: {report['dropped']}")
    metrics = report.get("metrics", {})
    for d in domains:
        per_method = metrics.get(d)
        if not per_method:
            problems.append(f"no metrics for {d}")
            continue
        if not any(m.startswith("mergerec") for m in per_method):
            problems.append(f"{d}: no MergeRec result among {sorted(per_method)}")
        for method, entry in per_method.items():
            values = entry.get("values", {}) if isinstance(entry, dict) else {}
            if not values:
                problems.append(f"{d}/{method}: no metric values")
            for k, v in values.items():
                if not (isinstance(v, (int, float)) and math.isfinite(v) and 0.0 <= v <= 1.0):
                    problems.append(f"{d}/{method}/{k} = {v!r} is not in [0, 1]")
        if not (run_dir / "task_vectors" / f"{d}.safetensors").is_file():
            problems.append(f"task vector of {d} missing")
    for name in ("model.safetensors", "config.json", "README.md"):
        path = run_dir / "model" / name
        if not (path.is_file() and path.stat().st_size > 0):
            problems.append(f"{path} missing or empty")
    for name in ("report.md", "plots/recall_at_10.png"):
        if not (run_dir / name).is_file():
            problems.append(f"{run_dir / name} missing")
    return problems


def summary(run_dir: Path) -> str:
    report = json.loads((Path(run_dir) / "report.json").read_text())
    lines = []
    for d, per_method in sorted(report.get("metrics", {}).items()):
        best = {m: e.get("values", {}).get("ndcg@10") for m, e in per_method.items() if m.startswith("mergerec")}
        lines.append(f"{d}: " + ", ".join(f"{m} ndcg@10={v:.4f}" for m, v in sorted(best.items()) if v is not None))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deployment.check_artifacts")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--domains", required=True, help="comma list of domains that must be in the report")
    a = p.parse_args(argv)
    domains = [d.strip() for d in a.domains.split(",") if d.strip()]
    problems = check(a.run_dir, domains)
    if problems:
        print("artifact check FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(summary(a.run_dir))
    print(f"artifact check OK: {a.run_dir} ({len(domains)} domains)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
