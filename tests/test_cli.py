"""The command line (SPEC §8, §11): --help, one-line errors with no output written, a run killed with
SIGKILL and resumed, and the console script / ``python -m`` on the shipped example with the embedded model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import helpers_infer
import huggingface_hub
import pytest
from helpers_infer import MIXED_ROWS, read_jsonl, repo_path, write_jsonl

import pmaccel.model
from pmaccel.cli import main
from pmaccel.inference import infer
from pmaccel.rows import example_path
from pmaccel.settings import Settings

ENV = {**os.environ, "PYTHONPATH": repo_path(), "OMP_NUM_THREADS": "1"}


def console_script() -> str:
    path = shutil.which("pmaccel", path=str(Path(sys.executable).parent))
    if path is None:
        pytest.skip("the pmaccel console script is not installed (pip install -e .)")
    return path


# ----------------------------------------------------------------------------- help


@pytest.mark.parametrize("how", ["console", "module"])
def test_help_lists_every_flag(how):
    command = [console_script()] if how == "console" else [sys.executable, "-m", "pmaccel"]
    proc = subprocess.run([*command, "--help"], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0
    for name in Settings.__dataclass_fields__:
        assert f"--{name}" in proc.stdout


# ----------------------------------------------------------------------------- bad input


def lines(*rows: str) -> str:
    return "".join(r + "\n" for r in rows)


BAD_INPUTS = {  # name: (file content or None for no file, extra flags, expected message after "pmaccel: error: ")
    "malformed_json": (lines('{"text": "the cat"}', '{"text": "a dog"'), [], "{data}:2: malformed JSON"),
    "no_branches_no_text": (lines('{"text": "the cat"}', '{"id": 7}'), [], "{data}:2: the row has neither"),
    "branches_not_a_list": (lines('{"branches": "the cat"}'), [], "{data}:1: branches: branches must be a list"),
    "non_string_branch": (lines('{"branches": ["the cat", 3]}'), [], "{data}:1: branches[1]: a branch must be"),
    "over_budget_branch": (lines('{"text": "the cat"}', '{"text": "the cat is big and old"}'),
                           ["--max_total_tokens", "4"], "{data}:2: text: the branch has 6 prompt tokens"),
    "missing_file": (None, [], "{data}: data file not found"),
    "unwritable_out_dir": (lines('{"text": "the cat"}'), ["--out_path", "{blocker}/out.jsonl"],
                           "out_path: cannot write in the output directory"),
    "out_path_is_a_dir": (lines('{"text": "the cat"}'), ["--out_path", "{tmp}"], "out_path: "),
    "bad_value": (lines('{"text": "the cat"}'), ["--top_p", "1.5"], "top_p: must be in (0, 1]"),
    "unknown_flag": (lines('{"text": "the cat"}'), ["--max_tokens", "3"], "unrecognized arguments: --max_tokens 3"),
    "missing_lora": (lines('{"text": "the cat"}'), ["--lora_path", "{tmp}/nope.pth"], "lora_path: LoRA file not found"),
    "missing_model_dir": (lines('{"text": "the cat"}'), ["--base_model", "{tmp}/no_model"],
                          "base_model: model directory {tmp}/no_model not found"),
    "ids_outside_the_vocabulary": (lines('{"text": "the cat"}', '{"branches": ["a dog", {"input_ids": [5, 99999]}]}'),
                                   [], "{data}:2: branches[1].input_ids: token id 99999 is outside the model's"),
    "flat_ids_outside_the_vocabulary": (lines('{"input_ids": [-3, 4]}'), [],
                                        "{data}:1: input_ids: token id -3 is outside the model's vocabulary"),
    "unreachable_hub": (lines('{"text": "the cat"}'), ["--base_model", "nobody/no-such-model"],
                        "base_model: model 'nobody/no-such-model' is not a local directory"),
}
LOADS_MODEL = {"over_budget_branch", "ids_outside_the_vocabulary", "flat_ids_outside_the_vocabulary", "unreachable_hub"}


@pytest.mark.parametrize("existing", [True, False], ids=["existing_output", "no_output"])
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_no_output(case, existing, tiny, tmp_path, capsys, monkeypatch):
    content, flags, expected = BAD_INPUTS[case]
    data = tmp_path / "rows.jsonl"
    if content is not None:
        data.write_text(content)
    (tmp_path / "blocker").write_text("a file, not a directory\n")
    out = tmp_path / "out" / "out.jsonl"
    if existing:
        out.parent.mkdir()
        out.write_text("old output\n")
    if case not in LOADS_MODEL:  # errors that must be found before the model loads
        monkeypatch.setattr(pmaccel.model, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    fmt = dict(data=data, blocker=tmp_path / "blocker", tmp=tmp_path)
    if case == "unreachable_hub":  # a hub that answers nothing, on this machine
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    argv = ["--base_model", str(tiny), "--data_path", str(data), "--out_path", str(out)]
    argv += [f.format(**fmt) for f in flags]
    try:
        status = main(argv)
    except SystemExit as e:  # argparse's own errors
        status = e.code
    err = [line for line in capsys.readouterr().err.splitlines() if "Loading weights" not in line and line.strip()]
    assert status == 2
    assert len(err) == 1 and err[0].startswith("pmaccel: error: " + expected.format(**fmt)), err
    if existing:
        assert out.read_text() == "old output\n" and sorted(p.name for p in out.parent.iterdir()) == ["out.jsonl"]
    else:
        assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


def said(capsys) -> list[str]:
    """What the run wrote to stderr, but transformers' progress bars."""
    return [line for line in capsys.readouterr().err.splitlines() if "Loading weights" not in line and line.strip()]


