"""pmaccel.warmup: the side process that compiles a first run's kernels while the run starts up."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from pmaccel import warmup


def _settings(model, **overrides) -> argparse.Namespace:
    values = dict(base_model=str(model), dtype="auto", device="auto", deterministic=None)
    return argparse.Namespace(**{**values, **overrides})


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty pmaccel and Triton caches for the test."""
    monkeypatch.setenv("PMACCEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    # none started above this process; set, not deleted, so that what the test's starts write there is undone
    monkeypatch.setenv(warmup.STARTED_ENV, "")
    return tmp_path


def test_the_plan_is_keyed_by_what_the_kernels_depend_on(tiny, caches, monkeypatch):
    """One stamp per model config, dtype and Triton cache; none where no kernels run or no config is there."""
    p = warmup.plan(_settings(tiny))
    assert p is not None and p.model == tiny and p.device == "cuda" and p.stamp.parent == caches / "cache" / "kernels"
    assert p.stamp.with_suffix(".lock") == p.lock and not p.done()
    assert warmup.plan(_settings(tiny, device="cuda:1")).device == "cuda:1"
    assert warmup.plan(_settings(tiny, device="cuda:1")).stamp == p.stamp  # the kernels do not depend on the card
    assert warmup.plan(_settings(tiny, dtype="fp16")).stamp != p.stamp
    monkeypatch.setenv("TRITON_CACHE_DIR", str(caches / "other"))
    assert warmup.plan(_settings(tiny)).stamp != p.stamp
    assert warmup.plan(_settings(tiny, device="cpu")) is None
    assert warmup.plan(_settings(tiny, deterministic=False)) is None
    assert warmup.plan(_settings(caches / "missing")) is None
    assert warmup.plan(_settings(tiny / "model.gguf")) is None


def test_a_hub_id_in_the_local_cache_is_planned_from_its_snapshot(tiny, caches, monkeypatch):
    """A hub id whose files are cached (what transformers loads offline) gets the side process, built from the
    snapshot's ``config.json``; one not cached, or no id at all, gets none."""
    import shutil

    from huggingface_hub import constants

    hub = caches / "hub"
    snapshot = hub / "models--org--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(tiny, snapshot)
    (hub / "models--org--tiny" / "refs").mkdir()
    (hub / "models--org--tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    p = warmup.plan(_settings("org/tiny"))
    assert p is not None and p.model == snapshot and p.stamp == warmup.plan(_settings(tiny)).stamp
    assert warmup.plan(_settings("org/other")) is None
    assert warmup.plan(_settings("no/such/dir/x")) is None


def test_another_config_is_another_stamp(tiny, caches, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny, other)
    (other / "config.json").write_text((tiny / "config.json").read_text().replace('"num_hidden_layers": 2',
                                                                                 '"num_hidden_layers": 3'))
    assert (other / "config.json").read_text() != (tiny / "config.json").read_text()
    assert warmup.plan(_settings(other)).stamp != warmup.plan(_settings(tiny)).stamp
    assert warmup.plan(_settings(other)).model == other


def test_the_side_process_starts_only_where_it_can_help(tiny, caches, monkeypatch):
    started = []

    class FakePopen:
        pid = 2**30  # no such process: it ended at once

        def __init__(self, cmd, env, **kwargs):
            started.append(cmd)
            assert env["PYTHONPATH"].split(os.pathsep) == [path for path in sys.path if path]  # this pmaccel

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    monkeypatch.setattr(warmup, "_gpu_node", lambda: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert isinstance(warmup.start(_settings(tiny, dtype="bf16")), FakePopen)
    assert started[-1] == [sys.executable, "-m", "pmaccel.warmup", "--model", str(tiny), "--dtype", "bf16",
                           "--device", "cuda"]
    monkeypatch.setenv("LOCAL_RANK", "1")  # not the machine's first rank
    assert warmup.start(_settings(tiny)) is None
    monkeypatch.setenv("LOCAL_RANK", "0")
    p = warmup.plan(_settings(tiny))
    p.stamp.write_text(f"{tiny}\ncompiled\n")
    assert warmup.start(_settings(tiny)) is not None  # the stamp counts only with the Triton cache it stands for
    (caches / "triton").mkdir()
    assert warmup.start(_settings(tiny)) is None  # compiled ahead already
    monkeypatch.setattr(warmup, "_gpu_node", lambda: False)
    assert warmup.start(_settings(tiny, dtype="fp16")) is None
    assert len(started) == 2


def test_the_processes_of_a_run_whose_side_process_runs_start_no_other(tiny, caches, monkeypatch):
    """The CLI starts the side process before its run imports; the run's ``run_job``, a child process for the run
    and the ranks it launches get its pid in ``STARTED_ENV`` and start none while it runs."""
    started = []

    class FakePopen:
        pid = os.getpid()  # a process that runs

        def __init__(self, cmd, env, **kwargs):
            started.append(cmd)

    real_popen = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    monkeypatch.setattr(warmup, "_gpu_node", lambda: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert warmup.start(_settings(tiny)) is not None and os.environ[warmup.STARTED_ENV] == str(os.getpid())
    assert warmup.start(_settings(tiny)) is None and len(started) == 1
    child = real_popen([sys.executable, "-c", "import sys; from pmaccel import warmup; sys.exit(warmup._started_above())"],
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert child.wait() == 1, "a child process sees it"
    ended = real_popen([sys.executable, "-c", "pass"])
    ended.wait()
    monkeypatch.setenv(warmup.STARTED_ENV, str(ended.pid))  # the side process has ended: a later run may start one
    assert warmup.start(_settings(tiny)) is not None and len(started) == 2


def test_a_gpu_node_is_a_numbered_nvidia_device_or_amd_kfd_not_hidden(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for nodes, found in ((["null", "nvidiactl", "nvidia-uvm", "nvidia0"], True), (["nvidiactl", "nvidia-uvm"], False),
                         (["kfd", "dri"], True), (["null", "tty"], False)):
        monkeypatch.setattr(os, "listdir", lambda path, nodes=nodes: nodes if path == "/dev" else [])
        assert warmup._gpu_node() is found, nodes
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not warmup._gpu_node()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert not warmup._gpu_node()


def test_without_cuda_the_side_process_ends_at_once_and_says_so_in_its_stamp(tiny, caches, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a machine without CUDA")
    assert warmup.main(["--model", str(tiny), "--device", "cuda"]) == 0
    p = warmup.plan(_settings(tiny))
    assert p.lock.exists() and p.stamp.read_text().splitlines() == [str(tiny), "not compiled: no CUDA device, no "
                                                                     "Triton or too little free device memory"]
    warmup.wait(_settings(tiny), timeout=5)  # its lock is free again


def test_the_side_process_a_run_starts_ends_by_itself_and_stamps_its_outcome(tiny, caches, monkeypatch):
    """The real thing, on a machine without CUDA: ``start`` launches ``python -m pmaccel.warmup``, which ends
    with exit status 0 and a stamp saying nothing was compiled; the next ``start`` launches none."""
    if torch.cuda.is_available():
        pytest.skip("a machine without CUDA")
    monkeypatch.setattr(warmup, "_gpu_node", lambda: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    side = warmup.start(_settings(tiny))
    assert side is not None and os.environ[warmup.STARTED_ENV] == str(side.pid)
    assert side.wait(timeout=300) == 0
    assert warmup.plan(_settings(tiny)).stamp.read_text().splitlines()[1].startswith("not compiled: no CUDA")
    assert warmup.start(_settings(tiny)) is None
    warmup.stop(side)
    assert warmup.STARTED_ENV not in os.environ, "the run leaves no trace of it"


def test_a_model_that_cannot_be_built_is_stamped_and_not_tried_again(tiny, caches, monkeypatch):
    """A failure (here: transformers cannot build the model) ends the side process with exit status 0 and a
    stamp naming the error, so the next run starts none; a run it did not finish (stopped) leaves none."""
    calls = []

    def broken(model, dtype, device):
        calls.append(model)
        raise ValueError("unknown model type 'custom'")

    monkeypatch.setattr(warmup, "compile_skeleton", broken)
    assert warmup.main(["--model", str(tiny)]) == 0
    p = warmup.plan(_settings(tiny))
    assert p.stamp.read_text().splitlines()[1] == "not compiled: ValueError: unknown model type 'custom'"
    assert p.done()  # with no Triton cache: nothing compiled stands behind this stamp
    assert warmup.main(["--model", str(tiny)]) == 0 and len(calls) == 1  # stamped: not tried again


def _holder(lock, seconds: float, mark) -> subprocess.Popen:
    """A process that holds ``lock`` for ``seconds``, then writes ``mark`` before it lets go."""
    code = textwrap.dedent(f"""
        import fcntl, pathlib, sys, time
        f = open({str(lock)!r}, "ab")
        fcntl.flock(f, fcntl.LOCK_EX)
        print("held", flush=True)
        time.sleep({seconds})
        pathlib.Path({str(mark)!r}).write_text("done")
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.skipif(sys.platform == "win32", reason="file locks of POSIX")
def test_a_run_waits_for_the_side_process_then_goes_on(tiny, caches, tmp_path):
    p = warmup.plan(_settings(tiny))
    warmup.wait(_settings(tiny), timeout=0)  # no side process ever: at once
    p.lock.parent.mkdir(parents=True)
    mark = tmp_path / "mark"
    holder = _holder(p.lock, 1.0, mark)
    warmup.wait(_settings(tiny))
    assert mark.read_text() == "done"  # it waited for the holder to finish
    holder.wait(timeout=30)
    mark.unlink()
    holder = _holder(p.lock, 60.0, mark)
    warmup.wait(_settings(tiny), timeout=0.3)  # it gives up after the timeout
    assert not mark.exists() and holder.poll() is None
    warmup.stop(holder)
    assert holder.poll() is not None


@pytest.mark.gpu
def test_after_the_side_process_a_run_compiles_nothing(tiny, caches):
    """``python -m pmaccel.warmup`` in empty caches compiles the kernel variants from the config and stamps its
    success; a process that then loads the model and compiles ahead adds nothing to Triton's cache (each variant
    is there), and its decode matches a model that compiled everything itself."""
    from pmaccel import invariant

    if invariant.triton is None:
        pytest.skip("compiles Triton kernels")
    env = dict(os.environ)
    subprocess.run([sys.executable, "-m", "pmaccel.warmup", "--model", str(tiny), "--dtype", "bf16"], env=env,
                   check=True, timeout=600)
    p = warmup.plan(_settings(tiny, dtype="bf16"))
    assert p.done() and p.stamp.read_text().splitlines() == [str(tiny), "compiled"]
    cache = caches / "triton"
    before = {path for path in cache.rglob("*") if path.is_file()}
    assert len(before) > 10
    code = textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM
        from pmaccel import invariant
        model = AutoModelForCausalLM.from_pretrained({str(tiny)!r}, dtype=torch.bfloat16).to("cuda")
        assert invariant.compile_ahead(model).result() == 0
    """)
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=600)
    after = {path for path in cache.rglob("*") if path.is_file()}
    assert after == before, sorted(str(path.relative_to(cache)) for path in after - before)


@pytest.mark.gpu
def test_the_cli_starts_the_side_process_on_a_first_run_only(tiny, caches, tmp_path, mixed):
    """A first run through the CLI leaves the stamp (its side process compiled ahead); the output is the same
    as a run that found the kernels compiled."""
    from pmaccel import invariant

    if invariant.triton is None:
        pytest.skip("compiles Triton kernels")
    env = {name: value for name, value in os.environ.items() if name != "LOCAL_RANK"}  # a plain run
    stamp = warmup.plan(_settings(tiny, device="cuda")).stamp
    outs, stamped = [], []
    for run in range(2):
        out = tmp_path / f"out{run}.jsonl"
        subprocess.run([sys.executable, "-m", "pmaccel", "--base_model", str(tiny), "--data_path", str(mixed),
                        "--out_path", str(out), "--max_new_tokens", "6", "--device", "cuda"], env=env, check=True,
                       timeout=600)
        assert warmup.plan(_settings(tiny, device="cuda")).done()
        assert stamp.read_text().splitlines()[1] == "compiled"
        outs.append(out.read_bytes())
        stamped.append(stamp.stat().st_mtime_ns)
    assert outs[0] == outs[1]
    assert stamped[0] == stamped[1]  # the repeat started no side process (only it writes the stamp)
