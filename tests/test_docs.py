"""The README and the docs pages: every relative link names a file or folder of the repository,
and the README stays readable (no line over 200 characters)."""

import os
import re

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", "benchmarks/results/README.md"] + sorted(
    f"docs/{name}" for name in os.listdir(os.path.join(REPO_ROOT, "docs")) if name.endswith(".md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def relative_links(page: str) -> list[str]:
    text = open(os.path.join(REPO_ROOT, page), encoding="utf-8").read()
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


def heading_anchors(path: str) -> set[str]:
    """GitHub's anchors: headings lower-cased, punctuation dropped, spaces as hyphens."""
    anchors = set()
    for line in open(path, encoding="utf-8"):
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("page", PAGES)
def test_links_resolve(page):
    missing = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(REPO_ROOT, os.path.dirname(page), path)) if path else \
            os.path.join(REPO_ROOT, page)
        if not os.path.exists(full) or (anchor and full.endswith(".md") and anchor not in heading_anchors(full)):
            missing.append(target)
    assert missing == [], f"{page} links to what is not there: {missing}"


def test_readme_lines_are_short():
    long_lines = [n for n, line in enumerate(open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8"), 1)
                  if len(line.rstrip("\n")) > 200]
    assert long_lines == []
