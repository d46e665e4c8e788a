"""Distribution (SPEC §7): the batch loop and its OOM retry, the gather, and whole runs on 1, 2 and 3
processes (accelerate's ``debug_launcher``, and ``accelerate launch`` with a shipped config) that
must write byte-identical files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import helpers_infer
import numpy as np
import pytest
import torch
from helpers_infer import MIXED_ROWS, REPO, log_collectives, rank, repo_path, write_jsonl

from pmaccel import distribute, output
from pmaccel.inference import infer

# ----------------------------------------------------------------------------- the batch loop


@pytest.mark.parametrize("sizes, batch_size, by_samples, expected", [
    ([1, 1, 1, 1, 1], 2, True, [(0, 2), (2, 4), (4, 5)]),
    ([3, 1, 2, 5, 1], 4, False, [(0, 2), (2, 3), (3, 4), (4, 5)]),  # a sample wider than the batch goes alone
    ([2, 2, 2], 6, False, [(0, 3)]),
])
def test_batches(sizes, batch_size, by_samples, expected):
    seen = []
    distribute.run_batches(sizes, lambda s, e, b: [None] * (e - s), lambda s, e, r: seen.append((s, e)),
                           batch_size=batch_size, by_samples=by_samples)
    assert seen == expected


def oom():
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_oom_halves_the_batch_and_retries_it():
    calls, written = [], []

    def generate_batch(start, end, batch_size):
        calls.append((start, end, batch_size))
        if end - start > 2:
            raise oom()
        return list(range(start, end))

    final = distribute.run_batches([1] * 9, generate_batch, lambda s, e, r: written.extend(r), batch_size=8)
    assert calls[:3] == [(0, 8, 8), (0, 4, 4), (0, 2, 2)] and final == 2
    assert calls[-1] == (8, 9, 2)
    assert written == list(range(9))  # each batch written once, in order


def test_oom_with_one_sample_and_other_errors_propagate():
    with pytest.raises(torch.OutOfMemoryError):
        distribute.run_batches([1, 1], lambda s, e, b: (_ for _ in ()).throw(oom()), lambda *a: None, batch_size=4)
    with pytest.raises(RuntimeError, match="boom"):
        distribute.run_batches([1, 1], lambda s, e, b: (_ for _ in ()).throw(RuntimeError("boom")), lambda *a: None,
                               batch_size=4)


def test_collectives_in_one_process():
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    assert distribute.gather_to_main(acc, {3: "c"}) == [{3: "c"}]
    assert distribute.shard(acc, [True, False, True, False, False]).tolist() == [1, 3, 4]
    assert distribute.shard(acc, []).tolist() == [] and distribute.shard(acc, [True, True]).tolist() == []
    done = np.zeros(7, dtype=bool)
    done[[2, 5]] = True
    assert distribute.agree_on_done(acc, done).tolist() == done.tolist()


@pytest.mark.parametrize("world", [2, 3, 4, 5])
def test_a_share_is_what_split_between_processes_gives_over_the_unfinished_indices(world, monkeypatch):
    """``shard`` picks a rank's share from the done flags (a chunk at a time): the same indices, in the same order,
    as ``split_between_processes`` with padding over every unfinished index, repeats dropped."""
    from types import SimpleNamespace

    from accelerate import PartialState

    monkeypatch.setattr(distribute, "SHARD_CHUNK", 7)  # shares that start and end inside and across chunks
    rng = np.random.default_rng(world)
    for size in (0, 1, 2, 3, 4, 5, 9, 30, 31, 64):
        for p_done in (0.0, 0.3, 0.9, 1.0):
            done = rng.random(size) < p_done
            todo = np.flatnonzero(~done).tolist()
            got = []
            for index in range(world):
                acc = SimpleNamespace(num_processes=world, process_index=index)
                expected = []
                if todo:  # (accelerate pads an empty list with its last item)
                    with PartialState.split_between_processes(acc, todo, apply_padding=True) as split:
                        expected = list(dict.fromkeys(split))
                share = distribute.shard(acc, done)
                assert share.tolist() == expected, (size, p_done, index)
                got += share.tolist()
            assert set(got) == set(todo)


# ----------------------------------------------------------------------------- whole runs, several processes


def launch(num_processes, **kwargs):
    return helpers_infer.launch(infer, num_processes, **kwargs)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "top_k": 20, "top_p": 0.95}], ids=["greedy", "sampled"])
def test_same_file_on_1_2_and_3_processes(tiny, mixed, tmp_path, sampling, monkeypatch):
    # 7 samples: with 3 processes the padding repeats sample 6 on ranks 1 and 2 ([0 1 2] [3 4 6] [5 6])
    monkeypatch.setattr(output, "remove_part_files", lambda paths: None)  # keep them to look at (forks inherit)
    common = dict(base_model=str(tiny), data_path=str(mixed), branches_per_sample=2, max_new_tokens=8, batch_size=2,
                  **sampling)
    files = {}
    for n in (1, 2, 3):
        out = tmp_path / f"out{n}.jsonl"
        launch(n, out_path=str(out), **common)
        files[n] = out.read_bytes()
        done = {p.name: sorted(json.loads(x)["index"] for x in p.read_text().splitlines())
                for p in tmp_path.glob(f"out{n}.jsonl.part-*")}
        shards = {1: [range(7)], 2: [range(4), range(4, 7)], 3: [range(3), [3, 4, 6], [5, 6]]}[n]
        assert done == {f"out{n}.jsonl.part-{r:05d}-of-{n:05d}.jsonl": list(s) for r, s in enumerate(shards)}
    assert files[1] == files[2] == files[3]
    assert files[1].count(b"\n") == len(MIXED_ROWS)


def test_flat_grouping_does_not_depend_on_the_process_count(tiny, tmp_path):
    rows = [{"id": i, "text": t} for i, t in enumerate(["the cat", "a dog", "the sea is", "big", "one two"] * 3)]
    data = write_jsonl(tmp_path / "flat.jsonl", rows)
    common = dict(base_model=str(tiny), data_path=str(data), min_branches_per_sample=1, max_branches_per_sample=4,
                  seed=7, max_new_tokens=5, temperature=1.0)
    launch(1, out_path=str(tmp_path / "a.jsonl"), **common)
    launch(3, out_path=str(tmp_path / "b.jsonl"), **common)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


def accelerate_launch_2proc(port: int, *flags: str) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file accelerate_configs/cpu_2proc.yaml -m pmaccel <flags>``, as a user types it on
    a machine without a GPU (the one this config is for: its GPUs are hidden here)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo_path(), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(REPO / "accelerate_configs" / "cpu_2proc.yaml"), "--main_process_port", str(port), "-m", "pmaccel",
         *flags], env=env, capture_output=True, text=True, timeout=300)


def test_accelerate_launch_with_the_cpu_config(tiny, mixed, tmp_path):
    """The real launcher: ``accelerate launch --config_file accelerate_configs/cpu_2proc.yaml -m pmaccel``."""
    flags = ["--base_model", str(tiny), "--data_path", str(mixed), "--branches_per_sample", "2",
             "--max_new_tokens", "8", "--batch_size", "2"]
    infer(out_path=str(tmp_path / "one.jsonl"), base_model=str(tiny), data_path=str(mixed), branches_per_sample=2,
          max_new_tokens=8, batch_size=2, device="cpu")
    proc = accelerate_launch_2proc(29517, *flags, "--out_path", str(tmp_path / "two.jsonl"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("pmaccel: 10 rows") == 1, "one summary, from the main process"
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()


def test_accelerate_launch_resumes_what_one_process_left(tiny, mixed, tmp_path, monkeypatch):
    """Part files of an interrupted one-process run, resumed by two ranks (which split the resume checks)."""
    import pmaccel.decode

    common = dict(base_model=str(tiny), data_path=str(mixed), branches_per_sample=2, max_new_tokens=8, device="cpu")
    infer(out_path=str(tmp_path / "one.jsonl"), **common)
    real = pmaccel.decode.decode_stream

    def stop_after_four(*args, **kwargs):
        for n, item in enumerate(real(*args, **kwargs)):
            if n == 4:
                raise RuntimeError("interrupted")
            yield item

    monkeypatch.setattr(pmaccel.decode, "decode_stream", stop_after_four)
    with pytest.raises(RuntimeError, match="interrupted"):
        infer(out_path=str(tmp_path / "two.jsonl"), **common)
    monkeypatch.undo()
    flags = [f"--{k}={v}" for k, v in common.items()]
    proc = accelerate_launch_2proc(29521, *flags, "--out_path", str(tmp_path / "two.jsonl"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "two.jsonl.summary.json").read_text())
    assert (summary["samples_resumed"], summary["samples_computed"]) == (4, 3)
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()


@pytest.mark.parametrize("name", ["cpu", "cpu_2proc", "single_gpu", "multi_gpu_8", "multi_node_2x8"])
def test_shipped_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "accelerate_configs" / f"{name}.yaml"))
    expected = {"cpu": 1, "cpu_2proc": 2, "single_gpu": 1, "multi_gpu_8": 8, "multi_node_2x8": 16}[name]
    assert config.num_processes == expected


IN_PROCESS_THEN_LAUNCHED = textwrap.dedent("""
    import dataclasses, sys
    from accelerate import debug_launcher
    import pmaccel
    base, data, out = sys.argv[1:]
    s = pmaccel.Settings(base_model=base, data_path=data, out_path=f"{out}/one.jsonl", branches_per_sample=2,
                         max_new_tokens=8)
    pmaccel.infer(s)  # a notebook user tries a call in the kernel first...
    for n in (2, 3):  # ...then launches several processes from the same kernel
        debug_launcher(pmaccel.infer, (dataclasses.replace(s, out_path=f"{out}/{n}.jsonl"),), num_processes=n)
