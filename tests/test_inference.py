"""infer() end to end on a tiny random Llama: records, resume after a crash, notebook_launcher, OOM retry,
skipped rows, and no partial output on error (SPEC §7, §11)."""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers_infer import MIXED_ROWS, launch, read_jsonl, write_jsonl

import pmaccel
import pmaccel.decode
from pmaccel.errors import PMAccelError
from pmaccel.inference import infer
from pmaccel.settings import Settings


@pytest.fixture
def run(tiny, mixed, tmp_path):
    """``run(name, **overrides)``: infer on the mixed rows (7 samples) into ``tmp_path/name``."""

    def _run(name="out.jsonl", **overrides):
        kwargs = dict(base_model=str(tiny), data_path=str(mixed), out_path=str(tmp_path / name),
                      branches_per_sample=2, max_new_tokens=8, batch_size=2)
        return infer(**{**kwargs, **overrides})

    return _run


@pytest.fixture
def reference(run, tmp_path):
    """The bytes of an uninterrupted run (greedy)."""
    run("reference.jsonl")
    return (tmp_path / "reference.jsonl").read_bytes()


DECODE_STREAM = pmaccel.decode.decode_stream


def stream_counting(monkeypatch, fail_after=None, error=None):
    """Wrap ``pmaccel.decode.decode_stream``: count the samples it yields; raise ``error`` once
    ``fail_after`` samples have finished."""
    real = DECODE_STREAM
    seen = {"calls": 0, "samples": 0}

    def wrapped(*args, **kwargs):
        seen["calls"] += 1
        for item in real(*args, **kwargs):
            if seen["samples"] == fail_after:
                raise error
            seen["samples"] += 1
            yield item

    monkeypatch.setattr(pmaccel.decode, "decode_stream", wrapped)
    return seen


def parts(tmp_path, name="out.jsonl"):
    return sorted(tmp_path.glob(f"{name}.part-*"))


# ----------------------------------------------------------------------------- records


def test_records_are_the_rows_plus_their_outputs(run, tmp_path):
    records = run()
    assert records == read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in records] == [r["id"] for r in MIXED_ROWS]
    for row, rec in zip(MIXED_ROWS, records):
        assert {k: rec[k] for k in row} == row  # the row's own fields, unchanged, first
        if "branches" in row:
            assert list(rec)[len(row):] == ["outputs", "finish_reasons", "num_generated_tokens"]
            assert len(rec["outputs"]) == len(row["branches"])
            assert all(f in ("stop", "length") for f in rec["finish_reasons"])
        else:
            assert list(rec)[len(row):] == ["output", "finish_reason", "num_generated_tokens"]
            assert isinstance(rec["output"], str) and 0 <= rec["num_generated_tokens"] <= 8
    s = records.summary
    assert (s.rows, s.samples, s.branches, s.skipped_rows, s.samples_computed, s.samples_resumed) == (10, 7, 15, 0, 7, 0)
    assert s.generated_tokens == sum(sum(n) if isinstance(n, list) else n
                                     for n in (r["num_generated_tokens"] for r in records))
    assert not parts(tmp_path) and not (tmp_path / "out.jsonl.errors.jsonl").exists()


def test_outputs_match_generate_on_the_grouped_samples(run, tiny):
    """The file holds exactly what pmaccel.generate gives for the samples (independent of batching)."""
    records = run(batch_size=3, batch_by_samples=False)
    model, tok = pmaccel.load_model(str(tiny), device="cpu")
    p = MIXED_ROWS
    samples = [{"main": r.get("main", ""), "branches": r["branches"]} for r in p[:4]]
    flat = [r.get("text") or r.get("prompt") or {"input_ids": r["input_ids"]} for r in p[4:]]
    samples += [{"main": "", "branches": flat[i:i + 2]} for i in (0, 2, 4)]
    expected = pmaccel.decode.generate(model, tok, samples, max_new_tokens=8, batch_size=1)
    outputs = [r["outputs"] for r in records[:4]] + [[records[i]["output"], records[i + 1]["output"]]
                                                     for i in (4, 6, 8)]
    assert outputs == [e["outputs"] for e in expected]


