"""The documentation's examples stay true to the code: every `qembed ...` command in a bash block of README.md or
docs/ parses with the real CLI parser, every Python block is valid Python, and the README's links lead to files
that exist. (`make docs` / `make test` build the site itself with `mkdocs build --strict`.)"""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest

from qembed.cli import build_parser
from qembed.cli.common import UsageError

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)


def blocks(language: str) -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for lang, body in FENCE.findall(page.read_text(encoding="utf-8")):
            if lang == language:
                found.append((page.relative_to(ROOT).as_posix(), body))
    return found


def qembed_commands() -> list[tuple[str, str]]:
    """(page, command) for each shell line that runs `qembed` (continuations joined, comments dropped);
    lines with a placeholder (`...`, `[--optional ...]`) are left out."""
    commands = []
    for page, body in blocks("bash"):
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line.startswith("qembed ") or "..." in line or " [" in line:
                continue
            commands.append((page, line))
    return commands


COMMANDS = qembed_commands()


def test_the_docs_have_commands_to_check():
    pages = {page for page, _ in COMMANDS}
    assert len(COMMANDS) >= 40 and "README.md" in pages and "docs/train.md" in pages, (len(COMMANDS), pages)


@pytest.mark.parametrize(("page", "command"), COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_documented_command_parses(page, command):
    argv = shlex.split(command, comments=True)[1:]
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        pytest.fail(f"{page}: `{command}` does not parse: {exc}")
    assert callable(args.func)


def test_a_wrong_flag_would_be_caught():
    with pytest.raises(UsageError):
        build_parser().parse_args(shlex.split("eval --model m --dataset d --output o --no-such-flag"))


@pytest.mark.parametrize(("page", "code"), blocks("python"), ids=lambda v: v if v.endswith(".md") else "")
def test_documented_python_is_valid(page, code):
    ast.parse(code, filename=page)


def test_readme_links_lead_to_files():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = [t for t in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme) if "://" not in t]
    assert any(t.startswith("docs/") for t in targets)
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, missing
