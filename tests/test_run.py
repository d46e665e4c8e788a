"""pmaccel.run: the job runner with a job of its own (no decoding): every input row gets one record, in
input order, whatever order the job finishes its samples in and however many processes share them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers_infer import MIXED_ROWS, launch, write_jsonl

from pmaccel import output
from pmaccel.errors import PMAccelError
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


def test_a_run_in_its_own_process_gives_the_same_records_and_errors(tiny, tmp_path):
    """``run_job(own_process=True)``: what a GPU machine's in-process ``infer()`` does to keep CUDA out of the
    caller (``spares_cuda``); the records, the file and a bad input's error are those of a run in this process."""
    from pmaccel.inference import GenerateJob

    data = write_jsonl(tmp_path / "rows.jsonl", MIXED_ROWS)
    common = dict(base_model=str(tiny), data_path=str(data), branches_per_sample=2, max_new_tokens=5)
    here = run_job(run_settings(None, dict(common, out_path=str(tmp_path / "here.jsonl"))), GenerateJob())
    there = run_job(run_settings(None, dict(common, out_path=str(tmp_path / "there.jsonl"))), GenerateJob(),
                    own_process=True)
    assert list(there) == list(here) and there.summary.samples == here.summary.samples
    assert (tmp_path / "there.jsonl").read_bytes() == (tmp_path / "here.jsonl").read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the cat"}\n{"text": "a dog"\n')
    with pytest.raises(PMAccelError) as here_error:
        run_job(run_settings(None, dict(common, data_path=str(bad), out_path=str(tmp_path / "b1.jsonl"))),
                GenerateJob())
    with pytest.raises(PMAccelError) as there_error:
        run_job(run_settings(None, dict(common, data_path=str(bad), out_path=str(tmp_path / "b2.jsonl"))),
                GenerateJob(), own_process=True)
    assert str(there_error.value) == str(here_error.value).replace("b1.jsonl", "b2.jsonl")
    assert there_error.value.row == 2 and not any(tmp_path.glob("b2.jsonl*"))


def test_a_run_in_its_own_process_has_the_kernels_compiled_beside_it(tiny, tmp_path, monkeypatch):
    """As the CLI does, ``run_job(own_process=True)`` starts ``pmaccel.warmup``'s side process (where it applies)
    before its run's process, and ends it once that is over."""
    from pmaccel import warmup
    from pmaccel.inference import GenerateJob

    events = []
    monkeypatch.setattr(warmup, "start", lambda settings: events.append(("start", settings.base_model)) or "side")
    monkeypatch.setattr(warmup, "stop", lambda side: events.append(("stop", side, (tmp_path / "o.jsonl").exists())))
    data = write_jsonl(tmp_path / "rows.jsonl", MIXED_ROWS[:2])
    run_job(run_settings(None, dict(base_model=str(tiny), data_path=str(data), out_path=str(tmp_path / "o.jsonl"),
                                    max_new_tokens=2)), GenerateJob(), own_process=True)
    assert events == [("start", str(tiny)), ("stop", "side", True)]


def test_a_run_in_this_process_has_the_kernels_compiled_beside_it(tiny, tmp_path, monkeypatch):
    """A script's (or a launched rank's) ``infer()`` with its imports ahead of it: ``run_job`` starts the side
    process where no caller did, and ends it with the run, also when the run ends on an input error. A process
    that has imported transformers already compiles in its own threads and starts none."""
    from pmaccel import run, warmup
    from pmaccel.inference import GenerateJob

    monkeypatch.setattr(run, "_imports_ahead", lambda: True)  # this test process has imported transformers
    events = []
    monkeypatch.setattr(warmup, "start", lambda settings: events.append(("start", settings.base_model)) or "side")
    monkeypatch.setattr(warmup, "stop", lambda side: events.append(("stop", side, (tmp_path / "o.jsonl").exists())))
    data = write_jsonl(tmp_path / "rows.jsonl", MIXED_ROWS[:2])
    common = dict(base_model=str(tiny), out_path=str(tmp_path / "o.jsonl"), max_new_tokens=2)
    run_job(run_settings(None, dict(data_path=str(data), **common)), GenerateJob(), own_process=False)
    assert events == [("start", str(tiny)), ("stop", "side", True)]
    (tmp_path / "o.jsonl").unlink()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 5}\n')
    with pytest.raises(PMAccelError):
        run_job(run_settings(None, dict(data_path=str(bad), **common)), GenerateJob(), own_process=False)
    assert events[2:] == [("start", str(tiny)), ("stop", "side", False)]
    monkeypatch.setattr(run, "_imports_ahead", lambda: False)
    run_job(run_settings(None, dict(data_path=str(data), **common)), GenerateJob(), own_process=False)
    assert events[4:] == [("stop", None, True)]


