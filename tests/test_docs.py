"""docs/guide.md cannot drift from the code: its flag table is the one ``Settings`` generates, every
user-facing error message has a troubleshooting entry, and the images and notebooks it names exist.

``PMACCEL_UPDATE_DOCS=1`` rewrites the flag table in place.
"""

import ast
import os
import re
from pathlib import Path

from pmaccel.settings import settings_markdown

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guide.md"
FLAGS = re.compile(r"(<!-- flags:begin[^\n]*-->\n)(.*?)(<!-- flags:end -->)", re.S)


def test_flag_table_is_generated_from_settings():
    text = GUIDE.read_text()
    match = FLAGS.search(text)
    assert match, "docs/guide.md lost its <!-- flags:begin --> / <!-- flags:end --> markers"
    if match.group(2) != settings_markdown() and os.environ.get("PMACCEL_UPDATE_DOCS") == "1":
        GUIDE.write_text(text[: match.start(2)] + settings_markdown() + text[match.end(2):])
        return
    assert match.group(2) == settings_markdown(), (
        "the flag table in docs/guide.md is stale; run PMACCEL_UPDATE_DOCS=1 pytest tests/test_docs.py")


def _literal_parts(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [v.value for v in node.values if isinstance(v, ast.Constant)]
    if isinstance(node, ast.BinOp):
        return _literal_parts(node.left) + _literal_parts(node.right)
    return []


def _error_messages() -> list[tuple[str, str]]:
    """``(where, the longest literal part)`` of the message of every ``PMAccelError(...)`` in pmaccel/."""
    found = []
    for path in sorted((ROOT / "pmaccel").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "PMAccelError" and node.args:
                part = max(_literal_parts(node.args[0]), key=len, default="").strip(" ;:,.()'\"")
                if len(part) >= 12:  # "must be ", "sample " ...: too generic to look for
                    found.append((f"{path.name}:{node.lineno}", part))
    return found


def test_every_error_message_has_a_troubleshooting_entry():
    troubleshooting = GUIDE.read_text().split("## Troubleshooting", 1)[1]
    messages = _error_messages()
    assert len(messages) > 50
    missing = [f"{where}: {message!r}" for where, message in messages if message not in troubleshooting]
    assert not missing, "add these to the Troubleshooting section of docs/guide.md:\n" + "\n".join(missing)


def test_images_and_notebooks_it_names_exist():
    text = GUIDE.read_text()
    for image in re.findall(r"\]\((images/[^)]+)\)", text):
        assert (GUIDE.parent / image).is_file(), image
    for notebook in set(re.findall(r"`(\w+\.ipynb)`", text)):
        assert (ROOT / "notebooks" / notebook).is_file(), notebook
    assert "images/inspector.png" in text
