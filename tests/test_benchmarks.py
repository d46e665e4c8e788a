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


def test_e2e_against_another_package_runs_it_from_its_directory_and_compares_the_outputs(tmp_path, tiny):
    """``e2e.py --against DIR`` runs each pmaccel run again with DIR's package (here a copy that says so on
    stderr), right after this checkout's, and records whether the two output files are byte-identical."""
    import shutil

    against = tmp_path / "against"
    shutil.copytree(ROOT / "pmaccel", against / "pmaccel", ignore=shutil.ignore_patterns("__pycache__"))
    cli = against / "pmaccel" / "cli.py"
    cli.write_text(cli.read_text() + "\nsys.stderr.write('pmaccel from the other directory\\n')\n")
    assert "\nimport sys\n" in cli.read_text()
    results = tmp_path / "e2e.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "e2e.py"), "--arch", "tiny", "--rows", "6", "--max_new_tokens",
         "4", "--device", "cpu", "--gpus", "1", "--runs", "pmaccel", "--twice", "none", "--against", str(against),
         "--tokenizer", str(tiny), "--workdir", str(tmp_path / "work"), "--json", str(results)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ours, theirs = json.loads(results.read_text())["results"]
    assert ours["engine"] == "this checkout" and theirs["engine"] == str(against.resolve())
    assert theirs["same_output"] is True and "same_output" not in ours
    assert "other directory" in Path(theirs["stderr"]).read_text()
    assert "other directory" not in Path(ours["stderr"]).read_text()
    assert "| pmaccel (against, same output) | 1 | first |" in done.stdout


def test_e2e_says_when_the_other_package_wrote_another_output(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import e2e
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    jobs = []
    for engine, text in (("", "a\n"), ("/elsewhere", "b\n"), ("/elsewhere", "a\n")):
        out = tmp_path / f"{len(jobs)}.jsonl"
        out.write_text(text)
        jobs.append(e2e.Job("pmaccel", 1, "first", [], out, tmp_path, engine=engine, round=len(jobs)))
    jobs[2].round = jobs[0].round  # the third is the first's twin; the second has none
    e2e.compare_engines(jobs)
    assert jobs[2].result["same_output"] is True and "same_output" not in jobs[1].result
    jobs[1].round = jobs[0].round
    e2e.compare_engines(jobs)
    assert jobs[1].result["same_output"] is False


def test_e2e_pairs_alternate_which_package_runs_first(tmp_path):
    """With ``--against`` and several rounds, the two packages take turns going first (the later run of a pair
    finds the OS's caches warmer); within a package, first run before repeat; the idiom runs once."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import e2e
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    against = tmp_path / "base"
    import argparse

    args = argparse.Namespace(workdir=str(tmp_path), twice="pmaccel", against=str(against), gpus="1",
                              runs="idiom,pmaccel", rounds=3, max_new_tokens=4, dtype="auto", device="cpu",
                              batch_size=8, launcher="accelerate", pmaccel_args="")
    order = [(j.run, j.round, "base" if j.engine else "ours", j.cache) for j in e2e.plan(args)]
    pairs = [[("pmaccel", rnd, who, cache) for cache in ("first", "repeat")] for rnd in (1, 2, 3)
             for who in (("ours", "base") if rnd % 2 else ("base", "ours"))]
    assert order == [("idiom", 1, "ours", "first")] + [job for pair in pairs for job in pair]