def test_a_second_run_in_the_same_process_and_max_samples(run, tmp_path):
    records = run(max_samples=5)
    assert [r["id"] for r in records] == ["p0", "p1", "p2", "p3", "f0", "f1"]
    assert records.summary.samples == 5


def test_public_infer_is_the_function_after_every_module_is_imported():
    for name in ("pmaccel.run", "pmaccel.inference", "pmaccel.cli", "pmaccel.decode", "pmaccel.widget"):
        importlib.import_module(name)
    assert pmaccel.infer is infer


# ----------------------------------------------------------------------------- resume


def test_resume_after_a_crash_recomputes_only_the_unfinished_samples(run, reference, tmp_path, monkeypatch):
    seen = stream_counting(monkeypatch, fail_after=4, error=RuntimeError("injected fault"))
    (tmp_path / "out.jsonl").write_text("old output\n")
    with pytest.raises(RuntimeError, match="injected fault"):
        run()
    assert seen["samples"] == 4  # four samples finished before the fault
    assert (tmp_path / "out.jsonl").read_text() == "old output\n", "the old output is untouched"
    [part] = parts(tmp_path)
    assert len(part.read_text().splitlines()) == 4

    seen = stream_counting(monkeypatch)
    records = run()  # resume is on by default when part files exist
    assert seen["samples"] == 3 and records.summary.samples_computed == 3 and records.summary.samples_resumed == 4
    assert (tmp_path / "out.jsonl").read_bytes() == reference
    assert not parts(tmp_path)


def test_a_line_cut_by_a_crash_is_ignored(run, reference, tmp_path, monkeypatch):
    stream_counting(monkeypatch, fail_after=2, error=RuntimeError("injected fault"))
    with pytest.raises(RuntimeError):
        run()
    [part] = parts(tmp_path)
    whole = part.read_text()
    part.write_text(whole + whole.splitlines()[0][:25])  # half a line, no newline
    seen = stream_counting(monkeypatch)
    records = run()
    assert seen["samples"] == 5 and records.summary.samples_resumed == 2
    assert (tmp_path / "out.jsonl").read_bytes() == reference


def test_resume_on_another_number_of_processes(run, reference, tmp_path, tiny, mixed, monkeypatch):
    stream_counting(monkeypatch, fail_after=2, error=RuntimeError("injected fault"))
    with pytest.raises(RuntimeError):
        run()
    monkeypatch.undo()
    assert len(parts(tmp_path)) == 1
    launch(pmaccel.infer, 3, base_model=str(tiny), data_path=str(mixed), out_path=str(tmp_path / "out.jsonl"),
           branches_per_sample=2, max_new_tokens=8, batch_size=2)
    assert (tmp_path / "out.jsonl").read_bytes() == reference and not parts(tmp_path)


def test_results_from_other_settings_are_not_reused(run, tmp_path, monkeypatch):
    stream_counting(monkeypatch, fail_after=4, error=RuntimeError("injected fault"))
    with pytest.raises(RuntimeError):
        run(max_new_tokens=4)
    seen = stream_counting(monkeypatch)
    records = run(batch_size=7)  # max_new_tokens differs; batch_size never changes a result
    assert seen["samples"] == 7 and records.summary.samples_resumed == 0


def test_results_of_another_dtype_are_not_reused(run, reference, tmp_path, monkeypatch):
    import pmaccel.model

    # "auto" is float32 on the CPU and bf16 on a GPU: the same settings, other numbers
    monkeypatch.setattr(pmaccel.model, "resolve_dtype", lambda dtype, device=None: torch.bfloat16)
    stream_counting(monkeypatch, fail_after=4, error=RuntimeError("injected fault"))
    with pytest.raises(RuntimeError):
        run()
    monkeypatch.undo()
    seen = stream_counting(monkeypatch)
    records = run()
    assert seen["samples"] == 7 and records.summary.samples_resumed == 0
    assert (tmp_path / "out.jsonl").read_bytes() == reference  # no bf16 result in the float32 file


