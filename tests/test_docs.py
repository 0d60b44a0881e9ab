"""The documentation cannot rot: every command of the README and of the documentation pages names a
program that exists and flags that program takes, every file it names exists, every Python example
imports what exists, every API reference directive names an object of the library, and the site builds
offline (mkdocs build --strict; no fonts or scripts from outside).

tests/test_sample_cli.py runs the sampling commands themselves (README_GUIDANCE); tests/test_api.py
runs the Python API's example. The pages are those of tests/doc_commands.py: README.md and docs/**/*.md.
"""
from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from doc_commands import REPO, api_directives, argv_of, bash_commands, python_blocks

# the command-line programs of the docs -> the function behind each (the shims, `python -m`, the scripts
# of pyproject.toml), whose --help lists every flag the program takes
PROGRAMS = {
    "sample_guided.py": "guided.cli.sample:main",
    "train_diffusion.py": "guided.cli.train:main_diffusion",
    "train_classifier.py": "guided.cli.train:main_classifier",
    "guided.cli.sweep": "guided.cli.sweep:main",
    "guided.cli.evaluate": "guided.cli.evaluate:main",
    "guided.cli.reference_batch": "guided.cli.reference_batch:main",
    "guided.cli.plots": "guided.cli.plots:main",
    "guided.cli.conformance": "guided.cli.conformance:main",
    "guided.cli.demo": "guided.cli.demo:main",
}
SCRIPTS = {"guided-demo": "guided.cli.demo", "guided-sample": "sample_guided.py",
           "guided-train-diffusion": "train_diffusion.py", "guided-train-classifier": "train_classifier.py",
           "guided-evaluate": "guided.cli.evaluate", "guided-reference-batch": "guided.cli.reference_batch",
           "guided-plots": "guided.cli.plots", "guided-conformance": "guided.cli.conformance"}
FLAG = re.compile(r"--[a-z0-9][a-z0-9-]*")


def program_of(argv: list[str]):
    """(program, its arguments) of a command line, or None for commands of other tools (pip, pytest,
    mkdocs, wget, ...). Program: a key of PROGRAMS, or a repository file (scripts/, benchmarks/)."""
    words = list(argv)
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):  # VAR=value prefixes
        words = words[1:]
    if words[:2] == ["accelerate", "launch"]:  # accelerate's own options come before the program
        rest = words[2:]
        for i, w in enumerate(rest):
            if w == "-m":
                return rest[i + 1], rest[i + 2:]
            if w.endswith(".py"):
                return w, rest[i + 1:]
        return None
    if words and words[0] in SCRIPTS:
        return SCRIPTS[words[0]], words[1:]
    if words[:1] in (["python"], ["python3"]) and len(words) > 1:
        if words[1] == "-m":
            return (words[2], words[3:]) if words[2].startswith("guided") else None
        return words[1], words[2:]
    if words[:1] == ["bash"] and len(words) > 1:
        return words[1], words[2:]
    return None


def documented_programs() -> dict[str, list[tuple[Path, list[str]]]]:
    found = {}
    for page, command in bash_commands():
        got = program_of([w for w in argv_of(command) if w not in ("...", "")])
        if got is not None:
            found.setdefault(got[0], []).append((page, got[1]))
    return found


def test_the_documented_commands_are_found():
    programs = documented_programs()
    assert {"sample_guided.py", "train_diffusion.py", "train_classifier.py", "guided.cli.sweep",
            "guided.cli.evaluate", "guided.cli.reference_batch", "guided.cli.plots",
            "guided.cli.demo"} <= set(programs), sorted(programs)
    assert len(bash_commands()) > 60


def test_every_documented_program_exists():
    for program, uses in documented_programs().items():
        if program in PROGRAMS:
            module = PROGRAMS[program].split(":")[0]
            assert importlib.util.find_spec(module) is not None, (program, uses[0][0])
        else:
            assert (REPO / program).is_file(), f"{uses[0][0]}: {program} does not exist"


def _help(target: str) -> str:
    module, function = target.split(":")
    code = f"import sys, {module} as m; sys.exit(m.{function}(['--help']))"
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_every_documented_flag_is_one_the_program_takes():
    """The flags of every documented command line appear in its program's --help."""
    programs = {p: uses for p, uses in documented_programs().items() if p in PROGRAMS}
    running = {p: _help(PROGRAMS[p]) for p in programs}
    for program, proc in running.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (program, err[-2000:])
        taken = set(FLAG.findall(out))
        for page, argv in programs[program]:
            flags = {m.group(0) for w in argv for m in [FLAG.fullmatch(w.split("=")[0])] if m}
            assert flags <= taken, f"{page}: {program} does not take {sorted(flags - taken)}"


def test_every_file_a_documented_command_names_exists():
    """Configs, strokes, scripts: the repository files the commands name (not their outputs)."""
    for page, command in bash_commands():
        for word in argv_of(command):
            path = word.split("=", 1)[-1]
            if re.fullmatch(r"(configs|docs|scripts|benchmarks)/[\w./-]+\.(yaml|json|png|py|sh)", path):
                assert (REPO / path).is_file(), f"{page}: {path} does not exist"


def _imports(source: str):
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def test_every_python_example_imports_what_exists():
    blocks = python_blocks()
    assert blocks
    for page, source in blocks:
        for module, names in _imports(source):
            m = importlib.import_module(module)
            for name in names:
                assert hasattr(m, name) or importlib.util.find_spec(f"{module}.{name}"), \
                    f"{page}: from {module} import {name}"


def test_every_api_reference_directive_names_an_object_of_the_library():
    directives = api_directives()
    assert len(directives) >= 20
    for page, dotted in directives:
        parts = dotted.split(".")
        for k in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:k]))
            except ModuleNotFoundError:
                continue
            for name in parts[k:]:
                assert hasattr(obj, name), f"{page}: ::: {dotted}"
                obj = getattr(obj, name)
            break
        else:
            pytest.fail(f"{page}: ::: {dotted} is no module")



def test_the_home_page_follows_the_readme():
    """docs/index.md is the README's text up to its documentation links (its links seen from docs/), then a
    table of where to go: the two must not drift apart."""
    readme = (REPO / "README.md").read_text().replace("](docs/", "](")
    home = (REPO / "docs" / "index.md").read_text()
    assert readme[:readme.index("\n## Documentation")] == home[:home.index("\n## Where to go next")]

def test_the_site_builds_offline(tmp_path):
    """mkdocs build --strict (as .ci/run runs it), and no page loads a font, script or style from outside."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    pages = list(site.rglob("*.html"))
    assert len(pages) > 20 and (site / "reference" / "generation" / "index.html").is_file()
    outside = re.compile(r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)=\"(?:https?:)?//[^\"]*\"|"
                         r"@import\s+url\(\s*['\"]?(?:https?:)?//|fonts\.googleapis|fonts\.gstatic")
    for page in pages + list(site.rglob("*.css")):
        found = outside.findall(page.read_text(errors="replace"))
        assert not found, (page.relative_to(site), found[:3])
    reference = (site / "reference" / "generation" / "index.html").read_text()
    assert "guided.generation.load_pipeline" in reference and "adm_flags" in reference  # rendered with its parameters
