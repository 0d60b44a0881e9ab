"""The commands the documentation shows: README.md and every page of the documentation site (docs/, see
mkdocs.yml), so that the tests run or check each of them and a command in the docs cannot rot.

- `bash_commands()`: every command line of the pages' ```bash blocks (continuations joined, comments
  dropped, `a && b` split), with the page it is on;
- `python_blocks()`: every ```python block;
- `api_directives()`: every `::: guided.x.y` of the API reference pages (mkdocstrings).
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def pages() -> list[Path]:
    """README.md and every Markdown page under docs/ (the generated ones included)."""
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def _blocks(language: str):
    for page in pages():
        for block in re.findall(rf"```{language}\n(.*?)```", page.read_text(), re.S):
            yield page.relative_to(REPO), block


def bash_commands() -> list[tuple[Path, str]]:
    found = []
    for page, block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if not line or line.startswith("#"):
                continue
            found += [(page, " ".join(part.split())) for part in line.split("&&") if part.strip()]
    return found


def python_blocks() -> list[tuple[Path, str]]:
    return list(_blocks("python"))


def api_directives() -> list[tuple[Path, str]]:
    return [(page.relative_to(REPO), name) for page in pages()
            for name in re.findall(r"^::: ([\w.]+)", page.read_text(), re.M)]


def argv_of(command: str) -> list[str]:
    """The words of a command line; placeholders such as [--flag A|B] keep their flag."""
    return [w.strip("[]") for w in shlex.split(command)]
