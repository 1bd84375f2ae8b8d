"""Plain-text / Markdown tables for metrics (used by the CLI, benchmarks and the server's report)."""

from __future__ import annotations


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
