"""Plain-text / Markdown tables for metrics (used by the CLI, benchmarks and the server's report)."""

from __future__ import annotations

import json
from pathlib import Path

from common.core.files import atomic_write


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


def write_results(out: Path, doc: dict, markdown: str) -> None:
    """A benchmark's results: `doc` as `out` (JSON) and `markdown` beside it (`out` with suffix .md)."""
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
