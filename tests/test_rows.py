"""Input rows (SPEC §1, §11): every format, and the row checks with file:row messages."""

from __future__ import annotations

import json

import datasets
import pytest
from helpers_infer import MIXED_ROWS, make_tokenizer, write_jsonl

from pmaccel.errors import PMAccelError
from pmaccel.rows import example_path, read_rows


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def summary(table):
    return [(r.number, r.flat, r.main, r.branches, r.fields.get("id")) for r in table.rows]


# ----------------------------------------------------------------------------- formats


def test_jsonl_keeps_rows_as_given(tmp_path):
    table = read_rows(write_jsonl(tmp_path / "rows.jsonl", MIXED_ROWS))
    assert [r.fields for r in table.rows] == MIXED_ROWS  # own keys, own order, answer_offset carried
    assert [r.flat for r in table.rows] == [False] * 4 + [True] * 6
    assert table.rows[1].branches == ["the capital of france is", {"text": "the capital of italy is"}]
    assert table.rows[3].branches == [{"input_ids": [10, 11, 12]}, "start to read"]
    assert [r.key for r in table.rows[4:6]] == ["text", "prompt"] and table.rows[7].branches == [
        {"input_ids": [20, 21, 22, 23]}]


def test_blank_lines_are_skipped_and_numbers_are_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert [r.number for r in read_rows(path).rows] == [1, 3]


def test_json_array_file(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(MIXED_ROWS, indent=2))
    table = read_rows(path)
    assert [r.fields for r in table.rows] == MIXED_ROWS and [r.number for r in table.rows] == list(range(1, 11))


FLAT = [{"id": i, "text": f"the {w} is big"} for i, w in enumerate(["cat", "dog", "sea", "sun", "moon"])]
PARALLEL = [{"id": i, "main": "once upon a time", "branches": ["a cat", "a dog", f"{i} birds"]} for i in range(3)]


@pytest.mark.parametrize("rows", [FLAT, PARALLEL], ids=["flat", "parallel"])
@pytest.mark.parametrize("fmt", ["parquet", "csv", "arrow", "saved", "saved_dict", "json"])
def test_every_format_reads_the_same_rows(tmp_path, fmt, rows):
    ds = datasets.Dataset.from_list(rows)
    if fmt == "parquet":
        path = tmp_path / "rows.parquet"
        ds.to_parquet(path)
    elif fmt == "csv":
        if "branches" in rows[0]:  # a CSV cell holds the branch list as JSON
            ds = datasets.Dataset.from_list([{**r, "branches": json.dumps(r["branches"])} for r in rows])
        path = tmp_path / "rows.csv"
        ds.to_csv(path, index=False)
    elif fmt == "arrow":
        ds.save_to_disk(tmp_path / "saved")
        path = next((tmp_path / "saved").glob("*.arrow"))
    elif fmt == "saved":
        path = tmp_path / "saved"
        ds.save_to_disk(path)
    elif fmt == "saved_dict":
        path = tmp_path / "saved"
        datasets.DatasetDict({"train": ds}).save_to_disk(path)
    else:
        path = write_jsonl(tmp_path / "rows.jsonl", rows)
    reference = read_rows(write_jsonl(tmp_path / "ref.jsonl", rows))
    assert summary(read_rows(path)) == summary(reference)


def test_csv_cells_hold_input_ids_as_json_lists(tmp_path):
    rows = [{"id": 0, "input_ids": [5, 6, 7]}, {"id": 1, "input_ids": [8], "target": [9, 10]},
            {"id": 2, "branches": [{"input_ids": [11, 12]}, "a cat"]}]
    path = tmp_path / "rows.csv"
    path.write_text('id,input_ids,target,branches\n0,"[5, 6, 7]",,\n1,[8],"[9, 10]",\n'
                    '2,,,"[{""input_ids"": [11, 12]}, ""a cat""]"\n')
    got = read_rows(path).rows
    assert [r.branches for r in got] == [[{"input_ids": [5, 6, 7]}], [{"input_ids": [8], "target": [9, 10]}],
                                         [{"input_ids": [11, 12]}, "a cat"]]
    assert [r.branches for r in got] == [r.branches for r in read_rows(write_jsonl(tmp_path / "r.jsonl", rows)).rows]


