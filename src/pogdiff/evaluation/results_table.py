"""The paper's results table (Tables 1-2, 6): one row per method, one column per metric and split (All, Few).

``pogdiff evaluate`` prints it and puts it in report.html; ``pogdiff benchmark`` writes it
with intervals over seeds. Each passes the metrics of every method, ``{label: {"all":
{metric: value}, "few": {...}}}``, and how to write one value.
"""

from __future__ import annotations

import html
from typing import Any, Callable

SPLITS = {"all": "All", "few": "Few"}


def all_few_columns(methods: dict[str, dict]) -> list[tuple[str, str]]:
    """(metric, split) of every column: each metric any method has, All then Few."""
    keys = dict.fromkeys(k for result in methods.values() for split in SPLITS for k in result[split])
    return [(key, split) for key in keys for split in SPLITS]


def all_few_table(methods: dict[str, dict], format_value: Callable[[Any], str]) -> tuple[list[str], list[list[str]]]:
    """Header ("method", "fd All", "fd Few", ...) and one row of formatted values per method."""
    columns = all_few_columns(methods)
    header = ["method"] + [f"{key} {SPLITS[split]}" for key, split in columns]
    rows = [[label] + [format_value(result[split].get(key)) for key, split in columns]
            for label, result in methods.items()]
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def format_value(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def feature_spaces_text(spaces: dict[str, str]) -> str:
    """Where the metrics were measured, in words, from metrics.json's ``feature_spaces``."""
    if spaces["fd"] == spaces["sim"]:
        return f"fd, sim and recall in {spaces['fd']} features"
    return f"fd in {spaces['fd']} features, sim and recall in {spaces['sim']} features"