""")


def test_an_in_process_run_then_launched_runs_in_one_python_process(tiny, mixed, tmp_path):
    # the CPU on any machine: debug_launcher's ranks are forked, and cannot use CUDA once the first call started it
    # (on a GPU, the test below)
    env = {**os.environ, "PYTHONPATH": repo_path(), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", IN_PROCESS_THEN_LAUNCHED, str(tiny), str(mixed), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = (tmp_path / "one.jsonl").read_bytes()
    assert (tmp_path / "2.jsonl").read_bytes() == one and (tmp_path / "3.jsonl").read_bytes() == one
    assert "rank 0 of 3" in proc.stderr, "the launched ranks know they are three"


IN_PROCESS_THEN_LAUNCHED_GPU = textwrap.dedent("""
    import dataclasses, sys
    import torch
    from accelerate import notebook_launcher
    import pmaccel
    base, data, out = sys.argv[1:]
    s = pmaccel.Settings(base_model=base, data_path=data, out_path=f"{out}/one.jsonl", branches_per_sample=2,
                         max_new_tokens=8)
    records = pmaccel.infer(s)  # in a child process: this one's CUDA stays unstarted...
    assert len(records) and records.summary.deterministic and not torch.cuda.is_initialized()
    for n in range(2, min(3, torch.cuda.device_count()) + 1):  # ...so notebook_launcher can still fork GPU ranks
        notebook_launcher(pmaccel.infer, (dataclasses.replace(s, out_path=f"{out}/{n}.jsonl"),), num_processes=n)
    open(f"{out}/done", "w").close()
