"""The documentation holds together: every relative link in README.md and docs/*.md points to a file that exists (and,
with a #fragment into a markdown file, to a heading there), every docs page is reachable from the README, the README's
first screen has the two commands, and CI runs the README's test command verbatim."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
FIRST_SCREEN = 30  # lines

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)


def _prose(text: str) -> str:
    """The text with fenced code blocks removed (their lines kept blank)."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def links(path: Path) -> list[str]:
    prose = _prose(path.read_text())
    # links may have inline code as their text ([`x`](y)); inline code elsewhere is not a link
    return LINK.findall(INLINE_CODE.sub("", prose))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (word characters, spaces and hyphens kept),
    spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for heading in HEADING.findall(_prose(path.read_text())):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def test_slug_follows_github():
    assert slug("The turning point: `DiversityEarlyStopping`") == "the-turning-point-diversityearlystopping"
    assert slug("Results of the CPU track (2 cores, 83.6 min; full tables in `x/y.md`)") == \
        "results-of-the-cpu-track-2-cores-836-min-full-tables-in-xymd"
    assert slug("The strategy world: a controlled test of the paper's mechanism") == \
        "the-strategy-world-a-controlled-test-of-the-papers-mechanism"


def test_links_are_found_outside_code_only(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("[a](a.md) and [`b`](b.md#x)\n\n```bash\n[c](c.md)\n```\n\n`[d](d.md)` ![e](e.png)\n")
    assert links(page) == ["a.md", "b.md#x", "e.png"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target} (no {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target} (no heading #{fragment} in {dest.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(README) if not t.startswith("#")}
    missing = [p.name for p in DOCS if p.resolve() not in linked]
    assert DOCS and not missing, f"docs pages the README does not link to: {missing}"


def two_commands() -> tuple[str, str]:
    """The README's set-up-and-run command and its set-up-and-test command: the first two bash blocks."""
    blocks = re.findall(r"^```bash\n(.*?)^```", README.read_text(), re.MULTILINE | re.DOTALL)
    assert len(blocks) >= 2, "the README has lost its two commands"
    return blocks[0].strip(), blocks[1].strip()


def test_the_first_screen_has_the_two_commands():
    run, test = two_commands()
    first_screen = README.read_text().splitlines()[:FIRST_SCREEN]
    for command in (run, test):
        assert command in first_screen, f"not in the README's first {FIRST_SCREEN} lines: {command}"
    assert run.startswith("pip install")
    assert run.endswith("python -m aesl_lightning fit --config experiments/quickstart.yaml")
    assert test.startswith("pip install") and test.endswith("python -m pytest")


def test_ci_runs_the_readmes_test_command_verbatim():
    _, test = two_commands()
    assert test in (ROOT / ".ci" / "run").read_text().splitlines()