def test_parquet_branches_of_mixed_kinds_are_normalised(tmp_path):
    # Arrow unifies {"text"} and {"input_ids"} structs into one struct with nulls
    rows = [{"branches": [{"text": "a cat"}, {"input_ids": [5, 6]}]}, {"branches": [{"text": "a dog"}]}]
    path = tmp_path / "rows.parquet"
    datasets.Dataset.from_list(rows).to_parquet(path)
    assert [r.branches for r in read_rows(path).rows] == [[{"text": "a cat"}, {"input_ids": [5, 6]}],
                                                          [{"text": "a dog"}]]


def test_default_is_the_shipped_example():
    table = read_rows(None)
    assert table.path == str(example_path()) and len(table.rows) >= 3
    assert all(not r.flat and len(r.branches) >= 2 for r in table.rows)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("lines, expected", [
    (['{"text": "a"}', '{"text": "b",', '{"text": "c"}'], ":2: malformed JSON"),
    (['{"text": "a"}', '{"id": 3}'], ":2: the row has neither 'branches'"),
    (['{"branches": "a cat"}'], ":1: branches: branches must be a list, got a string"),
    (['{"branches": {"text": "x"}}'], ":1: branches: branches must be a list"),
    (['{"branches": ["a", 7]}'], ":1: branches[1]: a branch must be a string"),
    (['{"branches": ["a", {"txt": "b"}]}'], ":1: branches[1]: a branch must be a string"),
    (['{"branches": [{"input_ids": [1, "2"]}]}'], ":1: branches[0]: input_ids must be a list of integers"),
    (['{"branches": []}'], ":1: branches: branches is empty"),
    (['{"main": 3, "branches": ["a"]}'], ":1: main: main must be a string"),
    (['{"text": 5}'], ":1: text: a branch must be a string"),
    (['[1, 2]'], ":1: a row must be a JSON object"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, lines, expected):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(PMAccelError) as e:
        read_rows(path)
    assert str(e.value).startswith(str(path) + expected) and "\n" not in str(e.value)


def test_broken_json_array_names_the_line(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n {"text": "a"},\n {"text": "b"\n]\n')
    with pytest.raises(PMAccelError, match=r"rows\.json:4: malformed JSON"):
        read_rows(path)


@pytest.mark.parametrize("name, expected", [
    ("missing.jsonl", "data file not found"), ("rows.txt", "unsupported data format '.txt'"),
    ("adir", "a directory must be a dataset written by Dataset.save_to_disk"),
])
def test_bad_paths(tmp_path, name, expected):
    path = tmp_path / name
    if name == "rows.txt":
        path.write_text("hello\n")
    if name == "adir":
        path.mkdir()
    with pytest.raises(PMAccelError, match=expected):
        read_rows(path)


def test_skip_records_bad_rows_and_keeps_the_rest(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b",\n{"branches": "x"}\n{"text": "c"}\n')
    table = read_rows(path, on_error="skip")
    assert [r.number for r in table.rows] == [1, 4]
    assert [(s.number, s.error.split(": ", 2)[1]) for s in table.skipped] == [(2, "malformed JSON"), (3, "branches")]
    assert table.skipped[0].content == '{"text": "b",' and table.skipped[1].content == {"branches": "x"}


def test_read_columns_fills_one_array_per_column_as_the_table_holds_them(tmp_path):
    """Columns read batch by batch from the cache files (several files, several record batches each) equal
    the table's own columns, in a narrower dtype when asked; a selection is read through the table."""
    import numpy as np

    from pmaccel.rows import read_columns

    data = datasets.Dataset.from_dict({"n": list(range(-5, 2495)), "flag": [i % 3 == 0 for i in range(2500)],
                                       "text": [None if i % 7 else "x" for i in range(2500)]})
    parts = []
    for k in range(3):
        path = str(tmp_path / f"part{k}.arrow")
        data.shard(3, k, contiguous=True).map(lambda b: b, batched=True, batch_size=300, writer_batch_size=300,
                                              cache_file_name=path)
        parts.append(datasets.Dataset.from_file(path))
    mapped = datasets.concatenate_datasets(parts)
    assert len(mapped.cache_files) == 3 and len(mapped.data.to_batches()) > 3
    n, flag, text = np.arange(-5, 2495), np.arange(2500) % 3 == 0, np.arange(2500) % 7 == 0
    for table, rows in ((mapped, slice(None)), (mapped.select(range(10, 2000)), slice(10, 2000))):
        got = read_columns(table, ["n", "flag"], valid=["text"], dtypes={"n": np.int32})
        assert got["n"].dtype == np.int32 and got["flag"].dtype == bool and got["text"].dtype == bool
        assert got["n"].tolist() == n[rows].tolist() and got["flag"].tolist() == flag[rows].tolist()
        assert got["text"].tolist() == text[rows].tolist()
