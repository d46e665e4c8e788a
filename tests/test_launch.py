"""``--num_processes N``: a run that starts its own processes (accelerate's launcher, called from the run):
the same file as one process, one line for an input error, and the counts it refuses."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_infer import REPO, repo_path

from pmaccel import cli, launch
from pmaccel.errors import PMAccelError
from pmaccel.inference import GenerateJob, infer
from pmaccel.run import LAUNCHED_ENV
from pmaccel.settings import Settings


def cli_env(**extra: str) -> dict[str, str]:
    """This environment without a launcher's variables, importing this checkout, one thread a process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo_path(), **extra}
    for name in LAUNCHED_ENV:
        env.pop(name, None)
    return env


@pytest.fixture
def unlaunched(monkeypatch):
    """This test process as ``cli_env`` describes it (for calls that start processes from here)."""
    for name in LAUNCHED_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", repo_path())  # the started processes import this checkout


def pmaccel_cli(*flags: str, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pmaccel", *flags], env=cli_env(**extra_env), capture_output=True,
                          text=True, timeout=300)


def test_two_started_processes_write_the_file_of_one(tiny, mixed, tmp_path):
    common = ["--base_model", str(tiny), "--data_path", str(mixed), "--branches_per_sample", "2",
              "--max_new_tokens", "8", "--device", "cpu"]
    one = pmaccel_cli(*common, "--out_path", str(tmp_path / "one.jsonl"))
    assert one.returncode == 0, one.stderr[-3000:]
    # a user's default accelerate config (one GPU id, fp16, no distribution) changes nothing of it
    config = tmp_path / "hf" / "accelerate" / "default_config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nnum_processes: 1\n"
                      "gpu_ids: '0'\nmixed_precision: fp16\nuse_cpu: false\n")
    two = pmaccel_cli(*common, "--num_processes", "2", "--out_path", str(tmp_path / "two.jsonl"),
                      HF_HOME=str(tmp_path / "hf"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert two.stdout.count("pmaccel: 10 rows") == 1, "one summary, from the main process"
    summary = json.loads((tmp_path / "two.jsonl.summary.json").read_text())
    assert len(summary["phases"]) == 2, "two processes did the work"
    assert [p["samples"] for p in summary["phases"]] != [0, 0]
    assert not list(tmp_path.glob("two.jsonl.part-*")), "no part file left behind"


def test_an_input_error_is_one_line_from_started_processes(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"main": "a", "branches": ["b"]}\n{"main": "a", "branches": 3}\n')
    out = tmp_path / "out.jsonl"
    proc = pmaccel_cli("--base_model", str(tiny), "--data_path", str(bad), "--out_path", str(out),
                       "--max_new_tokens", "2", "--device", "cpu", "--num_processes", "2")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pmaccel: error: ") and "bad.jsonl:2" in lines[0], proc.stderr
    assert not out.exists()


def test_infer_starts_the_processes_and_returns_the_records(tiny, mixed, tmp_path, unlaunched):
    common = dict(base_model=str(tiny), data_path=str(mixed), branches_per_sample=2, max_new_tokens=6,
                  temperature=1.0, seed=3, device="cpu")
    alone = infer(out_path=str(tmp_path / "one.jsonl"), **common)
    started = infer(out_path=str(tmp_path / "two.jsonl"), num_processes=2, **common)
    assert started == alone
    assert started.summary.samples == alone.summary.samples and len(started.summary.phases) == 2


def test_process_counts_refused(monkeypatch, unlaunched):
    with pytest.raises(PMAccelError, match="num_processes: must be at least 1"):
        Settings(num_processes=0)
    assert launch.check_process_count(Settings()) is False
    assert launch.check_process_count(Settings(num_processes=3, device="cpu")) is True
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(PMAccelError, match="this machine has 2"):
        launch.check_process_count(Settings(num_processes=4))
    # under a launcher its own count applies; another count is an error, not a second launch
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launch.check_process_count(Settings(num_processes=2)) is False
    with pytest.raises(PMAccelError, match="launcher started 2"):
        launch.check_process_count(Settings(num_processes=4))


class SecondRankFails(GenerateJob):
    """A job that only the second process refuses (an error the main process never meets)."""

    def check(self, settings):
        if os.environ.get("RANK") == "1":
            raise PMAccelError("only the second process meets this", field="max_new_tokens")


def test_an_error_of_another_process_than_the_main_one_comes_back(tiny, mixed, tmp_path, monkeypatch, unlaunched):
    monkeypatch.setenv("PYTHONPATH", repo_path(REPO / "tests"))  # the job's module
    settings = Settings(base_model=str(tiny), data_path=str(mixed), out_path=str(tmp_path / "out.jsonl"),
                        max_new_tokens=2, device="cpu", num_processes=2)
    with pytest.raises(PMAccelError, match="only the second process meets this"):
        launch.run_processes(settings, SecondRankFails())
    assert not (tmp_path / "out.jsonl").exists()


class GpusSeen(GenerateJob):
    """A job that notes the GPUs its process is shown (``CUDA_VISIBLE_DEVICES``), then, once every process has,
    stops on an input error (the launcher ends the others when one process ends)."""

    def check(self, settings):
        import time

        seen = Path(os.environ["GPUS_SEEN_DIR"])
        (seen / f"{os.environ.get('RANK', '0')}.tmp").write_text(repr(os.environ.get("CUDA_VISIBLE_DEVICES")))
        os.replace(seen / f"{os.environ.get('RANK', '0')}.tmp", seen / os.environ.get("RANK", "0"))
        deadline = time.monotonic() + 120
        while len(list(seen.glob("[0-9]"))) < int(os.environ.get("WORLD_SIZE", "1")) and time.monotonic() < deadline:
            time.sleep(0.05)
        raise PMAccelError("seen", field="device")


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_started_processes_of_a_cpu_run_see_no_gpu(tiny, mixed, tmp_path, monkeypatch, unlaunched, device):
    """A run on the CPU: the processes pmaccel starts are shown no GPU (torch's gloo barrier would start CUDA on
    GPU <rank>); the caller keeps its own. A run on the GPUs: they see the caller's."""
    monkeypatch.setenv("PYTHONPATH", repo_path(REPO / "tests"))  # the job's module
    monkeypatch.setenv("GPUS_SEEN_DIR", str(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    settings = Settings(base_model=str(tiny), data_path=str(mixed), out_path=str(tmp_path / "out.jsonl"),
                        device=device, num_processes=2)
    with pytest.raises(PMAccelError, match="seen"):
        launch.run_processes(settings, GpusSeen())
    expected = "''" if device == "cpu" else "'0'"
    assert sorted(p.read_text() for p in tmp_path.glob("[01]")) == [expected, expected]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"


@pytest.mark.parametrize("processes", [1, 2])
def test_ctrl_c_is_one_line_and_status_130(tiny, mixed, tmp_path, processes):
    """Ctrl-C reaches every process of the terminal's group: one line from the run, exit 130, part files kept."""
    import signal
    import time

    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "pmaccel", "--base_model", str(tiny), "--data_path", str(mixed),
                             "--out_path", str(out), "--max_new_tokens", "100000", "--device", "cpu",
                             "--num_processes", str(processes)],
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("out.jsonl.part-*"))) < processes:  # every process is decoding
            assert proc.poll() is None and time.monotonic() < deadline, "the run never started decoding"
            time.sleep(0.2)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = [line for line in stderr.replace("\r", "\n").splitlines()
             if line.strip() and not re.search(r"\d+%\|", line)]  # all but the progress bars
    assert proc.returncode == 130, stderr[-3000:]
    assert lines == [cli.INTERRUPTED], stderr[-3000:]
    assert not out.exists() and len(list(tmp_path.glob("out.jsonl.part-*"))) == processes


@pytest.mark.parametrize("end", ["SIGTERM to the starting process", "SIGKILL of a started process"])
def test_the_processes_end_together(tiny, mixed, tmp_path, end):
    """The starting process ends, or one started process dies: the launcher's agent stops the others (they would
    wait for it forever), none is left running, and the command fails."""
    import signal
    import time

    import psutil

    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "pmaccel", "--base_model", str(tiny), "--data_path", str(mixed),
                             "--out_path", str(out), "--max_new_tokens", "100000", "--device", "cpu",
                             "--num_processes", "2"],
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("out.jsonl.part-*"))) < 2:  # both processes are decoding
            assert proc.poll() is None and time.monotonic() < deadline, "the run never started decoding"
            time.sleep(0.2)
        ranks = [p for p in psutil.Process(proc.pid).children() if "pmaccel.launch" in p.cmdline()]
        assert len(ranks) == 2
        if end == "SIGTERM to the starting process":
            proc.send_signal(signal.SIGTERM)
        else:
            ranks[1].kill()
        _, stderr = proc.communicate(timeout=60)
        _, alive = psutil.wait_procs(ranks, timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not alive, "a started process is left running"
    if end == "SIGTERM to the starting process":  # ended as the signal ends a process, without a traceback
        assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr[-3000:]
    else:
        assert proc.returncode == 1 and re.search(r"of 2 pmaccel processes failed \(exit status [-0-9, ]*-9\)", stderr), \
            stderr[-3000:]
    assert not out.exists()


def test_the_command_ends_after_its_threads_and_exit_handlers(tmp_path):
    """``cli.end_now``: the interpreter's teardown is skipped, not what ends a process properly: a running thread
    that is no daemon is waited for, an idle thread pool (whose workers are no daemons) is told to end, then the
    exit handlers run, and buffered output comes out."""
    code = f"""
import atexit, pathlib, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from pmaccel.cli import end_now

done = pathlib.Path({str(tmp_path)!r})
atexit.register(lambda: (done / "handler").write_text(str((done / "thread").exists())))
threading.Thread(target=lambda: (time.sleep(0.5), (done / "thread").write_text("x"))).start()
ThreadPoolExecutor(1).submit(time.sleep, 0.1)  # never shut down
sys.stdout.write("unflushed")
end_now(3)
"""
    proc = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 and proc.stdout == "unflushed", proc.stderr[-3000:]
    assert (tmp_path / "handler").read_text() == "True", "the handler ran after the thread ended"


class SecondRankBreaks(GenerateJob):
    """A job whose second process meets an unforeseen error (not an input error)."""

    def check(self, settings):
        if os.environ.get("RANK") == "1":
            raise RuntimeError("the second process broke")


def test_an_unforeseen_error_of_a_started_process_is_shown(tiny, mixed, tmp_path, monkeypatch, unlaunched, capfd):
    """Its traceback is in the output, and the starting process says which exit status ended it."""
    monkeypatch.setenv("PYTHONPATH", repo_path(REPO / "tests"))  # the job's module
    settings = Settings(base_model=str(tiny), data_path=str(mixed), out_path=str(tmp_path / "out.jsonl"),
                        max_new_tokens=2, device="cpu", num_processes=2)
    with pytest.raises(RuntimeError, match=r"of 2 pmaccel processes failed \(exit status ([-0-9]+, )?1\)"):
        launch.run_processes(settings, SecondRankBreaks())
    stderr = capfd.readouterr().err
    assert "Traceback" in stderr and "RuntimeError: the second process broke" in stderr, stderr[-3000:]
    assert not (tmp_path / "out.jsonl").exists()
