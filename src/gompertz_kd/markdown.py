"""Generated blocks inside hand-written Markdown: ``docs/benchmarks.md`` (``make bench``) and the
results pages (``python -m gompertz_kd.report --into``) keep their prose, and a rerun replaces only
the text between two marker comments. No imports beyond the standard library (the report runs
without torch)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["splice_block"]


def splice_block(path: str | os.PathLike, body: str, start: str, end: str, title: str = "") -> None:
    """Put ``body`` between the lines ``start`` and ``end`` in the Markdown file ``path``, leaving
    the text around them alone; without the markers, append them with the body (to a new file
    headed ``title`` when given). Written through a temporary file and a rename."""
    path = Path(path)
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else (f"# {title}\n\n" if title else "")
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)