def test_imports_are_ahead_of_a_process_until_it_imports_transformers():
    """What ``run_job`` asks before it starts a side process, in a fresh process: pmaccel's public API imports no
    transformers, a script's own import of it does."""
    code = ("import sys; from pmaccel import infer, score; from pmaccel import run; a = run._imports_ahead(); "
            "import transformers; sys.exit(10 * a + run._imports_ahead())")
    child = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert child.returncode == 10


def test_only_an_interactive_unlaunched_process_that_has_not_started_cuda_hands_its_run_to_a_child(monkeypatch):
    import torch
    from accelerate.state import PartialState

    from pmaccel import run
    from pmaccel.run import LAUNCHED_ENV, spares_cuda
    from pmaccel.settings import Settings

    for name in LAUNCHED_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(PartialState, "_shared_state", {})  # no Accelerate program around (an earlier test's state)
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    gpus, started = [2], [False]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus[0])
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: started[0])
    assert not spares_cuda(Settings()), "a script (here pytest) runs in its own process"
    monkeypatch.setattr(run, "_interactive", lambda: True)  # a notebook's kernel, a Python prompt
    assert spares_cuda(Settings())
    assert not spares_cuda(Settings(device="cpu"))
    started[0] = True  # the caller uses CUDA already: nothing left to spare
    assert not spares_cuda(Settings())
    started[0], gpus[0] = False, 0  # no GPU
    assert not spares_cuda(Settings())
    gpus[0] = 2
    monkeypatch.setenv("LOCAL_RANK", "0")  # started by a launcher
    assert not spares_cuda(Settings())


def test_the_resume_checks_are_split_among_the_processes_of_a_machine(tmp_path, monkeypatch):
    """Each process of a machine computes the keys of its share of the results found in the part files (they
    all see the same files); together, after ``agree_on_done``, they find every one."""
    from types import SimpleNamespace

    import numpy as np

    from pmaccel.output import PartWriter, part_path
    from pmaccel.run import _resume_state
    from pmaccel.settings import Settings

    out = tmp_path / "out.jsonl"
    key = lambda i: f"{i:016x}" * 2  # noqa: E731
    with PartWriter(part_path(out, 0, 1)) as w:
        w.append((i, key(i), {"x": i}) for i in (0, 2, 3, 5, 8, 9, 11))

    class Table:  # 12 samples; take() gives what the keys need
        def __len__(self):
            return 12

        def take(self, indices, with_ids):
            return [SimpleNamespace(index=int(i)) for i in indices]

    table = Table()
    asked: dict[int, list[int]] = {}
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    found = np.zeros(12, dtype=bool)
    for local in range(3):
        monkeypatch.setenv("LOCAL_RANK", str(local))
        ranks = SimpleNamespace(wait_for_everyone=lambda: None)
        keys = SimpleNamespace(of=lambda samples, local=local: asked.setdefault(local, []).extend(
            s.index for s in samples) or [key(s.index) for s in samples])
        found |= _resume_state(Settings(), ranks, out, table, keys)
    assert sorted(i for got in asked.values() for i in got) == [0, 2, 3, 5, 8, 9, 11]  # each key computed once
    assert all(i % 3 == local for local, got in asked.items() for i in got)  # sample i: process i % 3
    assert np.flatnonzero(found).tolist() == [0, 2, 3, 5, 8, 9, 11]


def test_a_share_runs_longest_first_within_windows_and_every_sample_once(monkeypatch):
    import numpy as np

    from pmaccel import run

    monkeypatch.setattr(run, "SORT_WINDOW", 5)
    rng = np.random.default_rng(0)
    num_tokens = rng.integers(1, 9, size=40).astype(np.int32)
    share = np.sort(rng.choice(40, size=23, replace=False)).astype(np.int32)
    order = run._longest_first(share, num_tokens)
    assert sorted(order.tolist()) == share.tolist() and order.dtype == share.dtype
    for at in range(0, 23, 5):  # each window: its own samples, longest first, ties in share order
        window = share[at:at + 5].tolist()
        assert order[at:at + 5].tolist() == sorted(window, key=lambda i: -num_tokens[i])
    assert run._longest_first(share[:0], num_tokens).tolist() == []
