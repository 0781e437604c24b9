"""The repository's documentation points only inside the repository, and every design citation resolves.

* No citation in the old form (the word DESIGN followed by a section sign) is left: those named a handbook that
  is not part of the repository. Citations read ``docs/design.md §N``.
* Every ``docs/design.md §N`` or ``§N.M`` cited in any file names a numbered heading of docs/design.md, as does
  every bare ``§N`` inside docs/design.md, and every link to one of its anchors (from another file, or its own
  table of contents) names one of its headings.
* No file points into the parent directory's shared folder, with one exception: its ``data`` subfolder, which
  is where development and CI machines keep the MMLU / GSM8K files. It appears in command lines and data-path
  examples (``HELIX_EVAL_DATA=<that path> nox -s e2e_accuracy``), never as documentation, so the pattern for
  it is allowed below.

Files: those git tracks or would track (``git ls-files --cached --others --exclude-standard``), else a walk of
the checkout without hidden and build folders.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"

# Spelled in pieces so that this file does not match its own patterns.
OLD_CITATION = "DESIGN" + " §"
OUTSIDE = re.compile(re.escape(".." + "/shared") + r"(?!/data\b)"  # the data folder is allowed, see above
                     + "|" + re.escape("shared/" + "DESIGN"))
CITATION = re.compile(r"docs/design\.md((?:[\s,]*(?:and\s+)?§\d+(?:\.\d+)*)+)")
SECTION = re.compile(r"§(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^#{2,3} (\d+(?:\.\d+)*)\.? ", re.MULTILINE)
ANCHOR = re.compile(r"design\.md#([\w-]+)")
OWN_ANCHOR = re.compile(r"\]\(#([\w-]+)\)")
SKIP_DIRS = {"__pycache__", "runs", "build", "dist", "node_modules"}


def repo_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True, timeout=30).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.SubprocessError):
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.is_file() and not any(part.startswith(".") or part in SKIP_DIRS or part.endswith(".egg-info")
                                            for part in p.relative_to(ROOT).parts[:-1])]
    return [ROOT / n for n in names if (ROOT / n).is_file()]


def text_files() -> dict[str, str]:
    texts = {}
    for path in repo_files():
        try:
            texts[str(path.relative_to(ROOT))] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # images
            continue
    return texts


def where(text: str, start: int) -> int:
    return text.count("\n", 0, start) + 1


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def design_sections() -> set[str]:
    return set(HEADING.findall(DESIGN.read_text(encoding="utf-8")))


def test_design_document_exists_with_numbered_sections():
    sections = design_sections()
    assert {str(n) for n in range(1, 11)} <= sections, f"docs/design.md lacks top-level sections: {sorted(sections)}"


def test_no_old_design_citations():
    found = [f"{name}:{where(text, m.start())}" for name, text in text_files().items()
             for m in re.finditer(re.escape(OLD_CITATION), text)]
    assert not found, f"rewrite these as 'docs/design.md §N': {found}"


def test_every_design_citation_resolves():
    sections = design_sections()
    cited, missing = 0, []
    for name, text in text_files().items():
        refs = [(m.start(), n) for m in CITATION.finditer(text) for n in SECTION.findall(m.group(1))]
        if name == "docs/design.md":
            refs = [(m.start(), m.group(1)) for m in SECTION.finditer(text)]
        cited += len(refs)
        missing += [f"{name}:{where(text, pos)}: §{n}" for pos, n in refs if n not in sections]
    assert cited, "no citation of docs/design.md found: the pattern is broken"
    assert not missing, f"cited sections that docs/design.md does not have: {missing}"


def test_design_anchors_resolve():
    headings = re.findall(r"^#{1,6} (.+)$", DESIGN.read_text(encoding="utf-8"), re.MULTILINE)
    slugs = {github_slug(h) for h in headings}
    bad = [f"{name}:{where(text, m.start())}: #{m.group(1)}" for name, text in text_files().items()
           for m in (OWN_ANCHOR if name == "docs/design.md" else ANCHOR).finditer(text) if m.group(1) not in slugs]
    assert not bad, f"links to headings docs/design.md does not have: {bad}"


def test_nothing_points_outside_the_repository():
    found = [f"{name}:{where(text, m.start())}: {text[m.start():m.end() + 20]!r}" for name, text in text_files().items()
             for m in OUTSIDE.finditer(text)]
    assert not found, f"files that point outside the repository: {found}"


def test_readme_links_the_design_document():
    assert "](docs/design.md" in (ROOT / "README.md").read_text(encoding="utf-8")
