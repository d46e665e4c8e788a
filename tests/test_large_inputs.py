"""Large inputs (SPEC §1, §7): rows read through HF ``datasets`` in worker processes, tokenized once and
cached, samples materialised a chunk at a time, results merged by the main process in chunks. Checked
against independent references: ``pmaccel.generate`` on samples built by hand, and a one-worker read."""

from __future__ import annotations

import json
import random

import datasets
import pytest
from helpers_infer import MIXED_ROWS, log_collectives, make_tokenizer, rank, write_jsonl
from helpers_infer import launch as launch_job

import pmaccel
import pmaccel.grouping
import pmaccel.rows
from pmaccel import output, run
from pmaccel.errors import PMAccelError
from pmaccel.grouping import Grouping, make_samples, tokenize_rows
from pmaccel.inference import infer
from pmaccel.rows import load_rows, read_rows
from pmaccel.samples import tokenize_sample


def launch(num_processes, **kwargs):
    return launch_job(infer, num_processes, **kwargs)


WORDS = "the a cat dog sea sun moon tree river city house book red blue green big small old new good".split()


def generated_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows of every documented shape, in runs: parallel rows whose branches mix strings, {"text"} and
    {"input_ids"}, and flat rows of text, prompt and input_ids; own keys carried."""
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, k)))

    def branch() -> object:
        kind = rng.randrange(3)
        return text(6) if kind == 0 else {"text": text(6)} if kind == 1 else {
            "input_ids": [rng.randrange(4, 60) for _ in range(rng.randint(1, 5))]}

    rows = []
    for i in range(n):
        if rng.random() < 0.4:
            rows.append({"id": i, "main": rng.choice(["", text(8)]), "branches": [branch() for _ in range(rng.randint(1, 4))],
                         "meta": {"k": i % 3}})
        else:
            key = rng.choice(["text", "prompt", "input_ids"])
            value = [rng.randrange(4, 60) for _ in range(3)] if key == "input_ids" else text(6)
            rows.append({key: value, "id": f"f{i}"})
    return rows


def expected_file(model, tok, rows: list[dict], per_sample: int, max_new_tokens: int) -> bytes:
    """The output an independent reading of the rows gives: samples grouped by hand (a parallel row alone,
    consecutive flat rows ``per_sample`` at a time), decoded with ``pmaccel.generate``, records written with
    ``json.dumps``."""
    samples, groups, flat = [], [], []

    def close():
        if flat:
            samples.append({"main": "", "branches": [
                {"input_ids": rows[p]["input_ids"]} if "input_ids" in rows[p] else rows[p].get("text", rows[p].get("prompt"))
                for p in flat]})
            groups.append(list(flat))
            flat.clear()

    for pos, row in enumerate(rows):
        if "branches" in row:
            close()
            samples.append({"main": row["main"], "branches": row["branches"]})
            groups.append([pos])
        else:
            flat.append(pos)
            if len(flat) == per_sample:
                close()
    close()
    results = pmaccel.generate(model, tok, samples, max_new_tokens=max_new_tokens, batch_size=8)
    lines = []
    for group, result in zip(groups, results):
        if len(group) == 1 and "branches" in rows[group[0]]:
            record = {**rows[group[0]], "outputs": result["outputs"], "finish_reasons": result["finish_reasons"],
                      "num_generated_tokens": result["num_generated_tokens"]}
            lines.append(record)
            continue
        for b, pos in enumerate(group):
            lines.append({**rows[pos], "output": result["outputs"][b], "finish_reason": result["finish_reasons"][b],
                          "num_generated_tokens": result["num_generated_tokens"][b]})
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines).encode()


def test_generated_rows_of_every_shape_give_the_reference_file_at_1_2_and_3_processes(tiny, tmp_path):
    rows = generated_rows(80)
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    model, tok = pmaccel.load_model(str(tiny), dtype="float32", device="cpu")
    expected = expected_file(model, tok, rows, per_sample=3, max_new_tokens=4)
    for n in (1, 2, 3):
        out = tmp_path / f"out{n}.jsonl"
        launch(n, base_model=str(tiny), data_path=str(data), out_path=str(out), branches_per_sample=3,
               max_new_tokens=4, num_workers=2 if n == 2 else 0)
        assert out.read_bytes() == expected, f"{n} processes"


# ----------------------------------------------------------------------------- reading in workers


def test_jsonl_read_in_byte_ranges_by_workers_numbers_every_line(tmp_path, monkeypatch):
    """Lines counted across range boundaries as a one-worker read counts them: blank lines, CRLF, a lone CR,
    a byte-order mark, a bad row."""
    monkeypatch.setattr(pmaccel.rows, "READ_SHARD_BYTES", 64)  # many ranges
    lines = [json.dumps(r) for r in MIXED_ROWS * 4]
    lines[5], lines[17] = "", '{"text": "broken"'
    body = "\r\n".join(lines[:9]) + "\n" + "\r".join(lines[9:12]) + "\n" + "\n".join(lines[12:]) + "\n"
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    one = load_rows(path, num_workers=0)
    two = load_rows(path, num_workers=2)
    assert len(two.data.cache_files) > 1, "read by several workers"
    assert two.data.to_list() == one.data.to_list()
    numbers = [r.number for r in read_rows(path, on_error="skip", num_workers=2).rows]
    assert numbers == [n for n in range(1, len(lines) + 1) if n not in (6, 18)]
    with pytest.raises(PMAccelError, match=r"rows\.jsonl:18: malformed JSON"):
        read_rows(path, num_workers=2)


def test_the_row_table_is_built_once_and_rebuilt_when_the_file_changes(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", MIXED_ROWS)
    first = load_rows(path)
    again = load_rows(path)
    assert again.data.cache_files == first.data.cache_files, "read from datasets' cache"
    write_jsonl(path, MIXED_ROWS[:3])
    changed = load_rows(path)
    assert len(changed) == 3 and changed.data.cache_files != first.data.cache_files


@pytest.mark.parametrize("fmt", ["csv", "parquet", "saved", "json"])
def test_every_format_carries_every_row_shape(tmp_path, fmt):
    """MIXED_ROWS (branches as strings, {"text"} and {"input_ids"}; flat text, prompt and input_ids) read from a
    table format (a column has one type: lists as JSON text in cells) or a JSON array, as from JSONL."""
    reference = read_rows(write_jsonl(tmp_path / "ref.jsonl", MIXED_ROWS)).rows
    if fmt == "json":
        path = tmp_path / "rows.json"
        path.write_text(json.dumps(MIXED_ROWS))
        assert [r.fields for r in read_rows(path).rows] == [r.fields for r in reference]
        return
    cells = [{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in MIXED_ROWS]
    columns = sorted({k for r in cells for k in r})
    ds = datasets.Dataset.from_list([{k: r.get(k) for k in columns} for r in cells])
    path = tmp_path / {"csv": "rows.csv", "parquet": "rows.parquet", "saved": "saved"}[fmt]
    {"csv": lambda: ds.to_csv(path, index=False), "parquet": lambda: ds.to_parquet(path),
     "saved": lambda: ds.save_to_disk(path)}[fmt]()
    got = read_rows(path).rows
    assert [(r.number, r.flat, r.main, r.branches, r.key) for r in got] == [
        (r.number, r.flat, r.main, r.branches, r.key) for r in reference]


def test_tokenized_once_in_workers_with_the_ids_of_tokenize_sample(tmp_path, monkeypatch):
    rows = generated_rows(300, seed=1)
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    tok = make_tokenizer()
    valid, _ = load_rows(path).check("raise")
    g = Grouping(vocab_size=len(tok))
    one = tokenize_rows(valid, tok, g)
    two = tokenize_rows(valid, tok, g, num_workers=2)
    assert one.to_list() == two.to_list()
    assert tokenize_rows(valid, tok, g).cache_files == one.cache_files, "a second call loads the cache"
    monkeypatch.setattr(pmaccel.grouping, "TOKENIZE_RANGE", 128)  # three ranges, each mapped on its own
    assert tokenize_rows(valid, tok, g, num_workers=2).to_list() == one.to_list()
    for row, got in zip(rows, one):
        sample = row if "branches" in row else {"branches": [
            {"input_ids": row["input_ids"]} if "input_ids" in row else row.get("text", row.get("prompt"))]}
        ts = tokenize_sample(sample, tok)
        assert (got["main_ids"], got["branch_ids"], got["num_tokens"]) == (ts.main, ts.branches, ts.num_tokens)


def test_max_samples_and_skipped_rows_as_before(tmp_path):
    rows = [{"text": "the cat"}, {"text": ""}, {"branches": "x"}, {"text": "a dog"}, {"text": "sun"}]
    table = read_rows(write_jsonl(tmp_path / "r.jsonl", rows), on_error="skip")
    samples, skipped = make_samples(table, make_tokenizer(), Grouping(branches_per_sample=2, on_error="skip"))
    assert [s.rows for s in samples] == [(0, 2), (3,)] and [s.number for s in skipped] == [2, 3]
    assert skipped[0].error.endswith("r.jsonl:2: text: branch is empty after tokenization; give it some text")


# ----------------------------------------------------------------------------- no rank holds every result


def test_a_table_read_through_is_mapped_afresh_every_remap_rows_with_the_same_rows(tmp_path, monkeypatch):
    """A view reading through its rows maps the table again each REMAP_ROWS rows (what a process has read
    then leaves its resident memory), strided reads as a resume's share does them included; the rows are
    the ones a fresh reading gives."""
    rows = generated_rows(100, seed=3)
    table = load_rows(write_jsonl(tmp_path / "rows.jsonl", rows))
    valid, skipped = table.check("raise")
    assert not skipped
    monkeypatch.setattr(pmaccel.rows, "REMAP_ROWS", 16)
    remaps = []
    real = pmaccel.rows.remap
    monkeypatch.setattr(pmaccel.rows, "remap", lambda owner, name: remaps.append(name) or real(owner, name))
    view = pmaccel.rows.RowsView(valid)
    strided = [p for k in range(4) for p in range(k, 100, 4)]  # 25 rows from each quarter of the table
    got = [row for start in range(0, 100, 8) for row in view.take(strided[start:start + 8])]
    assert len(remaps) == 6  # once more than 16 rows were read since the last: at 24, 40, 56, 72, 88 and 100
    assert [row.fields for row in got] == [rows[p] for p in strided]


def test_a_table_mapped_afresh_lets_the_old_mapping_go_first(tmp_path, monkeypatch):
    """``remap`` drops the last reference to the old mapping before the new one is opened (both at once held
    every record batch's header twice), and the new one holds the same rows."""
    import pickle
    import weakref
    from types import SimpleNamespace

    rows = generated_rows(30, seed=4)
    valid, _ = load_rows(write_jsonl(tmp_path / "rows.jsonl", rows)).check("raise")
    holder = SimpleNamespace(data=valid)
    old = weakref.ref(valid)
    del valid
    opened_with_old_alive = []
    real_loads = pickle.loads
    monkeypatch.setattr(pickle, "loads", lambda state: opened_with_old_alive.append(old() is not None)
                        or real_loads(state))
    pmaccel.rows.remap(holder, "data")
    assert opened_with_old_alive == [False] and old() is None
    assert [json.loads(text) for text in holder.data["fields"]] == rows


def test_a_rank_never_holds_the_full_result_set(tiny, tmp_path, monkeypatch):
    """Many small samples on 2 processes without a shared disk: each rank materialises its own samples only, a
    chunk at a time; results reach the main process only, a chunk at a time; no collective carries them all."""
    monkeypatch.setattr(run, "RUN_CHUNK", 16)
    monkeypatch.setattr(run, "MERGE_CHUNK", 16)
    rows = [{"id": i, "text": " ".join(WORDS[(i + k) % len(WORDS)] for k in range(3))} for i in range(200)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    common = dict(base_model=str(tiny), data_path=str(data), max_new_tokens=2, batch_size=8)
    launch(1, out_path=str(tmp_path / "one.jsonl"), **common)

    taken = tmp_path / "taken.jsonl"
    real_take = pmaccel.grouping.SampleTable.take

    def take(self, indices, rows=None, with_ids=True):
        with open(taken, "a") as f:
            f.write(json.dumps({"rank": rank(), "ids": with_ids, "n": [int(i) for i in indices]}) + "\n")
        return real_take(self, indices, rows, with_ids)

    monkeypatch.setattr(pmaccel.grouping.SampleTable, "take", take)
    seen = log_collectives(monkeypatch, str(tmp_path / "collectives.jsonl"))
    real_find = output.find_part_files
    monkeypatch.setattr(output, "find_part_files", lambda out: [
        p for p in real_find(out) if f".part-{rank():05d}-" in p.name])
    launch(2, out_path=str(tmp_path / "two.jsonl"), **common)
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()

    calls = [json.loads(line) for line in taken.read_text().splitlines()]
    decoded = {r: [i for c in calls if c["rank"] == r and c["ids"] for i in c["n"]] for r in (0, 1)}
    assert sorted(decoded[0]) == list(range(100)) and sorted(decoded[1]) == list(range(100, 200)), \
        "each rank materialises the samples of its own share for decoding, and only those"
    assert max(len(c["n"]) for c in calls) <= 16, "a chunk at a time"
    sent = [json.loads(c["payload"]) for c in seen() if c["kind"] == "to_main"]
    from_rank1 = [p for c, p in zip([c for c in seen() if c["kind"] == "to_main"], sent) if c["rank"] == 1]
    assert sum(len(p) for p in from_rank1) == 100 and max(len(p) for p in from_rank1) <= 16, \
        "rank 1's results reach the main process in chunks"
    assert not any('"outputs"' in c["payload"] for c in seen() if c["kind"] == "gather_object")


@pytest.mark.slow
def test_batched_ids_are_the_tokenizer_call_with_the_embedded_tokenizer(smollm2):
    """Rows are tokenized with the backend's ids alone where that is the tokenizer's own call: the same ids
    for the real byte-level BPE tokenizer (special-token text, unicode, spaces and newlines included)."""
    _, tok = smollm2
    texts = ["What is the capital of France?", "  leading and trailing  ", "ünïcödé ✓ 中文 🙂", "<|im_start|>user",
             "\n\nline\r\nbreaks\tand tabs", "a" * 300, " ".join(WORDS)]
    assert pmaccel.grouping._batch_ids(tok, texts) == tok(texts, add_special_tokens=False)["input_ids"]