def test_no_resume_starts_over(run, tmp_path, monkeypatch):
    stream_counting(monkeypatch, fail_after=4, error=RuntimeError("injected fault"))
    with pytest.raises(RuntimeError):
        run()
    seen = stream_counting(monkeypatch)
    records = run(resume=False)
    assert seen["samples"] == 7 and records.summary.samples_computed == 7 and not parts(tmp_path)


# ----------------------------------------------------------------------------- launchers, OOM


def test_notebook_launcher_and_a_plain_call_write_the_same_file(run, reference, tiny, mixed, tmp_path):
    from accelerate import notebook_launcher

    settings = Settings(base_model=str(tiny), data_path=str(mixed), out_path=str(tmp_path / "nb.jsonl"),
                        branches_per_sample=2, max_new_tokens=8, batch_size=2)
    assert notebook_launcher(infer, (settings,), num_processes=1) is None
    assert (tmp_path / "nb.jsonl").read_bytes() == reference


def test_out_of_memory_halves_the_pool_and_goes_on(run, reference, tmp_path, monkeypatch):
    import pmaccel.engine

    real = pmaccel.engine.Runner.prefill
    rows = []

    def prefill(self, packs, *args, **kwargs):
        rows.append(self.R)
        if len(rows) == 2:  # the second admission, after the first samples finished
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(self, packs, *args, **kwargs)

    monkeypatch.setattr(pmaccel.engine.Runner, "prefill", prefill)
    run(batch_size=4, name="out.jsonl")
    assert rows[:2] == [4, 4] and set(rows[2:]) == {2}, rows  # the pool goes on with half the rows
    assert (tmp_path / "out.jsonl").read_bytes() == reference
    assert not parts(tmp_path)


def test_out_of_memory_while_allocating_the_pool_halves_it(run, reference, tmp_path, monkeypatch):
    import pmaccel.engine

    real = pmaccel.engine.Runner.__init__
    sizes = []

    def init(self, model, opts, R, *args, **kwargs):
        sizes.append(R)
        if len(sizes) == 1:  # the first pool does not fit
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        real(self, model, opts, R, *args, **kwargs)

    monkeypatch.setattr(pmaccel.engine.Runner, "__init__", init)
    run(batch_size=4, name="out.jsonl")
    assert sizes == [4, 2], sizes
    assert (tmp_path / "out.jsonl").read_bytes() == reference


# ----------------------------------------------------------------------------- bad input


def test_skipped_rows_go_to_the_errors_file(tiny, tmp_path):
    rows = [{"id": 0, "text": "the cat"}, {"id": 1, "branches": "a dog"}, {"id": 2, "text": ""},
            {"id": 3, "text": "the sea"}]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "out.jsonl"
    records = infer(base_model=str(tiny), data_path=str(data), out_path=str(out), on_error="skip", max_new_tokens=4)
    assert [r["id"] for r in records] == [0, 3] and records.summary.skipped_rows == 2
    errors = read_jsonl(tmp_path / "out.jsonl.errors.jsonl")
    assert [(e["row"], e["input"]["id"]) for e in errors] == [(2, 1), (3, 2)]
    assert errors[0]["error"] == f"{data}:2: branches: branches must be a list, got a string"
    assert "text: branch is empty after tokenization" in errors[1]["error"]


def test_a_bad_row_found_after_the_model_loads_leaves_no_output(tiny, tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", [{"text": "the cat"}, {"text": "   "}])
    out = tmp_path / "sub" / "out.jsonl"
    with pytest.raises(PMAccelError, match=r"rows\.jsonl:2: text: branch is empty"):
        infer(base_model=str(tiny), data_path=str(data), out_path=str(out))
    assert list((tmp_path / "sub").iterdir()) == []


def test_unknown_setting_and_bad_positional():
    with pytest.raises(PMAccelError, match="^max_tokens: unknown setting"):
        infer(max_tokens=3)
    with pytest.raises(PMAccelError, match="must be a pmaccel.Settings, got dict"):
        infer({"data_path": "x"})