""")


@pytest.mark.gpu
def test_an_in_process_gpu_run_then_notebook_launcher_on_the_gpus(tiny, mixed, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs or more")
    env = {**os.environ, "PYTHONPATH": repo_path()}
    # `python -i`: an interactive session, as a notebook's kernel is (a script runs in its own process)
    proc = subprocess.run([sys.executable, "-i", "-c", IN_PROCESS_THEN_LAUNCHED_GPU, str(tiny), str(mixed),
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=400,
                          stdin=subprocess.DEVNULL)
    # (`python -i` exits 0 after an exception: the script's last line says it got there)
    assert proc.returncode == 0 and (tmp_path / "done").exists() and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    one = (tmp_path / "one.jsonl").read_bytes()
    launched = sorted(tmp_path.glob("[23].jsonl"))
    assert launched and all(f.read_bytes() == one for f in launched)


BAD_ROW_UNDER_LAUNCHERS = textwrap.dedent("""
    import sys
    from accelerate import debug_launcher, notebook_launcher
    import pmaccel
    base, data, out = sys.argv[1:]
    s = pmaccel.Settings(base_model=base, data_path=data, out_path=out)
    for launch in (notebook_launcher, debug_launcher):
        try:
            launch(pmaccel.infer, (s,), num_processes=2)
        except Exception as e:  # the launcher reports its failed processes
            status_2 = "exitcode  : 2" in str(e) or "exit code 2" in str(e)
            print(f"launcher raised {type(e).__name__}{', status 2' if status_2 else ''}", flush=True)
