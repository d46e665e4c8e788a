"""What a launcher costs by itself: the seconds from the command to its first process, and from the last
process's end to the command's end, for a script that imports torch, creates an Accelerator and meets a
barrier.

    python benchmarks/launch_overhead.py --procs 2                 # accelerate launch, torchrun, none
    python benchmarks/launch_overhead.py --procs 2 --cpu --repeats 2

Each process records when it started (its start tick against the boot clock, Linux) and when it ended;
the wall clock is taken around the command.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = '''
import json, os, sys, time
def started():
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))
ev = {"start": started()}
import torch
ev["torch"] = time.time()
from accelerate import Accelerator
acc = Accelerator(cpu=os.environ.get("LO_CPU") == "1")
acc.wait_for_everyone()
ev["end"] = time.time()
with open(os.path.join(os.environ["LO_DIR"], f"{acc.process_index}.json"), "w") as f:
    json.dump(ev, f)
'''


def exe(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name) or name


def commands(procs: int, script: str, cpu: bool) -> dict[str, list[str]]:
    acc = [exe("accelerate"), "launch", "--num_processes", str(procs), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no"]
    acc += ["--multi_gpu"] if procs > 1 else (["--cpu"] if cpu else [])
    return {"accelerate launch": [*acc, script], "torchrun": [exe("torchrun"), "--nproc_per_node", str(procs), script],
            "none (one process)": [sys.executable, script]}


def measure(cmd: list[str], cpu: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "LO_DIR": out, "LO_CPU": "1" if cpu else "0"}
        t0 = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        t1 = time.time()
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        events = [json.loads(p.read_text()) for p in Path(out).glob("*.json")]
    return {"wall_s": t1 - t0, "before_s": min(e["start"] for e in events) - t0,
            "import_torch_s": max(e["torch"] - e["start"] for e in events),
            "after_s": t1 - max(e["end"] for e in events), "processes": len(events)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cpu", action="store_true", help="processes on the CPU (gloo)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp, "worker.py")
        script.write_text(WORKER)
        print("| launcher | processes | wall s | before the first process | import torch | after the last end |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, cmd in commands(args.procs, str(script), args.cpu).items():
            for _ in range(args.repeats):
                m = measure(cmd, args.cpu)
                print(f"| {name} | {m['processes']} | {m['wall_s']:.2f} | {m['before_s']:.2f} | "
                      f"{m['import_torch_s']:.2f} | {m['after_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
