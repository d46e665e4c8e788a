"""Rows -> samples (``pmaccel.grouping``): parallel rows, flat rows grouped (fixed, seeded random and
token-budget group sizes), token counts tokenized in batches equal to one sample at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers_infer import MIXED_ROWS, make_tokenizer, write_jsonl

from pmaccel.errors import PMAccelError
from pmaccel.grouping import Grouping, make_samples
from pmaccel.rows import example_path, read_rows


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def flat_table(tmp_path, texts, name="flat.jsonl"):
    return read_rows(write_jsonl(tmp_path / name, [{"id": i, "text": t} for i, t in enumerate(texts)]))


def groups(samples):
    return [list(s.rows) for s in samples]


def test_parallel_row_is_one_sample_and_flat_rows_group(tmp_path, tok):
    table = read_rows(write_jsonl(tmp_path / "rows.jsonl", MIXED_ROWS))
    samples, skipped = make_samples(table, tok, Grouping(branches_per_sample=2))
    assert groups(samples) == [[0], [1], [2], [3], [4, 5], [6, 7], [8, 9]] and not skipped
    assert [s.index for s in samples] == list(range(7))
    assert samples[4].as_input() == {"main": "", "branches": ["the sun and the moon", "a big red house"]}
    assert samples[5].branches == ["the river is", {"input_ids": [20, 21, 22, 23]}]
    assert samples[0].num_tokens == len("once upon a time there lived a cat who a dog who an old bird".split())


def test_a_parallel_row_ends_a_flat_group(tmp_path, tok):
    rows = [{"text": "a"}, {"text": "the"}, {"branches": ["cat"]}, {"text": "dog"}]
    samples, _ = make_samples(read_rows(write_jsonl(tmp_path / "r.jsonl", rows)), tok, Grouping(branches_per_sample=3))
    assert groups(samples) == [[0, 1], [2], [3]]


def test_random_group_sizes_are_seeded_and_cover_every_row(tmp_path, tok):
    table = flat_table(tmp_path, ["the cat"] * 40)
    g = Grouping(min_branches_per_sample=2, max_branches_per_sample=5, seed=3)
    a, _ = make_samples(table, tok, g)
    b, _ = make_samples(table, tok, g)
    c, _ = make_samples(table, tok, Grouping(min_branches_per_sample=2, max_branches_per_sample=5, seed=4))
    assert groups(a) == groups(b) != groups(c)
    assert [p for s in a for p in s.rows] == list(range(40))
    assert all(2 <= len(s.rows) <= 5 for s in a[:-1]) and len({len(s.rows) for s in a}) > 2


def test_token_budget_closes_groups(tmp_path, tok):
    table = flat_table(tmp_path, ["the cat is big", "a dog", "the old red house", "sun", "the sea"])  # 4 2 4 1 2
    samples, _ = make_samples(table, tok, Grouping(branches_per_sample=10, max_total_tokens=6))
    assert groups(samples) == [[0, 1], [2, 3], [4]]
    assert [s.num_tokens for s in samples] == [6, 5, 2]


def test_a_branch_over_budget_is_an_error_or_skipped(tmp_path, tok):
    table = flat_table(tmp_path, ["the cat", "the cat is big and old", "a dog"])
    with pytest.raises(PMAccelError, match=r"flat\.jsonl:2: text: the branch has 6 prompt tokens, more than "
                                           r"max_total_tokens=4"):
        make_samples(table, tok, Grouping(branches_per_sample=2, max_total_tokens=4))
    samples, skipped = make_samples(table, tok, Grouping(branches_per_sample=2, max_total_tokens=4, on_error="skip"))
    assert groups(samples) == [[0, 2]] and [s.number for s in skipped] == [2]


def test_a_branch_without_tokens_is_an_error(tmp_path, tok):
    table = flat_table(tmp_path, ["the cat", ""])
    with pytest.raises(PMAccelError, match=r"flat\.jsonl:2: text: branch is empty after tokenization"):
        make_samples(table, tok, Grouping())


def test_max_samples_stops_early_and_ignores_later_rows(tmp_path, tok):
    rows = [{"text": "the cat"}, {"text": "a dog"}, {"text": "sun"}, {"text": ""}, {"branches": "x"}]
    table = read_rows(write_jsonl(tmp_path / "r.jsonl", rows), on_error="skip")
    samples, skipped = make_samples(table, tok, Grouping(branches_per_sample=2, max_samples=1, on_error="skip"))
    assert groups(samples) == [[0, 1]] and skipped == []
    samples, skipped = make_samples(table, tok, Grouping(branches_per_sample=2, on_error="skip"))
    assert groups(samples) == [[0, 1], [2]] and [s.number for s in skipped] == [4, 5]


def test_chat_template_counts_the_templated_branch(tmp_path, tok):
    tok = make_tokenizer()
    tok.chat_template = "{% for m in messages %}the {{ m['content'] }} is{% endfor %}"
    table = flat_table(tmp_path, ["cat", "dog"])
    samples, _ = make_samples(table, tok, Grouping(branches_per_sample=2, chat_template=True))
    assert samples[0].num_tokens == 6


def test_rows_of_the_example_file_make_samples(tok):
    samples, skipped = make_samples(read_rows(None), tok, Grouping())
    assert len(samples) == len(read_rows(None).rows) and not skipped
    assert Path(example_path()).read_text().count("\n") == len(samples)


def test_batched_token_counts_equal_one_sample_at_a_time(tmp_path, monkeypatch):
    """Rows are tokenized a chunk per tokenizer call; every sample's count is what tokenize_sample gives it."""
    from helpers_infer import make_tokenizer

    import pmaccel.grouping
    from pmaccel.samples import tokenize_sample

    monkeypatch.setattr(pmaccel.grouping, "TOKENIZE_BATCH", 3)  # several chunks, a row split from its group
    tok = make_tokenizer()
    rows = MIXED_ROWS + [{"main": "", "branches": [{"input_ids": [5, 6]}, "the cat", {"text": "a red sun"}]},
                         {"text": "one two three"}, {"input_ids": [7, 8, 9]}]
    table = read_rows(write_jsonl(tmp_path / "rows.jsonl", rows))
    samples, skipped = make_samples(table, tok, Grouping(branches_per_sample=2))
    assert not skipped and samples
    for s in samples:
        assert s.num_tokens == tokenize_sample(s.as_input(), tok).num_tokens


