"""Markdown for reports that UIs render (Prefect artifacts, MLflow): values are text, never markup.

A `|` in a value splits its table cell, `<unk>` is swallowed as an HTML tag and `*`/`_` turn into emphasis, so
every value is escaped. Table cells are cut to a width so a table fits the page; long text goes in a list.
"""

from __future__ import annotations

import re

MARKUP = re.compile(r"([\\`*\[\]|~])|(?<!\w)_|_(?!\w)")  # intraword _ (val_mel_loss) is no emphasis
HTML = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
CELL_WIDTH = 48


def escape(value) -> str:
    """One line of plain text that renders as itself."""
    text = " ".join(str(value).split())
    text = "".join(HTML.get(ch, ch) for ch in text)
    return MARKUP.sub(lambda m: "\\" + m.group(0), text)


def shorten(value, width: int = CELL_WIDTH) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= width else text[:width - 1] + "…"


def table(header: list[str], rows: list[list], width: int = CELL_WIDTH) -> str:
    """A GFM table of escaped cells, each cut to `width` characters."""
    lines = ["| " + " | ".join(escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(escape(shorten(c, width)) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def bullets(items: list[tuple[str, str]]) -> str:
    """`- **name**: text` per item, both escaped: where long text goes instead of a table column."""
    return "".join(f"- **{escape(name)}**: {escape(text)}\n" for name, text in items)
