"""The README is read in two minutes and leads to docs/; every page there is reachable and every link lands."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def links(path: Path) -> list[str]:
    return [t for t in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()) if "://" not in t]


def test_the_readme_is_short_and_links_every_page_of_docs():
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= 100
    linked = {(ROOT / t).resolve() for t in links(readme)}
    pages = {p.resolve() for p in (ROOT / "docs").glob("*.md")}
    assert pages and pages <= linked, f"not linked from README: {sorted(p.name for p in pages - linked)}"


def test_every_relative_link_in_the_docs_lands():
    broken = [(p.name, t) for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
              for t in links(p) if not (p.parent / t).exists()]
    assert broken == []
