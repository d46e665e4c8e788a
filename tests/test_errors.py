"""pmaccel.errors: one line, ``file:line: field: problem``, with the parts that are known."""

from __future__ import annotations

import pytest

from pmaccel.errors import PMAccelError


@pytest.mark.parametrize("kwargs, text", [
    (dict(file="rows.jsonl", row=3, field="branches[1]"), "rows.jsonl:3: branches[1]: bad\nthing"),
    (dict(file="rows.jsonl"), "rows.jsonl: bad\nthing"),
    (dict(row=7), "row 7: bad\nthing"),
    (dict(field="max_new_tokens"), "max_new_tokens: bad\nthing"),
    ({}, "bad\nthing"),
])
def test_message_names_what_is_known_on_one_line(kwargs, text):
    e = PMAccelError("bad\nthing", **kwargs)
    assert str(e) == text.replace("\n", " ") and isinstance(e, ValueError)
    assert (e.file, e.row, e.field, e.problem) == (kwargs.get("file"), kwargs.get("row"), kwargs.get("field"), "bad\nthing")


def test_an_error_pickles_whole():
    """An error goes from one process to another (the ranks' input errors, a started process's) as it was."""
    import pickle

    e = PMAccelError("malformed JSON", file="rows.jsonl", row=2, field="branches")
    got = pickle.loads(pickle.dumps(e))
    assert type(got) is PMAccelError and str(got) == str(e) == "rows.jsonl:2: branches: malformed JSON"
    assert (got.problem, got.file, got.row, got.field) == ("malformed JSON", "rows.jsonl", 2, "branches")
