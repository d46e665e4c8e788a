"""What N GPUs give with no coordination at all: N independent one-GPU ``pmaccel`` commands at once, each on its
own GPU and 1/N of the rows, then one of them alone (the bound a run of N processes can approach).

    python benchmarks/e2e.py prepare --arch 0.5b --rows 6144          # the workload, in /tmp/pmaccel-e2e
    python benchmarks/halves.py --workdir /tmp/pmaccel-e2e --gpus 2 --json halves.json

The commands share one cache directory (``HOME``, ``PMACCEL_CACHE``, Triton's), empty at the start: the first
round is a machine's first run, the second a repeat. Prints each round's wall clock (from the start of the first
command to the end of the last) and each command's phases; ``--json`` keeps them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from e2e import environment  # this directory's

PHASES = ("start_s", "read_s", "load_s", "tokenize_s", "run_s", "capture_s", "prefill_s", "decode_s", "write_s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/pmaccel-e2e", help="what e2e.py prepare wrote: model/, rows.jsonl")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work, here = Path(args.workdir), Path(args.workdir) / "halves"
    shutil.rmtree(here, ignore_errors=True)
    (here / "cache" / "home").mkdir(parents=True)
    rows = (work / "rows.jsonl").read_text().splitlines(keepends=True)
    parts = []
    for g in range(args.gpus):
        parts.append(here / f"rows{g}.jsonl")
        parts[-1].write_text("".join(rows[g * len(rows) // args.gpus:(g + 1) * len(rows) // args.gpus]))
    env = environment(here / "cache")  # every compile cache and HOME in one directory, as e2e.py's runs

    def start(gpu: int, data: Path, out: Path) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "pmaccel", "--base_model", str(work / "model"), "--data_path", str(data),
               "--out_path", str(out), "--max_new_tokens", str(args.max_new_tokens), "--dtype", "bf16"]
        return subprocess.Popen(cmd, env=dict(env, CUDA_VISIBLE_DEVICES=str(gpu)), stdout=open(f"{out}.log", "w"),
                                stderr=subprocess.STDOUT)

    results = []
    for name, gpus in (("first, at once", args.gpus), ("repeat, at once", args.gpus), ("repeat, one alone", 1)):
        outs = [here / f"{name.replace(', ', '-').replace(' ', '_')}-{g}.jsonl" for g in range(gpus)]
        t = time.perf_counter()
        procs = [start(g, parts[g], outs[g]) for g in range(gpus)]
        codes = [p.wait() for p in procs]
        wall = time.perf_counter() - t
        phases = [json.loads(Path(f"{o}.summary.json").read_text())["phases"][0] if c == 0 else {}
                  for o, c in zip(outs, codes)]
        results.append({"run": name, "commands": gpus, "rows_each": len(rows) // args.gpus, "wall_s": round(wall, 2),
                        "exit": codes, "phases": phases})
        print(f"{name}: {wall:.1f} s (exit {codes})")
        for ph in phases:
            print("   ", " · ".join(f"{k[:-2]} {ph[k]:.2f}" for k in PHASES if k in ph))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