""")


def launcher_script(script: str, tiny, rows: str, tmp_path) -> tuple[subprocess.CompletedProcess, Path, list[str]]:
    """``script`` (launching ``infer`` over ``rows``) in a fresh process: it, the data file, and its error lines."""
    data = tmp_path / "bad.jsonl"
    data.write_text(rows)
    # a machine without a GPU: notebook_launcher starts one process per GPU where there are GPUs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo_path(), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", script, str(tiny), str(data), str(tmp_path / "out.jsonl")], env=env,
                          capture_output=True, text=True, timeout=300)
    return proc, data, [line for line in proc.stderr.splitlines() if "pmaccel: error:" in line]


def test_a_bad_row_under_notebook_launcher_is_one_line_and_exit_status_2(tiny, tmp_path):
    proc, data, errors = launcher_script(BAD_ROW_UNDER_LAUNCHERS, tiny, '{"text": "the cat"}\n{"text": "a dog"\n',
                                         tmp_path)
    assert errors == [f"pmaccel: error: {data}:2: malformed JSON: Expecting ',' delimiter at column 17"] * 2, proc.stderr
    assert proc.stdout.splitlines()[-2:] == ["launcher raised ChildFailedError, status 2",
                                             "launcher raised ProcessExitedException, status 2"], proc.stdout
    assert "PMAccelError" not in proc.stderr, "no rank's traceback is relayed"
    assert not any(tmp_path.glob("out.jsonl*")), "nothing written"


EVERY_RANK_MEETS_A_BAD_ROW = textwrap.dedent("""
    import sys
    from accelerate import debug_launcher
    import pmaccel

    def both_ranks(s):
        try:
            pmaccel.infer(s)
        except SystemExit as e:  # kept from ending the process, so the launcher stops no rank early
            import torch.distributed as dist
            print(f"rank {dist.get_rank()} exit {e.code}", flush=True)

    base, data, out = sys.argv[1:]
    debug_launcher(both_ranks, (pmaccel.Settings(base_model=base, data_path=data, out_path=out),), num_processes=2)
""")


def test_under_debug_launcher_only_rank_0_says_the_error(tiny, tmp_path):
    # debug_launcher sets no RANK (Accelerate sets it to 0 in both processes); here no rank ends before the
    # other has met the error, so a second line would show
    proc, data, errors = launcher_script(EVERY_RANK_MEETS_A_BAD_ROW, tiny, '{"text": "the cat"}\n{"text": 5}\n',
                                         tmp_path)
    assert len(errors) == 1 and errors[0].startswith(f"pmaccel: error: {data}:2: text"), proc.stderr
    assert sorted(line for line in proc.stdout.splitlines() if line.startswith("rank ")) == \
        ["rank 0 exit 2", "rank 1 exit 2"], proc.stdout
    assert not any(tmp_path.glob("out.jsonl*")), "nothing written"


def test_a_bad_row_under_accelerate_launch_is_one_line_from_the_main_rank(tiny, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "the cat"}\n{"text": "a dog"\n')
    proc = accelerate_launch_2proc(29519, "--base_model", str(tiny), "--data_path", str(data),
                                   "--out_path", str(tmp_path / "out.jsonl"))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "pmaccel: error:" in line]
    assert errors == [f"pmaccel: error: {data}:2: malformed JSON: Expecting ',' delimiter at column 17"], errors
    assert "[rank1]" not in proc.stderr and "gloo" not in proc.stderr.lower()
    assert not any(tmp_path.glob("out.jsonl*")), "nothing written"


@pytest.mark.parametrize("shared_filesystem", [True, False])
def test_results_travel_to_the_main_process_only(shared_filesystem, tiny, mixed, tmp_path, monkeypatch):
    common = dict(base_model=str(tiny), data_path=str(mixed), branches_per_sample=2, max_new_tokens=6, batch_size=2)
    launch(1, out_path=str(tmp_path / "one.jsonl"), **common)
    seen = log_collectives(monkeypatch, str(tmp_path / "collectives.jsonl"))
    if not shared_filesystem:  # each rank sees its own part file only, as on nodes without a shared disk
        real = output.find_part_files
        monkeypatch.setattr(output, "find_part_files", lambda out: [
            p for p in real(out) if f".part-{rank():05d}-" in p.name])
    launch(3, out_path=str(tmp_path / "three.jsonl"), **common)
    assert (tmp_path / "three.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    calls = seen()
    assert not any('"outputs"' in c["payload"] for c in calls if c["kind"] == "gather_object"), \
        "no result goes to every rank"
    sent = {c["rank"]: json.loads(c["payload"]) for c in calls if c["kind"] == "to_main"}
    if shared_filesystem:
        assert sent == {}, "the main process reads every result from the part files"
    else:
        assert sent[0] == {} and sent[1] and sent[2], "ranks 1 and 2 send the main process what it cannot see"
        assert all(k.isdigit() for part in sent.values() for k in part)
