"""pmaccel.run: the job runner with a job of its own (no decoding): every input row gets one record, in
input order, whatever order the job finishes its samples in and however many processes share them."""

from __future__ import annotations

import json

from helpers_infer import MIXED_ROWS, launch, write_jsonl

from pmaccel import output
from pmaccel.run import Job, run_job, run_settings


class BranchLengths(Job):
    """Per branch, the number of characters of its text (or of ids): a result without any model call."""

    name = "lengths"
    kind = "lengths"

    def run_samples(self, settings, model, tokenizer, samples, on_results):
        for i in reversed(range(len(samples))):  # finish in the opposite order
            s = samples[i]
            on_results([(i, {"length": [len(b) if isinstance(b, str) else len(b.get("text") or b["input_ids"])
                                        for b in s.branches]})])
        return {}

    def tokens(self, result):
        return sum(result["length"])

    def records(self, sample, rows, result, settings):
        return output.row_records(sample, rows, result, keys=["length"], parallel_keys=["lengths"],
                                  flat_keys=["length"])


def run(tiny, data, out, processes=1):
    def go(**kwargs):
        return run_job(run_settings(None, kwargs), BranchLengths())

    return launch(go, processes, base_model=str(tiny), data_path=str(data), out_path=str(out), branches_per_sample=2)


def test_one_record_per_row_in_input_order_at_any_process_count(tiny, tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", MIXED_ROWS)
    records = run(tiny, data, tmp_path / "one.jsonl")
    expected = []
    for row in MIXED_ROWS:
        if "branches" in row:
            lengths = [len(b) if isinstance(b, str) else len(b.get("text") or b["input_ids"]) for b in row["branches"]]
            expected.append({**row, "lengths": lengths})
        else:
            expected.append({**row, "length": len(row.get("text") or row.get("prompt") or row["input_ids"])})
    assert list(records) == expected and records.summary.job == "lengths" and records.summary.rows == len(MIXED_ROWS)
    run(tiny, data, tmp_path / "two.jsonl", processes=2)
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert json.loads((tmp_path / "one.jsonl.summary.json").read_text())["job"] == "lengths"
