"""The benchmark helpers that measure other code (their figures go to docs/PERFORMANCE.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_stack_sampler_counts_waiting_time_and_keeps_the_exit_status(tmp_path):
    (tmp_path / "sleepy.py").write_text(
        "import sys, time\n"
        "def waits():\n    time.sleep(0.6)\n"
        "def busy():\n    end = time.perf_counter() + 0.3\n    while time.perf_counter() < end: pass\n"
        "if __name__ == '__main__':\n    waits(); busy(); sys.exit(int(sys.argv[1]))\n")
    out = tmp_path / "stacks.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "stack_sampler.py"), str(out), "-m", "sleepy", "3"],
                          env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    found = json.loads(out.read_text())
    seconds = {name.rsplit(":", 1)[1]: n * found["seconds_per_sample"] for name, n in found["inclusive"]}
    assert 0.3 < seconds["waits"] < 2 and 0.1 < seconds["busy"] < 2 and seconds["waits"] > seconds["busy"]
    assert found["wall_s"] > 0.85


def test_stack_sampler_samples_the_other_threads_by_name(tmp_path):
    (tmp_path / "threaded.py").write_text(
        "import threading, time\n"
        "def compiles():\n    time.sleep(0.6)\n"
        "t = threading.Thread(target=compiles, name='helper-0')\nt.start()\ntime.sleep(0.2)\nt.join()\n")
    out = tmp_path / "stacks.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "stack_sampler.py"), "--threads", str(out),
                           "-m", "threaded"], env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    found = json.loads(out.read_text())
    helper = {name.rsplit(":", 1)[1]: n * found["seconds_per_sample"] for name, n in found["threads"]["helper-0"]}
    assert 0.3 < helper["compiles"] < 2  # its own time, not the main thread's
    assert not any(name.endswith(":compiles") for name, _ in found["inclusive"])
