"""Every relative link in the README, docs/ and bench/README.md points to a file of the repository, and
so does every repository path these documents quote in a code span (e.g. a results file)."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "bench" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# [text](target) and ![alt](target), an optional "title" after the target; [name]: target definitions
INLINE = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
# a quoted path of a tracked file: a top-level folder of the repository (or bench's results/), no
# placeholder or wildcard, ending in a file extension
QUOTED = re.compile(r"`((?:bench|docs|hetclip|data|zero_shot|configs|tests|results)/[\w./-]*\.[a-z]{2,4})`")


def relative_links(text: str) -> list[str]:
    """Link targets of a markdown text that name a local file: no scheme, not a bare #anchor; code
    blocks and code spans are not links."""
    text = FENCE.sub("", text)
    text = re.sub(r"`[^`\n]*`", "", text)
    targets = INLINE.findall(text) + DEFINITION.findall(text)
    return [t.split("#", 1)[0] for t in targets
            if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", t) and not t.startswith("#")]


def test_relative_links_are_found_and_code_is_skipped():
    text = ("See [the design](docs/A.md#math), ![fig](R.png \"a figure\"), [web](https://x.org/a.md), [top](#top)\n"
            "and `[not](a link)`.\n```\n[nor](this.md)\n```\n[ref]: ../elsewhere/NOTES.md\n")
    assert relative_links(text) == ["docs/A.md", "R.png", "../elsewhere/NOTES.md"]


def quoted_paths(text: str) -> list[str]:
    """Repository paths quoted in code spans outside code blocks."""
    return QUOTED.findall(FENCE.sub("", text))


def test_quoted_paths_are_found():
    text = "Sources: `bench/results/a.md` and `results/b.json`, not `bench/results/profile_*` nor `<out>.md`.\n"
    assert quoted_paths(text) == ["bench/results/a.md", "results/b.json"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(doc):
    missing = [t for t in relative_links(doc.read_text(encoding="utf-8")) if not (doc.parent / t).exists()]
    assert not missing, f"{doc.relative_to(REPO)} links to missing files: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_quoted_repository_path_exists(doc):
    """Paths are relative to the repository root or to the document's folder."""
    missing = [t for t in quoted_paths(doc.read_text(encoding="utf-8"))
               if not (REPO / t).exists() and not (doc.parent / t).exists()]
    assert not missing, f"{doc.relative_to(REPO)} quotes missing files: {missing}"
