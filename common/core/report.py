"""Plain-text / Markdown tables for metrics (used by the CLI, benchmarks and the server's report)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from common.core.files import atomic_write

ROOT = Path(__file__).resolve().parents[2]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub Markdown table of `rows` restricted to `columns` (missing cells are blank)."""
    head = "| " + " | ".join(columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def code_version(root: Path = ROOT) -> str:
    """The commit the code ran at (short hash, "+changes" when tracked files other than result files under
    benchmarks/results/ differ from it: a driver rewriting its own result file mid-run is no code change), or
    "unknown"."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    # porcelain v1: two status letters, a space, the path (keep each line's leading space: no strip())
    code = [line for line in dirty.splitlines() if line and not line[3:].startswith("benchmarks/results/")]
    return head + ("+changes" if code else "")


def relative_paths(value, root: Path = ROOT):
    """`value` with every absolute path string made relative to the project root (results travel between
    machines: no result file holds a path of the machine it ran on)."""
    if isinstance(value, dict):
        return {k: relative_paths(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [relative_paths(v, root) for v in value]
    if isinstance(value, str) and os.path.isabs(value) and "\n" not in value:
        return os.path.relpath(value, root)
    return value


def write_results(out: Path, doc: dict, markdown: str) -> None:
    """A benchmark's results: `doc` as `out` (JSON, with the commit of the code that produced it and only
    relative paths) and `markdown` beside it (`out` with suffix .md)."""
    doc = relative_paths({**doc, "commit": code_version()})
    atomic_write(out, json.dumps(doc, indent=1))
    atomic_write(out.with_suffix(".md"), markdown if markdown.endswith("\n") else markdown + "\n")


def results_page(title: str, command: str, rows: list[dict], columns: list[str]) -> str:
    """A titled results page: the command that produced it, then the table."""
    return f"# {title}\n\nCommand: `{command}`\n\n{markdown_table(rows, columns)}\n"


def write_table_results(out: Path, doc: dict, title: str, columns: list[str] | None = None) -> str:
    """A one-table benchmark's results: `doc` (with its "command" and "rows") as `out` and its results page
    beside it (columns: the first row's keys unless given). Returns the page. Call it after every row of a
    long run, so that a run that dies keeps what it measured."""
    rows = doc["rows"]
    page = results_page(title, doc["command"], rows, columns or list(rows[0]))
    write_results(out, doc, page)
    return page
