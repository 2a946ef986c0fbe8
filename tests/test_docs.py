"""Every relative link in the README and the docs reaches a file, and every #anchor a heading of it (GitHub's rule)."""

from __future__ import annotations

import re
from collections import Counter
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "benchmarks").glob("*.md")])
LINK = re.compile(r"\]\(([^)\s]+)\)")


def prose_lines(page: Path) -> list[str]:
    """The page's lines outside fenced code blocks (a '# comment' in a bash block is no heading)."""
    lines, fenced = [], False
    for line in page.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@cache
def anchors(page: Path) -> set[str]:
    """The anchors of the page's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: Counter[str] = Counter()
    found = set()
    for line in prose_lines(page):
        if re.match(r"#{1,6} ", line):
            base = slug(line.lstrip("#"))
            found.add(base if not seen[base] else f"{base}-{seen[base]}")
            seen[base] += 1
    return found


def test_slug_follows_githubs_rule() -> None:
    assert slug(" Issue 24: DQN's aux pairs, `aux.source=td` ") == "issue-24-dqns-aux-pairs-auxsourcetd"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_relative_links_reach_a_file_and_a_heading(page: Path) -> None:
    broken = []
    for line in prose_lines(page):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{target} (no heading #{anchor} in {linked.name})")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


# ---------------------------------------------------------------- the README's Python runs as written

README_SIZES = {'make_vec_env("procgen:coinrun", 64,': 'make_vec_env("procgen:coinrun", 2,', "learn(1_000_000)": "learn(32)"}


def python_blocks(page: Path) -> list[str]:
    """The ```python blocks of a page, in order."""
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def test_the_readmes_python_runs_at_tiny_sizes(tmp_path, monkeypatch, one_torch_thread):
    """Every Python block of the README runs as a user would paste it, with its env count and step budget shrunk
    (README_SIZES: each must still be found, so a changed README changes this test) and PPO's rollout made short."""
    import functools

    import minc_rl.agents

    monkeypatch.chdir(tmp_path)  # model.save("coinrun.zip") writes here
    monkeypatch.setattr(minc_rl.agents, "MincPPO", functools.partial(minc_rl.agents.MincPPO, n_steps=16, batch_size=16,
                                                                     n_epochs=1))
    blocks = python_blocks(REPO / "README.md")
    assert blocks, "the README has no Python block"
    code = "\n".join(blocks)
    for written, tiny in README_SIZES.items():
        assert written in code, f"{written!r} is gone from the README's Python: update README_SIZES"
        code = code.replace(written, tiny)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "coinrun.zip").is_file()
