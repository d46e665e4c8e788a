"""The examples of README.md and docs/guide.md as a newcomer meets them: every file or model they name
that nobody has is called a placeholder, every Python block imports what it uses, every pmaccel command
line names real flags and existing Accelerate configs, and the Python examples run as written (with the
user's own rows file standing in for the placeholder ``rows.jsonl``)."""

from __future__ import annotations

import ast
import builtins
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pmaccel.rows import example_path
from pmaccel.settings import parse_settings

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GUIDE = ROOT / "docs" / "guide.md"
DOCS = [README, GUIDE]
# files and models named in the examples that only the reader can supply
PLACEHOLDERS = ("pm_lora.pth", "rows.jsonl", "rows.parquet", "heldout.jsonl", "Qwen/Qwen2.5-0.5B", "Qwen2.5-7B")
FENCE = re.compile(r"^ *```(\w*)\n(.*?)^ *```", re.S | re.M)


def blocks(path: Path, language: str | None = None) -> list[tuple[int, str, str]]:
    """``(offset, language, code)`` of every fenced block (indentation of a list item removed)."""
    found = []
    for match in FENCE.finditer(path.read_text()):
        code = match.group(2)
        indent = min((len(line) - len(line.lstrip()) for line in code.splitlines() if line.strip()), default=0)
        code = "\n".join(line[indent:] for line in code.splitlines()) + "\n"
        if language is None or match.group(1) == language:
            found.append((match.start(), match.group(1), code))
    return found


def section_before(text: str, offset: int) -> str:
    """The text of the ``## `` section that holds ``offset``, up to ``offset``."""
    start = max((m.start() for m in re.finditer(r"^## ", text[:offset], re.M)), default=0)
    return text[start:offset]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_placeholder_is_called_one(path):
    text = path.read_text()
    unmarked = []
    for offset, _, code in blocks(path):
        named = [p for p in PLACEHOLDERS if p in code]
        if named and "placeholder" not in code and "placeholder" not in section_before(text, offset):
            unmarked.append(f"{named} in the block at line {text[:offset].count(chr(10)) + 1}")
    assert not unmarked, f"{path.name}: say these are placeholders (in the block or its section before it):\n" + \
        "\n".join(unmarked)


def unbound_names(code: str) -> set[str]:
    """Names a Python block reads but neither imports nor assigns (builtins aside)."""
    tree = ast.parse(code)
    bound, used = set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return used - bound


def test_readme_python_blocks_import_what_they_use():
    python = blocks(README, "python")
    assert len(python) >= 2
    for _, _, code in python:
        assert not unbound_names(code), f"README.md: import or define {sorted(unbound_names(code))} in:\n{code}"
    assert any("from accelerate import notebook_launcher" in code for _, _, code in python)


def pmaccel_commands(code: str) -> list[list[str]]:
    """Every command line of a shell block that runs pmaccel, as words (continuations joined, comments dropped)."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if "pmaccel" in words:
            commands.append(words)
    return commands


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_shell_examples_use_real_flags_and_configs(path):
    commands = [c for _, _, code in blocks(path, "bash") for c in pmaccel_commands(code)]
    assert len(commands) >= 3
    for words in commands:
        for i, word in enumerate(words[:-1]):
            if word == "--config_file":
                assert (ROOT / words[i + 1]).is_file(), f"{path.name}: no {words[i + 1]} in: {' '.join(words)}"
        args = words[words.index("pmaccel") + 1:]
        if args[:1] == ["score"]:
            args = args[1:]
        try:
            parse_settings(args)
        except SystemExit:  # argparse: an unknown flag or a bad value
            pytest.fail(f"{path.name}: pmaccel does not take: {' '.join(words)}")


@pytest.mark.slow
def test_python_examples_run_as_written(tmp_path):
    """The README's two Python blocks and the guide's "From Python", as written, in one fresh process
    whose working directory has the reader's own ``rows.jsonl`` (one row of the shipped example)."""
    (tmp_path / "rows.jsonl").write_text(example_path().read_text().splitlines()[0] + "\n")
    readme = [code for _, _, code in blocks(README, "python")]
    guide_text = GUIDE.read_text()
    from_python = guide_text.index("### From Python")
    guide = [code for offset, lang, code in blocks(GUIDE, "python") if lang == "python" and offset > from_python][:1]
    script = "\n".join([*readme, *guide, "print('EXAMPLES DONE')"])
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "EXAMPLES DONE" in proc.stdout, (proc.stdout[-2000:], proc.stderr[-4000:])
    assert "Paris" in proc.stdout  # the README's generate() call: the capital of France
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert out and all(r["outputs"] for r in out)
