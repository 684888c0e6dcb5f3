"""The repository stands on its own: no file refers to design notes kept outside it, to an issue
tracker's numbers, or to paths of a development machine; and the README stays short and keeps
the line CI reads.

Code may use temporary directories (``tempfile``, pytest's ``tmp_path``) and test strings that
merely look like paths; those are code, not references. So the temporary-directory path and the
``#N`` form are looked for in prose only: Markdown and other text files, Python comments and
docstrings.
"""

from __future__ import annotations

import ast
import io
import re
import subprocess
import tokenize
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]
README = ROOT / "README.md"
CI_MARKER = "<!-- ci: test command -->"
README_MAX_CHARS = 15_000
# walked when the tree is not a git checkout (e.g. an unpacked source archive)
SCANNED_WITHOUT_GIT = ("qkd_deploy", "tests", "benchmarks", "docs", ".ci", "README.md")
SKIPPED_DIRS = {".git", ".venv", "venv", "__pycache__", "build", "dist", "runs"}
MAX_BYTES = 2_000_000

# anywhere in a file, code included: each pattern names what it forbids
ANYWHERE = {
    "a design note outside the repository": re.compile(r"\b(?:DESIGN|METHODS)\.md\b"),
    "a folder shared outside the repository": re.compile(r"(?<![\w.-])shared[/]"),
    "an issue number": re.compile(r"\bissues?[ _-]?#?\d+", re.IGNORECASE),
    "a development machine's path": re.compile(r"/(?:work|home)[/]"),
}
# in prose only (Markdown and text files, Python comments and docstrings)
IN_PROSE = {
    "an issue reference (#N)": re.compile(r"(?<![\w&/#])#\d{1,5}\b(?![\w-])"),
    "a temporary-directory path of a machine": re.compile(r"(?<![\w.])/tmp[/]"),
}


def repository_files() -> list[Path]:
    """Tracked files and new ones git does not ignore; without git, the package, tests,
    benchmarks, docs and README."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
        paths = [ROOT / name for name in listed.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        paths = []
        for name in SCANNED_WITHOUT_GIT:
            top = ROOT / name
            paths += [top] if top.is_file() else sorted(top.rglob("*"))
    # this file is left out: its samples below are the forbidden forms, written plainly
    return [p for p in paths if p.is_file() and not SKIPPED_DIRS & set(p.parts) and p != HERE]


def read_text(path: Path) -> str | None:
    """The file's text, or None for binary, unreadable or very large files."""
    try:
        if path.stat().st_size > MAX_BYTES:
            return None
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def python_prose(source: str) -> str:
    """Comments and docstrings of a Python source, one per line (all of it if it does not
    parse: then everything counts as prose)."""
    try:
        tree = ast.parse(source)
        comments = [
            token.string
            for token in tokenize.generate_tokens(io.StringIO(source).readline)
            if token.type == tokenize.COMMENT
        ]
    except (SyntaxError, tokenize.TokenError):
        return source
    documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docstrings = [
        ast.get_docstring(node, clean=False) or ""
        for node in ast.walk(tree)
        if isinstance(node, documented)
    ]
    return "\n".join(comments + docstrings)


def findings(name: str, text: str) -> list[str]:
    """What ``text``, the content of the file ``name``, refers to that it should not."""
    prose = python_prose(text) if name.endswith(".py") else text
    found = []
    for checks, body in ((ANYWHERE, text), (IN_PROSE, prose)):
        for what, pattern in checks.items():
            for match in pattern.finditer(body):
                line = body.count("\n", 0, match.start()) + 1
                place = f"line {line}" if body is text else "a comment or docstring"
                found.append(f"{name} ({place}): {what}: {match.group(0)!r}")
    return found


def test_no_file_refers_outside_the_repository():
    files = repository_files()
    assert any(p.name == "README.md" for p in files), "the scan found no README.md"
    problems = [
        problem
        for path in files
        if (text := read_text(path)) is not None
        for problem in findings(str(path.relative_to(ROOT)), text)
    ]
    assert not problems, (
        "files refer to things outside the repository (state the reasoning, or point to "
        "docs/ or benchmarks/results/ instead):\n" + "\n".join(problems)
    )


# the samples are assembled from pieces so that this file does not hold what it forbids
ISSUE, SHARED = "iss" + "ue", ".." + "/shared/"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"see {SHARED}DESIGN.md", 2),
        ("as METHODS.md says", 1),
        (f"the {ISSUE} 4 ranking table", 1),
        (f"{ISSUE.title()}-12 targets", 1),
        ("fixed in #12.", 1),
        ("a run in /work/runs/x", 1),
        ("copied to /home/me/data", 1),
        ("written to /tmp/run", 1),
        ("colour #1f77b4, set #2b, C# 10, &#39;", 0),
        ("shared_stages, layers_shared/x, the issue's target", 0),
    ],
)
def test_the_patterns_catch_what_they_should(text, expected):
    """The checks themselves: each sample holds this many forbidden references as prose."""
    assert len(findings("sample.md", text)) == expected


def test_code_may_use_temporary_paths_and_hash_strings():
    """In Python, a temporary path or ``#2`` inside a string literal is code, not a reference;
    in a comment or docstring it is prose."""
    code = 'MEMBER = "/tmp/evil.txt"\nSPEC = "folder:/data/set #2"\n'
    assert findings("sample.py", code) == []
    commented = code + "# see #12 and /tmp/x\n"
    assert len(findings("sample.py", commented)) == 2
    documented = f'"""Written to /tmp/out, as {ISSUE} 7 asked."""\n' + code
    assert len(findings("sample.py", documented)) == 2


def test_readme_is_short_and_keeps_the_ci_command():
    text = README.read_text(encoding="utf-8")
    assert len(text) < README_MAX_CHARS, f"README.md has {len(text)} characters"
    lines = text.splitlines()
    assert lines.count(CI_MARKER) == 1, f"README.md must hold {CI_MARKER!r} exactly once"
    at = lines.index(CI_MARKER)
    # .ci/run runs the line two lines after the marker (the first line of its fenced block)
    assert lines[at + 1].startswith("```"), "a fenced block must follow the CI marker"
    command = lines[at + 2]
    assert "pytest" in command and not command.startswith("```"), command


def test_every_relative_link_in_the_documentation_resolves():
    """README, docs/ and the results page link to files that exist (anchors not checked)."""
    pages = [ROOT / "README.md", ROOT / "benchmarks" / "results" / "README.md"]
    pages += sorted((ROOT / "docs").rglob("*.md"))
    broken = [
        f"{page.relative_to(ROOT)} -> {target}"
        for page in pages
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
        if not target.startswith(("http://", "https://", "mailto:"))
        and not (page.parent / target).exists()
    ]
    assert not broken, broken
