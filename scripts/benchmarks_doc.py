"""Replace one section of docs/benchmarks.md with a benchmark script's output (``--write``)."""

from __future__ import annotations

import re
from pathlib import Path

from cellgap.atomic import atomic_write_text

BENCHMARKS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def write_section(section: str, text: str, path: Path = BENCHMARKS) -> None:
    """Replace the body of ``## <section>`` (appended when missing), re-reading the file just before writing."""
    doc = path.read_text(encoding="utf-8")
    pattern = re.compile(rf"(^## {re.escape(section)}\n)(.*?)(?=^## |\Z)", re.S | re.M)
    if not pattern.search(doc):
        doc = doc.rstrip("\n") + f"\n\n## {section}\n"
    doc = pattern.sub(lambda m: m.group(1) + "\n" + text + "\n\n", doc, count=1)
    atomic_write_text(path, doc.rstrip("\n") + "\n")
