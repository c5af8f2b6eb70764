"""The documentation stays true to the tree: what code cites exists, and what the docs link or name exists.

- Every ``docs/<page>.md`` (with its ``#section`` anchor, if any) named in code, configs or tests is a file
  of ``docs/`` with that section; every top-level design document (an upper-case name ending in .md) named
  there exists in the repository.
- Every relative link of ``README.md`` and ``docs/*.md`` resolves to a file, and its anchor to a heading.
- Every repository path that ``README.md`` and ``docs/*.md`` name in backticks (``fvlm/model/pooling.py``,
  ``configs/train/``) exists, so a moved file cannot leave the docs behind.

Pure Python over the text of the files: no import of the packages.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Folders whose files may cite documentation (code, configs, tests, benchmarks, deployment).
CODE_DIRS = ("anatomy", "fvlm", "pipelines", "benchmarks", "configs", "tests", "docker", "scripts", ".ci",
             "requirements")
CODE_FILES = ("Makefile", "pyproject.toml")
CODE_SUFFIXES = {".py", ".yaml", ".yml", ".json", ".sh", ".toml", ".md", ".txt", ""}
#: Markdown pages whose links and paths are checked.
DOC_PAGES = ("README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")))
#: Top-level folders a path named in the docs may start with.
REPO_DIRS = ("anatomy", "fvlm", "pipelines", "configs", "benchmarks", "tests", "docker", "scripts",
             "requirements", "docs")

DOC_REF = re.compile(r"(?<![\w/.-])docs/[\w./-]+?\.md(?:#[\w-]+)?")
TOP_DOC = re.compile(r"(?<![\w/.-])([A-Z][A-Z0-9_-]*\.md)\b")
MD_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`[^`\n]+`")
REPO_PATH = re.compile(r"`((?:%s)/[^`\s]*)`" % "|".join(REPO_DIRS))
FILE_SUFFIXES = {"py", "md", "nii", "gz", "npy", "json", "jsonl", "csv", "yaml", "html", "txt", "safetensors"}
DOTTED = re.compile(r"`((?:anatomy|fvlm|pipelines|benchmarks)(?:\.\w+)+)")


def _code_files() -> list[Path]:
    files = [ROOT / f for f in CODE_FILES if (ROOT / f).is_file()]
    for folder in CODE_DIRS:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and path.suffix in CODE_SUFFIXES and "__pycache__" not in path.parts:
                files.append(path)
    return files


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (``-`` and ``_`` kept), spaces as ``-``."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _without_fences(text: str) -> list[str]:
    """The lines of a Markdown text outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


@lru_cache(maxsize=None)
def _anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _without_fences(path.read_text(encoding="utf-8")):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return frozenset(anchors)


def _check_target(target: Path, anchor: str | None) -> str | None:
    """None when ``target`` (and its ``anchor``) exist, else what is wrong."""
    if not target.exists():
        return f"{target.relative_to(ROOT) if target.is_relative_to(ROOT) else target} does not exist"
    if anchor and target.suffix == ".md" and anchor not in _anchors(target):
        return f"{target.relative_to(ROOT)} has no section #{anchor}"
    return None


def test_slug_follows_github() -> None:
    assert _slug("The fVLM algorithm, as published") == "the-fvlm-algorithm-as-published"
    assert _slug("Probabilistic embeddings (`fvlm-uncertainty`)") == "probabilistic-embeddings-fvlm-uncertainty"
    assert _slug("fvlm parse-reports") == "fvlm-parse-reports"


def test_code_cites_existing_docs() -> None:
    """A docs page with its section anchor, cited in a docstring, comment or config, exists with that section."""
    bad = []
    for path in _code_files():
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for ref in DOC_REF.findall(line):
                page, _, anchor = ref.partition("#")
                problem = _check_target(ROOT / page, anchor or None)
                if problem:
                    bad.append(f"{path.relative_to(ROOT)}:{n}: {ref}: {problem}")
    assert not bad, "code cites documentation that does not exist:\n" + "\n".join(bad)


def test_code_names_only_existing_design_documents() -> None:
    """An upper-case document name in code (``BENCHMARKS.md``) is a file of the repository root or of docs/."""
    bad = []
    for path in _code_files():
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for name in TOP_DOC.findall(line):
                if not ((ROOT / name).is_file() or (ROOT / "docs" / name).is_file()):
                    bad.append(f"{path.relative_to(ROOT)}:{n}: {name} is not in the repository")
    assert not bad, ("code names documents that are not in the repository; cite the docs/ page and section "
                     "that holds the content instead:\n" + "\n".join(bad))


@pytest.mark.parametrize("page", DOC_PAGES)
def test_markdown_links_resolve(page: str) -> None:
    path = ROOT / page
    bad = []
    for line in _without_fences(path.read_text(encoding="utf-8")):
        for link in MD_LINK.findall(INLINE_CODE.sub("", line)):
            if re.match(r"[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto:
                continue
            target, _, anchor = link.partition("#")
            problem = _check_target((path.parent / target).resolve() if target else path, anchor or None)
            if problem:
                bad.append(f"{link}: {problem}")
    assert not bad, f"{page}: broken links:\n" + "\n".join(bad)


@pytest.mark.parametrize("page", DOC_PAGES)
def test_repository_paths_named_in_docs_exist(page: str) -> None:
    bad = []
    for line in _without_fences((ROOT / page).read_text(encoding="utf-8")):
        for ref in REPO_PATH.findall(line):
            ref = ref.rstrip(".,;:)")
            # globs, placeholders (configs/train/NAME.yaml, <id>) and elisions are patterns, not paths
            if re.search(r"[*<>{}\[\]]|\.\.\.", ref) or any(p.isupper() for p in re.split(r"[/.]", ref) if len(p) > 2):
                continue
            target, _, anchor = ref.partition("#")
            problem = _check_target(ROOT / target, anchor or None)
            if problem:
                bad.append(problem)
    assert not bad, f"{page} names paths that do not exist: {sorted(set(bad))}"



def _module_exists(dotted: str) -> bool:
    """``a.b.c.name``: the packages and module exist; a name after a package is defined or imported there."""
    path = ROOT
    for i, part in enumerate(dotted.split(".")):
        if (path / part).is_dir() and (path / part / "__init__.py").is_file():
            path = path / part
        elif (path / f"{part}.py").is_file():
            return True  # a module: what follows are its attributes
        else:
            init = path / "__init__.py"
            return i > 0 and init.is_file() and re.search(rf"\b{part}\b", init.read_text(encoding="utf-8")) is not None
    return True


@pytest.mark.parametrize("page", DOC_PAGES)
def test_modules_named_in_docs_exist(page: str) -> None:
    """``fvlm.metrics.paired_macro_auc_difference``-style names in the docs follow the modules when they move."""
    bad = sorted({name for line in _without_fences((ROOT / page).read_text(encoding="utf-8"))
                  for name in DOTTED.findall(line)
                  if not FILE_SUFFIXES & set(name.split(".")) and not _module_exists(name)})
    assert not bad, f"{page} names modules that do not exist: {bad}"


def test_readme_links_the_docs() -> None:
    """The README stays short and sends the reader to each docs page."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250, "README.md grew past 250 lines: move reference material to docs/"
    linked = {link.partition("#")[0] for link in MD_LINK.findall(text)}
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")} - {"docs/README.md"}
    assert pages <= linked, f"README.md does not link {sorted(pages - linked)}"
