"""The documentation: a short front page, pages by topic in docs/, nothing lost
from the README they came from, and no link or anchor between them that leads
nowhere (GitHub's rules for heading anchors)."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

from conftest import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))

# The headings of README.md before it was split into docs/ (issue 26, at
# b321f8f): each must still be a heading somewhere in docs/, so nothing was
# dropped on the way. The first is the project's name, the README's title.
HEADINGS_BEFORE_THE_SPLIT = [
    "dask-ec2-ansible",
    "Quick start",
    "Try the AWS flow without an account",
    "Networks that intercept TLS",
    "Settings",
    "The aws provider",
    "Credentials",
    "What it creates",
    "When EC2 says no",
    "Costs, status and clean-up",
    "The two inventories",
    "What the tests prove, and what they don't",
    "Jupyter Lab",
    "Working on the cluster",
    "Connect from Python on this machine",
    "Nothing you made is lost",
    "Files in and out: `playbooks/sync.yml`",
    "Run a script on the cluster: `playbooks/run.yml`",
    "A shell and a tunnel: `make ssh`, `make tunnel`",
    "Only SSH open: `make tunnel` for the rest",
    "The geospatial notebook",
    "What you get",
    "Security defaults",
    "What happens when…",
    "How it is put together",
    "Operating systems",
    "Baked images",
    "Performance",
    "Role tests (Molecule)",
    "Development",
    "Known limits of this version",
]


def outside_code(text: str) -> list[str]:
    """The lines of a Markdown text that are not inside a fenced code block."""
    lines, fence = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if not fence:
            lines.append(line)
    return lines


def headings(text: str) -> list[tuple[int, str]]:
    return [(len(m.group(1)), m.group(2).strip())
            for m in (re.match(r"(#{1,6}) (.*)", line) for line in outside_code(text)) if m]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation removed
    (letters, digits, '-', '_' and spaces stay), each space a '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    kept = "".join(c for c in text if c in "-_ " or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor of a page; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for _, heading in headings(text):
        base = slug(heading)
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return out


def links(text: str) -> list[str]:
    """The targets of the Markdown links and images of a text, outside code."""
    prose = re.sub(r"`[^`]*`", "", "\n".join(outside_code(text)))
    return re.findall(r"\]\(([^)\s]+)\)", prose)


def test_slug_follows_githubs_rules():
    assert slug("What happens when…") == "what-happens-when"
    assert slug("A shell and a tunnel: `make ssh`, `make tunnel`") == "a-shell-and-a-tunnel-make-ssh-make-tunnel"
    assert slug("Files in and out: `playbooks/sync.yml`") == "files-in-and-out-playbookssyncyml"
    assert slug("What the tests prove, and what they don't") == "what-the-tests-prove-and-what-they-dont"
    assert anchors("# A\n## Settings\n```\n# not a heading\n```\n### Settings\n") == {"a", "settings", "settings-1"}


def test_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move the detail into docs/"
    assert lines[0] == "# dask-ec2-ansible"
    linked = {Path(target.split("#")[0]).name for target in links(README.read_text()) if target.startswith("docs/")}
    unlinked = {page.name for page in PAGES} - linked
    assert not unlinked, f"docs pages the README does not link to: {sorted(unlinked)}"


def test_every_heading_of_the_old_readme_is_in_docs():
    found = {heading for page in PAGES for _, heading in headings(page.read_text())}
    missing = [h for h in HEADINGS_BEFORE_THE_SPLIT[1:] if h not in found]
    assert not missing, f"headings of the README before the split found nowhere in docs/: {missing}"


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_dead_link_or_anchor(page):
    text = page.read_text()
    dead = []
    for target in links(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not ours to check
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            dead.append(f"{target} (no file {resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else resolved})")
        elif anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved.read_text())):
            dead.append(f"{target} (no heading with anchor #{anchor} in {resolved.name})")
    assert not dead, f"dead links in {page.relative_to(ROOT)}: {dead}"


def test_link_checker_finds_dead_links(tmp_path):
    """The check above can fail: a missing file and a missing anchor are both found."""
    (tmp_path / "a.md").write_text("# A\n\n## Here\n\n[ok](#here) [gone](b.md) [no anchor](a.md#there) `[code](x.md)`\n")
    text = (tmp_path / "a.md").read_text()
    assert links(text) == ["#here", "b.md", "a.md#there"]
    assert "there" not in anchors(text) and "here" in anchors(text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_opens_with_what_it_is_for_and_its_contents(page):
    lines = page.read_text().splitlines()
    assert lines[0].startswith("# "), f"{page.name}: the first line is the page's title"
    assert lines[1] == "" and lines[2].strip() and not lines[2].startswith(("#", "-", "|", "```")), \
        f"{page.name}: the title is followed by a paragraph saying what a reader can do with the page"
    text = page.read_text()
    sections = [(level, h) for level, h in headings(text) if level in (2, 3)]
    assert len(lines) <= 40 or len(sections) >= 2, f"{page.name}: a page this long needs sections and their contents"
    toc = [line for line in lines if re.match(r"\s*- \[[^\]]*\]\(#[^)]*\)$", line)]
    expected = ["  " * (level - 2) + f"- [{h.replace('[', '').replace(']', '')}](#{slug(h)})" for level, h in sections]
    assert toc == expected, f"{page.name}: its contents list should read:\n" + "\n".join(expected)