def test_an_empty_branch_is_named_when_counted_in_a_batch(tmp_path):
    from helpers_infer import make_tokenizer

    path = write_jsonl(tmp_path / "rows.jsonl", [{"branches": ["the cat", "   ", "a dog"]}])
    with pytest.raises(PMAccelError, match=r"rows.jsonl:1: branches\[1\]: branch is empty after tokenization"):
        make_samples(read_rows(path), make_tokenizer(), Grouping())


def test_the_token_table_holds_one_record_batch_per_tokenizer_call(tmp_path, monkeypatch):
    """Mapping a table touches every record batch's header (and the pages around it): the token table is
    written a call's rows per batch, not datasets' default of 1000 rows."""
    import pmaccel.grouping
    from pmaccel.grouping import tokenize_rows
    from pmaccel.rows import load_rows

    monkeypatch.setattr(pmaccel.grouping, "TOKENIZE_BATCH", 1500)
    rows = [{"branches": ["the cat", "a dog"]}] * 2500
    valid, _ = load_rows(write_jsonl(tmp_path / "rows.jsonl", rows)).check("raise")
    tokens = tokenize_rows(valid, make_tokenizer(), Grouping())
    assert [len(b) for b in tokens.data.to_batches()] == [1500, 1000]


def test_parallel_rows_only_are_one_sample_each_without_offsets(tmp_path, tok):
    from pmaccel.grouping import group_samples, tokenize_rows

    rows = [r for r in MIXED_ROWS if "branches" in r] * 3
    table = read_rows(write_jsonl(tmp_path / "rows.jsonl", rows))
    tokens = tokenize_rows(table.rows.data, tok, Grouping())
    for limit, n in ((None, len(rows)), (5, 5)):
        samples, _ = group_samples(table.rows, tokens, table.path, Grouping(max_samples=limit))
        assert samples.offsets is None and samples.positions is None, "no identity arrays held"
        assert [s.rows for s in samples] == [(i,) for i in range(n)]
        assert [s.branches for s in samples] == [r.branches for r in table.rows][:n]
        assert samples.num_branches.tolist() == [len(r["branches"]) for r in rows][:n]
        assert samples.num_branches.dtype == np.int8 and samples.num_tokens.dtype == np.int8  # short prompts
        assert not samples.flat.any() and samples.flat.strides == (0,) and len(samples.flat) == n  # nothing held


def test_sample_counts_are_kept_in_the_narrowest_type_that_holds_them():
    from pmaccel.grouping import _narrowest

    column = np.array([3, 127, 0, 40_000, 128], dtype=np.int32)
    for values, dtype in ((column[:2], np.int8), (column[:5:4], np.int16), (column, np.int32),
                          (np.array([2**31], dtype=np.int64), np.int64), (column[:0], np.int8)):
        got = _narrowest(values)
        assert got.dtype == dtype and got.tolist() == values.tolist() and not np.shares_memory(got, column)
    assert (-_narrowest(column[:2])).tolist() == [-3, -127]  # negated for a longest-first order: no wrap-around


def test_flat_rows_are_grouped_over_token_counts_read_in_chunks(tmp_path, tok, monkeypatch):
    import pmaccel.grouping

    table = read_rows(write_jsonl(tmp_path / "rows.jsonl", MIXED_ROWS * 3))
    grouping = Grouping(min_branches_per_sample=1, max_branches_per_sample=3, seed=5)
    expected = make_samples(table, tok, grouping)[0]
    monkeypatch.setattr(pmaccel.grouping, "GROUP_CHUNK", 2)
    got = make_samples(table, tok, grouping)[0]
    assert groups(got) == groups(expected) and [s.num_tokens for s in got] == [s.num_tokens for s in expected]
    assert sorted(p for s in got for p in s.rows) == list(range(len(MIXED_ROWS) * 3))
