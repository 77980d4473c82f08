"""The documentation's links hold: every relative Markdown link in README.md, DESIGN.md
and docs/ points to a file of the repository, and its #anchor (if any) to a heading of
that file, slugged as GitHub slugs them. No page sends its reader to a file outside
the repository (the old README's ../shared/ references pointed to the authors' own
machine)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", ROOT / "DESIGN.md", *(ROOT / "docs").rglob("*.md")])

FENCE = re.compile(r"^(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _outside_fences(text: str) -> str:
    """The page's lines outside fenced code blocks (the fence lines too left out)."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return "\n".join(out)


def _prose(text: str) -> str:
    """The page outside fenced code blocks, with inline code removed (a link's text or
    a code span may run over a line break)."""
    return INLINE_CODE.sub("", _outside_fences(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation dropped, lower case,
    spaces to hyphens (letters of any script, digits, '-' and '_' are kept)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in page.read_text().splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        m = None if fenced else HEADING.match(line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    return [m.group(1) for m in LINK.finditer(_prose(page.read_text()))]


def test_the_slug_is_githubs():
    assert slug("Sealed shares: the broker relays ciphertext") == \
        "sealed-shares-the-broker-relays-ciphertext"
    assert slug("A member's node: restarts and down members") == \
        "a-members-node-restarts-and-down-members"
    assert slug("`flnode run` and ε, δ") == "flnode-run-and-ε-δ"


def test_a_broken_link_is_found(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Top\n[ok](#top) [bad](#nowhere) `[code](x.md)`\n```\n[fenced](y.md)\n```\n"
                    "[two\nlines](#top)\n")
    assert links(page) == ["#top", "#nowhere", "#top"]
    assert "top" in anchors(page) and "nowhere" not in anchors(page)


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.is_relative_to(root):
            broken.append(f"{target}: outside the repository")
        elif not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(root)}")
    return broken


def test_each_kind_of_broken_link_is_named(tmp_path):
    (tmp_path / "repo" / "docs").mkdir(parents=True)
    (tmp_path / "outside.md").write_text("# Out\n")
    (tmp_path / "repo" / "docs" / "b.md").write_text("# B page\n## Twice\n## Twice\n")
    page = tmp_path / "repo" / "docs" / "a.md"
    page.write_text("[f](b.md#twice-1) [g](b.md#b-page) [h](../README.md) [i](b.md#three)\n"
                    "[j](../../outside.md) [k](https://example.org/x.md)\n")
    assert broken_links(page, tmp_path / "repo") == [
        "../README.md: no such file", "b.md#three: no heading #three in docs/b.md",
        "../../outside.md: outside the repository"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = broken_links(page)
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_page_points_outside_the_repository(page):
    lines = [n for n, line in enumerate(page.read_text().splitlines(), 1) if "../shared/" in line]
    assert not lines, f"{page.relative_to(ROOT)} lines {lines}: a file outside the repository"


# A module path (`node/runtime/node.py`, `gossip/protocol/`) or a dotted module name
# (`node.privacy.accountant`, `gossip.wire.encode`) named in backticks. A dotted name may
# end in an attribute of its module (`node.runtime.release.Releaser`).
CODE_SPAN = re.compile(r"`([^`\n]+)`")
CODE_PATH = re.compile(r"(?<![\w./-])((?:node|gossip)/[\w/.-]*)")
DOTTED = re.compile(r"^((?:node|gossip)(?:\.\w+)+)(?:\(.*\))?:?$")


def _code_spans(text: str) -> list[str]:
    """The inline code spans outside fenced blocks (a block shows commands and output,
    not module names). CODE_SPAN stops at a line break, so spans are found per line."""
    return CODE_SPAN.findall(_outside_fences(text))


def _module_resolves(dotted: str, root: Path) -> bool:
    """`a.b.c` names a package or module of the tree, or an attribute of one: the longest
    prefix that is a module file or package must leave at most one name after it."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        base = root.joinpath(*parts[:n])
        source = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if source.is_file():
            if n == len(parts):
                return True
            # one name after the module, defined or imported there (a package's face)
            return (n > 1 and len(parts) - n == 1
                    and re.search(rf"^\s*(def|class|async def)\s+{parts[n]}\b|^\s*{parts[n]}\s*[:=]"
                                  rf"|^from .* import .*\b{parts[n]}\b|^\s+{parts[n]},",
                                  source.read_text(), re.M) is not None)
    return False


def _config_key(dotted: str) -> bool:
    """`gossip.min_members`, `gossip.mqtt.ca_file`: a key of the node's TOML config, not a
    module (the [gossip] section shares the package's name)."""
    from pydantic import BaseModel

    from node.runtime.config import NodeConfig

    model: type[BaseModel] | None = NodeConfig
    for part in dotted.split("."):
        field = model.model_fields.get(part) if model else None
        if field is None:
            return False
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return True


FILE_NAME = re.compile(r"\.(toml|json|md|csv|py|txt|html|pt|log)$")


def stale_references(page: Path, root: Path = ROOT) -> list[str]:
    stale = []
    for span in _code_spans(page.read_text()):
        for path in CODE_PATH.findall(span):
            path = path.rstrip(".")
            if "*" in path or "{" in path:
                continue
            if not (root / path).exists():
                stale.append(f"{path}: no such file")
        m = DOTTED.match(span.strip())
        if (m and not FILE_NAME.search(m.group(1)) and not _config_key(m.group(1))
                and not _module_resolves(m.group(1), root)):
            stale.append(f"{m.group(1)}: no such module")
    return stale


def test_a_stale_reference_is_found(tmp_path):
    (tmp_path / "node" / "runtime").mkdir(parents=True)
    (tmp_path / "node" / "__init__.py").write_text("")
    (tmp_path / "node" / "runtime" / "__init__.py").write_text("")
    (tmp_path / "node" / "runtime" / "release.py").write_text("class Releaser:\n    pass\n")
    page = tmp_path / "p.md"
    page.write_text("`node/runtime/release.py` `node/runner.py` `node.runtime.release.Releaser`\n"
                    "`node.runner` `node.runtime.release.Releaser.release.x` `node/runtime/`\n"
                    "```\nnode/fenced.py\n```\n`python -m node.runtime.gone --x`\n"
                    "`gossip.min_members` `gossip.mqtt.ca_file` `node.toml` `gossip.nokey`\n"
                    "`node.runtime.release.Signer`\n")
    assert stale_references(page, tmp_path) == [
        "node/runner.py: no such file", "node.runner: no such module",
        "node.runtime.release.Releaser.release.x: no such module",
        "gossip.nokey: no such module", "node.runtime.release.Signer: no such module"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_named_exists(page):
    stale = stale_references(page)
    assert not stale, f"{page.relative_to(ROOT)}: " + "; ".join(stale)


# The code, scripts and example configs point their reader at docs pages: each page named
# exists, and none points at a README section (the README is a landing page now) or at
# a file outside the repository.
CODE_DIRS = ("node", "gossip", "scripts", "network_configs")
DOCS_PATH = re.compile(r"\bdocs/[\w/.-]+\.md\b")
STALE_POINTER = re.compile(r"README(?:,|'s|’s)? *\\?\"|, README\)|\.\./shared/")


def code_files() -> list[Path]:
    return sorted(p for d in CODE_DIRS for p in (ROOT / d).rglob("*")
                  if p.suffix in (".py", ".toml", ".md", ".sh") and "__pycache__" not in p.parts)


def test_code_points_at_docs_pages_that_exist():
    bad = []
    for path in code_files():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{n}"
            bad += [f"{where}: {m} does not exist" for m in DOCS_PATH.findall(line)
                    if not (ROOT / m).is_file()]
            if STALE_POINTER.search(line):
                bad.append(f"{where}: points at a README section or outside the repository")
    assert not bad, "; ".join(bad)


def test_a_stale_pointer_is_found():
    stale = ['(README, "Hostile members")', '"(README, \\"Hostile members\\")"',
             "The README's \"Bring your own data\"", 'README "Skewed', "bench.py, README)",
             "../shared/FACTS.md"]
    fine = ["docs/results/robustness.md, \"Smaller consortia\"", "the README is a landing page"]
    assert all(STALE_POINTER.search(s) for s in stale)
    assert not any(STALE_POINTER.search(s) for s in fine)
