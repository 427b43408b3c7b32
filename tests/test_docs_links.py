"""README.md and docs/*.md: every relative markdown link outside code reaches an existing file or
folder, and every #anchor in it names a heading of the page it points to (GitHub's heading slugs).
"""

import re
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

import pytest

from tests import REPO

EXTERNAL = ("http://", "https://", "mailto:")
FENCE_OPENING = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$")
# [text](target) or ![alt](target), with an optional "title"; the text may run over lines.
LINK = re.compile(r"!?\[([^\]]*)\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)


def pages() -> list[Path]:
    """The markdown files whose links are checked: README.md and docs/*.md."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def without_code_blocks(text: str) -> str:
    """The text with the lines of fenced code blocks blanked, line numbers kept."""
    lines, fence = [], None
    for line in text.split("\n"):
        opening = FENCE_OPENING.match(line)
        if fence is None and opening:
            fence = opening.group(1)
            lines.append("")
        elif fence is not None:
            stripped = line.strip()
            if stripped and set(stripped) == {fence[0]} and len(stripped) >= len(fence):
                fence = None
            lines.append("")
        else:
            lines.append(line)
    return "\n".join(lines)


def without_code(text: str) -> str:
    """The text with fenced code blocks and inline code spans blanked, line numbers kept."""

    def blank(span: re.Match) -> str:
        return re.sub(r"[^\n]", " ", span.group(0))

    return INLINE_CODE.sub(blank, without_code_blocks(text))


def heading_slug(heading: str) -> str:
    """GitHub's anchor of a heading: a link counts as its text; lowercase; every character but
    letters, digits, spaces, hyphens and underscores removed; spaces become hyphens."""
    text = LINK.sub(r"\1", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's ATX headings; a repeated slug gets -1, -2, ... as on GitHub."""
    seen: Counter[str] = Counter()
    found = set()
    for line in without_code_blocks(page.read_text(encoding="utf-8")).split("\n"):
        heading = HEADING.match(line)
        if heading:
            slug = heading_slug(heading.group(1))
            found.add(slug if seen[slug] == 0 else f"{slug}-{seen[slug]}")
            seen[slug] += 1
    return found


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every inline link or image outside code."""
    prose = without_code(text)
    return [(prose.count("\n", 0, m.start()) + 1, m.group(2)) for m in LINK.finditer(prose)]


def shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def broken_links(page: Path) -> list[str]:
    """One line per broken relative link of the page: the file and line, the link, what is wrong."""
    problems = []
    for line, target in links(page.read_text(encoding="utf-8")):
        if target.startswith(EXTERNAL):
            continue
        path, _, anchor = target.partition("#")
        destination = (page.parent / unquote(path)).resolve() if path else page
        where = f"{shown(page)}:{line}: link ({target})"
        if not destination.exists():
            problems.append(f"{where}: {shown(destination)} does not exist")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            problems.append(f"{where}: {shown(destination)} has no heading with anchor #{anchor}")
    return problems


@pytest.mark.parametrize("page", pages(), ids=shown)
def test_every_relative_link_reaches_an_existing_file_and_heading(page):
    problems = broken_links(page)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_checker_reports_a_missing_file_and_a_missing_anchor_and_nothing_else(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other\n\n## Same `code`\n\n## Same code\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# A page\n\n"
        "[good](other.md#same-code-1), [this page](#a-page), [folder](../docs/),\n"
        "[web](https://example.com/missing.md) and [a link over\nlines](other.md#other).\n"
        "[gone](missing.md)\n\n"
        "```bash\n[in a code block](nowhere.md)\n```\n\n"
        "`[in inline code](nowhere.md)`\n\n"
        "[bad anchor](other.md#no-such-heading)\n",
    )
    problems = broken_links(page)
    assert len(problems) == 2, problems
    assert "page.md:6: link (missing.md)" in problems[0] and "does not exist" in problems[0]
    assert "page.md:14: link (other.md#no-such-heading)" in problems[1]
    assert "has no heading with anchor #no-such-heading" in problems[1]


def test_heading_slugs_follow_github():
    assert heading_slug("Reproducing the paper's claims") == "reproducing-the-papers-claims"
    assert heading_slug("The train step ([contrastive/step.py](x.py))") == (
        "the-train-step-contrastivesteppy"
    )
    assert heading_slug("Optimizer (`config.optim`)") == "optimizer-configoptim"
    assert heading_slug("2,000 steps") == "2000-steps"
    assert heading_slug("Against big_vision's own step") == "against-big_visions-own-step"