def test_skip_writes_the_good_rows_and_an_errors_file(tiny, tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text(lines('{"id": 1, "text": "the cat"}', "{oops", '{"id": 3, "branches": ["a dog", ""]}',
                          '{"id": 4, "text": "the sea"}'))
    out = tmp_path / "out.jsonl"
    assert main(["--base_model", str(tiny), "--data_path", str(data), "--out_path", str(out), "--on_error", "skip",
                 "--max_new_tokens", "3"]) == 0
    assert [r["id"] for r in read_jsonl(out)] == [1, 4]
    errors = read_jsonl(tmp_path / "out.jsonl.errors.jsonl")
    assert [(e["row"], e["input"]) for e in errors] == [(2, "{oops"), (3, {"id": 3, "branches": ["a dog", ""]})]
    assert "2 rows skipped" in capsys.readouterr().out


# ----------------------------------------------------------------------------- kill -9 and resume

SLOW_CLI = textwrap.dedent("""
    import sys, time
    import pmaccel.decode
    real = pmaccel.decode.decode_stream
    def slow(*args, **kwargs):
        for item in real(*args, **kwargs):
            time.sleep(0.5)
            yield item
    pmaccel.decode.decode_stream = slow
    from pmaccel.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_kill_9_then_resume_gives_the_same_file(tiny, tmp_path):
    data = write_jsonl(tmp_path / "mixed.jsonl", MIXED_ROWS)
    common = dict(base_model=str(tiny), data_path=str(data), branches_per_sample=2, max_new_tokens=8, batch_size=1,
                  temperature=0.8)
    infer(out_path=str(tmp_path / "reference.jsonl"), **common)
    out = tmp_path / "out.jsonl"
    argv = [f"--{k}={v}" for k, v in common.items()] + ["--out_path", str(out)]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *argv], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    part = tmp_path / "out.jsonl.part-00000-of-00001.jsonl"
    deadline = time.monotonic() + 120
    while not (part.exists() and part.read_text().count("\n") >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it was killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = part.read_text().count("\n")
    assert 3 <= done < 7 and not out.exists()

    records = infer(out_path=str(out), **common)
    assert records.summary.samples_resumed == done and records.summary.samples_computed == 7 - done
    assert out.read_bytes() == (tmp_path / "reference.jsonl").read_bytes()
    assert not part.exists()


# ----------------------------------------------------------------------------- the embedded model

@pytest.fixture(scope="module")
def hf_reference():
    """Each branch of the example file continued alone by ``model.generate`` on main + branch ids (greedy)."""
    model, tok = pmaccel.model.load_model(dtype="float32", device="cpu")
    ids = helpers_infer.hf_alone(model, tok, read_jsonl(example_path()), max_new_tokens=8)
    return [[tok.decode(x, skip_special_tokens=True) for x in per_branch] for per_branch in ids]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["console", "module"])
def test_the_demo_on_the_embedded_model(how, hf_reference, tmp_path):
    if how == "console":  # no --out_path: the demo writes pmaccel_outputs.jsonl in the working directory
        command, out = [console_script()], tmp_path / "pmaccel_outputs.jsonl"
    else:
        command, out = [sys.executable, "-m", "pmaccel", "--out_path", "out/demo.jsonl"], tmp_path / "out/demo.jsonl"
    proc = subprocess.run([*command, "--max_new_tokens", "8"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_jsonl(example_path())
    records = read_jsonl(out)
    assert [{k: r[k] for k in row} for row, r in zip(rows, records)] == rows and len(records) == len(rows)
    assert [r["outputs"] for r in records] == hf_reference
    assert all(len(r["finish_reasons"]) == len(r["branches"]) for r in records)
    assert "rows (" in proc.stdout  # the summary
    for row, record in zip(rows, records):  # the preview: every question and its whole answer, once
        for branch, answer in zip(row["branches"], record["outputs"]):
            assert proc.stdout.count(f"  Q: {branch.strip()}") == 1
            assert " ".join(f"  A: {answer.strip() or '(no text)'}".split()) in " ".join(proc.stdout.split())
    assert "[cut at --max_new_tokens]" in proc.stdout  # 8 new tokens end most answers early


def test_two_runs_on_one_output_take_turns(tiny, tmp_path):
    """A second run on the same output (another process, another notebook kernel) waits for the first,
    so that neither removes the part files the other still needs."""
    data = write_jsonl(tmp_path / "mixed.jsonl", MIXED_ROWS)
    common = dict(base_model=str(tiny), data_path=str(data), branches_per_sample=2, max_new_tokens=8, batch_size=1)
    infer(out_path=str(tmp_path / "reference.jsonl"), **common)
    out = tmp_path / "out.jsonl"
    argv = [f"--{k}={v}" for k, v in common.items()] + ["--out_path", str(out)]
    first = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *argv], env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    part = tmp_path / "out.jsonl.part-00000-of-00001.jsonl"
    deadline = time.monotonic() + 120
    while not part.exists():  # the first run is decoding
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "-m", "pmaccel", *argv], env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert first.wait(timeout=300) == 0 and second.returncode == 0, second.stderr[-2000:]
    assert f"pmaccel: waiting for another run writing {out} to finish" in second.stderr
    assert out.read_bytes() == (tmp_path / "reference.jsonl").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out.jsonl")) == [
        "out.jsonl", "out.jsonl.summary.json"], "no part or lock file left"


# ----------------------------------------------------------------------------- start-up


@pytest.mark.parametrize("overlap, workers", [(True, 0), (False, 0), (False, 2)],
                         ids=["overlapping", "alone", "alone_with_tokenizing_processes"])
def test_where_the_model_loads_and_the_kernels_compile(tiny, tmp_path, monkeypatch, overlap, workers):
    """Where the loading overlaps (``_overlaps``), the weights load in a thread of their own while the rows are
    tokenized, and the GPU kernels start compiling there once they are in place. Otherwise the run's own thread
    loads the weights before tokenizing, and the kernels compile in their threads while it tokenizes; with
    tokenizing processes (forked: a lock one of those threads holds would stay held in them), after. Either way
    the output is the same."""
    import threading

    import pmaccel.run

    monkeypatch.setattr(pmaccel.run, "_overlaps", lambda settings, accelerator: overlap)
    events, tokenizing = [], threading.Event()
    tokenize, load = pmaccel.run.tokenize_rows, pmaccel.model.load_model

    def here() -> str:
        return "main" if threading.current_thread() is threading.main_thread() else "thread"

    def tokenize_rows(*args, **kwargs):
        events.append(("tokenize", here()))
        tokenizing.set()
        return tokenize(*args, **kwargs)

    def load_model(*args, **kwargs):
        # in the thread, the weights wait here until the rows are being tokenized: a load that came first would
        # time out
        assert not overlap or tokenizing.wait(timeout=120), "the weights loaded before the rows were tokenized"
        events.append(("load", here()))
        return load(*args, **kwargs)

    monkeypatch.setattr(pmaccel.run, "tokenize_rows", tokenize_rows)
    monkeypatch.setattr(pmaccel.model, "load_model", load_model)
    monkeypatch.setattr(pmaccel.run, "_compile_ahead", lambda settings, model: events.append(("compile ahead", here())))
    data = write_jsonl(tmp_path / "mixed.jsonl", MIXED_ROWS)
    out = tmp_path / "out.jsonl"
    assert main(["--base_model", str(tiny), "--data_path", str(data), "--out_path", str(out),
                 "--max_new_tokens", "2", "--num_workers", str(workers)]) == 0
    assert events == {
        (True, 0): [("tokenize", "main"), ("load", "thread"), ("compile ahead", "thread")],
        (False, 0): [("load", "main"), ("compile ahead", "main"), ("tokenize", "main")],
        (False, 2): [("load", "main"), ("tokenize", "main"), ("compile ahead", "main")],
    }[overlap, workers]
    assert not any(t.name == "pmaccel-load" for t in threading.enumerate())
    monkeypatch.undo()
    assert main(["--base_model", str(tiny), "--data_path", str(data), "--out_path", str(tmp_path / "plain.jsonl"),
                 "--max_new_tokens", "2", "--num_workers", "2"]) == 0
    assert out.read_bytes() == (tmp_path / "plain.jsonl").read_bytes()


def test_the_loading_overlaps_the_rows_where_ranks_wait_and_no_tokenizing_process_is_forked():
    """Several processes (a rank waits for the main one's reading and tokenizing), and no forked tokenizing
    processes (a lock the loading thread holds would stay held in them); in a process alone, never."""
    from types import SimpleNamespace

    from pmaccel.run import _overlaps

    assert _overlaps(Settings(num_workers=0), SimpleNamespace(num_processes=2))
    assert _overlaps(Settings(num_workers=1), SimpleNamespace(num_processes=4))
    assert not _overlaps(Settings(num_workers=2), SimpleNamespace(num_processes=2))
    assert not _overlaps(Settings(num_workers=0), SimpleNamespace(num_processes=1))


def test_a_bad_row_loads_no_weights_and_the_loading_ends_first(tiny, tmp_path, monkeypatch, capsys):
    """Where the loading overlaps the rows, a bad row is said (one line, exit status 2) at once, without any weights
    loading, though the tokenizer loads meanwhile; the loading thread then ends by itself. An error in the loading
    itself is said after the rows' own."""
    import threading

    import pmaccel.run

    loaded = []
    monkeypatch.setattr(pmaccel.run, "_overlaps", lambda settings, accelerator: True)
    monkeypatch.setattr(pmaccel.model, "load_model", lambda *a, **k: loaded.append("weights"))
    real_tokenizer = pmaccel.model.load_tokenizer
    monkeypatch.setattr(pmaccel.model, "load_tokenizer", lambda *a, **k: (time.sleep(0.5), real_tokenizer(*a, **k))[1])
    data = tmp_path / "rows.jsonl"
    data.write_text(lines('{"text": "the cat"}', '{"text": "a dog"'))
    argv = ["--base_model", str(tiny), "--data_path", str(data), "--out_path", str(tmp_path / "out.jsonl")]
    assert main(argv) == 2
    for thread in threading.enumerate():
        if thread.name == "pmaccel-load":
            assert not thread.daemon  # a process exits only once it is done
            thread.join(timeout=120)
            assert not thread.is_alive()
    assert loaded == []
    err = said(capsys)
    assert len(err) == 1 and err[0].startswith(f"pmaccel: error: {data}:2: malformed JSON"), err

    def unloadable(*args, **kwargs):
        raise pmaccel.run.PMAccelError("cannot load model 'x': broken", field="base_model")

    monkeypatch.setattr(pmaccel.model, "load_tokenizer", unloadable)
    assert main(argv) == 2  # the row first
    err = said(capsys)
    assert len(err) == 1 and err[0].startswith(f"pmaccel: error: {data}:2: malformed JSON"), err
    data.write_text(lines('{"text": "the cat"}', '{"text": "a dog"}'))
    assert main(argv) == 2
    assert said(capsys) == ["pmaccel: error: base_model: cannot load model 'x': broken"]
    assert not (tmp_path / "out.jsonl").exists()


def test_an_unforeseen_error_of_the_loading_thread_is_the_runs(tiny, tmp_path, monkeypatch):
    """Whatever the loading thread meets (here: starting the device) is raised by the run, which does not wait on."""
    import threading

    import pmaccel.run

    def broken(self):
        raise ValueError("no such device")

    monkeypatch.setattr(pmaccel.run, "_overlaps", lambda settings, accelerator: True)
    monkeypatch.setattr(pmaccel.run._Loading, "_start_device", broken)
    data = write_jsonl(tmp_path / "rows.jsonl", MIXED_ROWS)
    raised = []

    def run():
        try:
            main(["--base_model", str(tiny), "--data_path", str(data), "--out_path", str(tmp_path / "out.jsonl")])
        except ValueError as e:
            raised.append(str(e))

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    runner.join(timeout=120)
    assert not runner.is_alive(), "the run waits for a loading that has failed"
    assert raised == ["no such device"] and not (tmp_path / "out.jsonl").exists()


def test_the_device_a_run_loads_on_has_its_index_from_the_run_s_own_thread(monkeypatch):
    """``--device cuda`` (no index) is the device current in the run's thread, as ``model.to("cuda")`` there would
    take it, not the device 0 a loading thread starts on; ``auto`` is the accelerator's; an unknown one is an
    input error."""
    import threading
    from types import SimpleNamespace

    import torch

    from pmaccel.run import _run_device

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device",
                        lambda: 3 if threading.current_thread() is threading.main_thread() else 0)
    accelerator = SimpleNamespace(device=torch.device("cuda", 1))
    assert _run_device(Settings(device="cuda"), accelerator) == torch.device("cuda", 3)
    assert _run_device(Settings(device="cuda:2"), accelerator) == torch.device("cuda", 2)
    assert _run_device(Settings(device="auto"), accelerator) == torch.device("cuda", 1)
    assert _run_device(Settings(device="cpu"), accelerator) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # CUDA not started: device 0, in any thread
    assert _run_device(Settings(device="cuda"), accelerator) == torch.device("cuda", 0)
    with pytest.raises(pmaccel.run.PMAccelError, match="device: unknown device 'tpu7'"):
        _run_device(Settings(device="tpu7"), accelerator)


def test_a_gguf_files_vocabulary_comes_with_its_model(tiny, tmp_path, monkeypatch):
    """A GGUF file's config is not read ahead of its weights (reading it costs about what its tokenizer does): where
    the loading overlaps the rows, the vocabulary size comes once the model is loaded, the rows are tokenized then,
    and the output is the same."""
    import pmaccel.run

    loading = object.__new__(pmaccel.run._Loading)
    loading.settings = Settings(base_model=str(tmp_path / "model.gguf"))
    monkeypatch.setattr(pmaccel.model, "model_config", lambda *a, **k: pytest.fail("the config was read"))
    assert loading._config_vocab_size() is None
    monkeypatch.undo()

    data = write_jsonl(tmp_path / "rows.jsonl", MIXED_ROWS)
    argv = ["--base_model", str(tiny), "--data_path", str(data), "--max_new_tokens", "3"]
    assert main([*argv, "--out_path", str(tmp_path / "plain.jsonl")]) == 0
    monkeypatch.setattr(pmaccel.run, "_overlaps", lambda settings, accelerator: True)
    monkeypatch.setattr(pmaccel.run._Loading, "_config_vocab_size", lambda self: None)
    assert main([*argv, "--out_path", str(tmp_path / "out.jsonl")]) == 0
    assert (tmp_path / "out.jsonl").read_bytes() == (tmp_path / "plain.jsonl").read_bytes()


def test_token_ids_are_checked_against_the_loaded_model_when_its_config_says_otherwise(tiny, tmp_path, monkeypatch,
                                                                                         capsys):
    """Where the loading overlaps the rows, the vocabulary size read from the config (before the weights) is checked
    against the model once it is loaded: where they differ, the rows are tokenized again with the model's, so an id
    past the model's rows is an error."""
    import transformers

    import pmaccel.run

    monkeypatch.setattr(pmaccel.run, "_overlaps", lambda settings, accelerator: True)
    config = transformers.AutoConfig.from_pretrained(tiny)
    monkeypatch.setattr(pmaccel.model, "vocab_size", lambda config: config.vocab_size + 100)
    data = write_jsonl(tmp_path / "rows.jsonl", [{"main": "the cat", "branches": ["a dog", {"input_ids": [
        config.vocab_size]}]}])
    assert main(["--base_model", str(tiny), "--data_path", str(data), "--out_path", str(tmp_path / "out.jsonl")]) == 2
    assert said(capsys) == [f"pmaccel: error: {data}:1: branches[1].input_ids: token id {config.vocab_size} is "
                            f"outside the model's vocabulary (0..{config.vocab_size - 1}); give ids of this model's "
                            "tokenizer"]


def test_start_up_runs_without_the_collector_and_freezes_what_it_loaded(tiny, tmp_path, monkeypatch):
    """The CLI's start-up (imports, weights, rows) runs with the garbage collector off; once loaded, one
    collection, then what is alive is frozen and the collector is back on. A bad input leaves it on too."""
    import gc

    import pmaccel.run

    seen = {}
    real_load = pmaccel.model.load_model

    def load(*args, **kwargs):
        seen["while loading"] = gc.isenabled()
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # a worker forked during start-up (datasets' map) collects as usual
            os.write(write, b"1" if gc.isenabled() else b"0")
            os._exit(0)
        os.waitpid(child, 0)
        seen["forked child"] = os.read(read, 1) == b"1"
        os.close(read)
        os.close(write)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(pmaccel.model, "load_model", load)
    # the command in this process (main() reads sys.argv), whose bytecode setting is restored afterwards
    monkeypatch.setattr(sys, "pycache_prefix", sys.pycache_prefix)
    monkeypatch.setattr(sys, "dont_write_bytecode", sys.dont_write_bytecode)
    frozen = gc.get_freeze_count()
    data = write_jsonl(tmp_path / "mixed.jsonl", MIXED_ROWS)
    out = tmp_path / "out.jsonl"
    try:
        monkeypatch.setattr(sys, "argv", ["pmaccel", "--base_model", str(tiny), "--data_path", str(data),
                                          "--out_path", str(out), "--max_new_tokens", "3"])
        assert main() == 0
        assert seen == {"while loading": False, "forked child": True}
        assert gc.isenabled() and gc.get_freeze_count() > frozen
        gc.unfreeze()
        monkeypatch.setattr(sys, "argv", ["pmaccel", "--base_model", str(tiny), "--data_path",
                                          str(tmp_path / "missing.jsonl"), "--out_path", str(tmp_path / "bad.jsonl")])
        assert main() == 2
        assert gc.isenabled()
    finally:
        gc.unfreeze()
        gc.enable()
    phases = json.loads((tmp_path / "out.jsonl.summary.json").read_text())["phases"][0]
    assert 0 < phases["start_s"] < 24 * 3600  # the process's age when the run began
    # on the epoch's clock: the process started, the run began start_s later and its timeline ended before now
    assert phases["started_at"] + phases["start_s"] < phases["ended_at"] <= time.time()
    # the peak memory when the first forward began, then over the whole run (never less)
    assert 0 < phases["peak_rss_before_run_gb"] <= phases["peak_rss_gb"]
    if sys.platform == "linux":  # what was resident then, in two parts: never more than the peak so far
        anon, files = phases["rss_anon_before_run_gb"], phases["rss_file_before_run_gb"]
        assert 0 < anon and 0 < files and anon + files <= phases["peak_rss_before_run_gb"] + 0.002


GPUS_SEEN = textwrap.dedent("""
    import os, sys
    from pmaccel import cli
    sys.path.insert(0, sys.argv[4])
    cli.BYTECODE_PROBES = ("probe_pkg",)  # a package with no bytecode anywhere yet
    cli.os.cpu_count = lambda: 2  # no side processes to compile the rest
    flags = ["--device", sys.argv[1], "--data_path", sys.argv[2]]
    if sys.argv[3] == "command":
        sys.argv[1:] = flags
        status = cli.main()
    else:
        status = cli.main(flags)
    print(repr(os.environ.get("CUDA_VISIBLE_DEVICES")), sys.pycache_prefix is not None, status)
""")


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_the_command_hides_the_gpus_from_a_cpu_run_and_a_caller_keeps_its_gpus_and_bytecode_setting(tmp_path, device):
    """``pmaccel --device cpu``: the command's process is shown no GPU before the run starts (torch's gloo barrier
    would start CUDA on GPU <rank>). ``main(flags)`` called from a program leaves that program's GPUs alone, and its
    bytecode setting (which the command changes where Python writes none, for its own imports)."""
    missing = str(tmp_path / "missing.jsonl")  # the run ends at once, on its input error
    (tmp_path / "src" / "probe_pkg").mkdir(parents=True)
    (tmp_path / "src" / "probe_pkg" / "__init__.py").write_text("")
    env = {**ENV, "CUDA_VISIBLE_DEVICES": "0", "PYTHONDONTWRITEBYTECODE": "1", "PMACCEL_CACHE": str(tmp_path / "c")}
    env.pop("PYTHONPYCACHEPREFIX", None)
    seen = {}
    for how in ("command", "call"):
        proc = subprocess.run([sys.executable, "-c", GPUS_SEEN, device, missing, how, str(tmp_path / "src")], env=env,
                              capture_output=True, text=True, timeout=120)
        assert "missing.jsonl" in proc.stderr, proc.stderr
        seen[how] = proc.stdout.split()
    assert seen == {"command": ["''" if device == "cpu" else "'0'", "True", "2"], "call": ["'0'", "False", "2"]}


def test_main_called_from_a_program_leaves_its_collector_alone(tiny, mixed, tmp_path):
    """The command's own process runs its start-up without the collector and freezes what it loaded
    (``run._collect_from_here``); ``main(flags)`` in a program changes neither."""
    import gc

    frozen = gc.get_freeze_count()
    assert main(["--base_model", str(tiny), "--data_path", str(mixed), "--out_path", str(tmp_path / "o.jsonl"),
                 "--max_new_tokens", "2", "--device", "cpu"]) == 0
    assert gc.get_freeze_count() == frozen and gc.isenabled()


def test_main_called_from_a_program_follows_run_jobs_rule_for_the_side_process(tmp_path, monkeypatch):
    """``main(flags)`` leaves the kernels' side process to ``run_job``, which starts none in a process that has
    imported transformers already (this one): it compiles sooner in its own threads."""
    from pmaccel import warmup

    started = []
    monkeypatch.setattr(warmup, "start", lambda settings: started.append(settings.data_path))
    assert main(["--data_path", str(tmp_path / "missing.jsonl"), "--out_path", str(tmp_path / "o.jsonl")]) == 2
    assert started == []


def _bytecode_probe(tmp_path: Path, env: dict[str, str], setup: str = "cli.os.cpu_count = lambda: 2"
                    ) -> subprocess.CompletedProcess:
    """A child that runs the CLI's bytecode set-up with a package of ``tmp_path/src`` as the probe (after
    ``setup``; by default a machine of too few cores for side processes), then imports that package and
    prints where Python keeps bytecode."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path / "src")!r})
        import pmaccel.cli as cli
        cli.BYTECODE_PROBES = ("probe_pkg",)
        {setup}
        cli._cache_bytecode()
        import probe_pkg
        print(sys.pycache_prefix, sys.dont_write_bytecode)
    """)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_bytecode_is_kept_in_the_cache_when_python_writes_none(tmp_path):
    package = tmp_path / "src" / "probe_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("VALUE = 1\n")
    env = {**ENV, "PYTHONDONTWRITEBYTECODE": "1", "PMACCEL_CACHE": str(tmp_path / "cache")}
    env.pop("PYTHONPYCACHEPREFIX", None)

    proc = _bytecode_probe(tmp_path, env)  # no bytecode next to the sources: it goes to the cache
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(tmp_path / "cache" / "bytecode"), "False"]
    assert list((tmp_path / "cache" / "bytecode").rglob("probe_pkg/__init__.*.pyc"))
    assert not (package / "__pycache__").exists()

    (tmp_path / "file").write_text("")  # a cache that cannot be created: nothing changes
    proc = _bytecode_probe(tmp_path, {**env, "PMACCEL_CACHE": str(tmp_path / "file" / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["None", "True"]

    proc = _bytecode_probe(tmp_path, {**env, "PYTHONPYCACHEPREFIX": str(tmp_path / "mine")})  # the user's own
    assert proc.stdout.split() == [str(tmp_path / "mine"), "True"]  # choice stands, both settings of it

    # a cold cache on a machine of several cores: side processes compile what the run imports later
    (tmp_path / "src" / "later_pkg").mkdir()
    (tmp_path / "src" / "later_pkg" / "__init__.py").write_text("VALUE = 2\n")
    shutil.rmtree(tmp_path / "cache")
    warm = {**env, "PYTHONPATH": os.pathsep.join([str(tmp_path / "src"), env["PYTHONPATH"]])}
    proc = _bytecode_probe(tmp_path, warm, setup="cli.os.cpu_count = lambda: 8; cli.BYTECODE_WARMERS = ('import later_pkg',)")
    assert proc.returncode == 0, proc.stderr
    deadline = time.monotonic() + 60
    while not list((tmp_path / "cache" / "bytecode").rglob("later_pkg/__init__.*.pyc")):
        assert time.monotonic() < deadline, "no side process compiled later_pkg"
        time.sleep(0.1)
    assert not (tmp_path / "src" / "later_pkg" / "__pycache__").exists()

    import py_compile

    source = str(package / "__init__.py")
    # next to the source whatever this process's own prefix (cache_from_source would follow it)
    py_compile.compile(source, cfile=str(package / "__pycache__" / f"__init__.{sys.implementation.cache_tag}.pyc"))
    proc = _bytecode_probe(tmp_path, env)  # bytecode next to the sources: nothing changes
    assert proc.stdout.split() == ["None", "True"]


def test_the_command_takes_its_process_group_down_and_a_caller_keeps_its_own(tmp_path, monkeypatch):
    """The command's process ends with its run: it takes its process group down first (``end_process_group``);
    ``main(flags)`` in a program leaves the program's group alone."""
    from pmaccel import cli, run, warmup

    ended = []
    monkeypatch.setattr(run, "run_job", lambda settings, job, own_process=None: None)
    monkeypatch.setattr(run, "end_process_group", lambda: ended.append(True))
    monkeypatch.setattr(warmup, "start", lambda settings: None)
    flags = ["--data_path", str(tmp_path / "rows.jsonl"), "--out_path", str(tmp_path / "o.jsonl")]
    monkeypatch.setattr(sys, "argv", ["pmaccel", *flags])
    assert cli._main(None) == 0 and ended == [True]
    assert cli._main(flags) == 0 and ended == [True]


END_GROUP = """
import os, sys
import torch.distributed as dist
from accelerate import PartialState
from pmaccel.run import end_process_group
PartialState(cpu=True)
assert dist.is_initialized() and PartialState().num_processes == 2
end_process_group()
print(dist.is_initialized())
"""


def test_end_process_group_takes_a_group_of_several_down(tmp_path):
    env = {**ENV, "CUDA_VISIBLE_DEVICES": ""}
    from pmaccel.launch import _free_port

    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", END_GROUP], env={**env, "RANK": str(r), "LOCAL_RANK": str(r),
                                                                     "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                                                     "MASTER_PORT": port},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [o.strip().splitlines()[-1] for o, _ in outs] == ["False", "False"], outs


def test_a_started_process_takes_its_process_group_down(tmp_path, monkeypatch):
    """A process that ``--num_processes`` started (``launch._rank_main``) ends with its run, as the command does."""
    import pickle

    from pmaccel import launch, run

    ended = []
    monkeypatch.setattr(run, "run_job", lambda settings, job, own_process=None: None)
    monkeypatch.setattr(run, "end_process_group", lambda: ended.append(True))
    monkeypatch.setattr(run, "keep_off_gpus", lambda settings: None)
    task = tmp_path / "task.pkl"
    task.write_bytes(pickle.dumps((Settings(data_path=str(tmp_path / "rows.jsonl")), None)))
    assert launch._rank_main(str(task), str(tmp_path)) == 0 and ended == [True]
