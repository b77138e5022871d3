"""Cells and tables of the report: a percentage cell, and one table as Markdown and HTML at once."""

from __future__ import annotations

import html


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def grid(header: list[str], rows: list[list[str]]) -> tuple[str, str]:
    md = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    md += "".join("| " + " | ".join(r) + " |\n" for r in rows)
    h = "<table><tr>" + "".join(f"<th>{html.escape(x)}</th>" for x in header) + "</tr>"
    h += "".join("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in r) + "</tr>" for r in rows) + "</table>"
    return md, h
