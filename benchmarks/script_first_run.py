"""A script's first run on a machine: a process that imported transformers before it calls ``pmaccel.infer``.

    python benchmarks/script_first_run.py --model DIR --rows rows.jsonl --out out.jsonl --side auto
    python benchmarks/script_first_run.py ... --side force   # a side process compiles the kernels, as the CLI's

Give the process empty caches to time a first run (``PMACCEL_CACHE``, ``TRITON_CACHE_DIR``, ``HOME`` pointing at
a fresh directory). ``--side auto`` is what pmaccel does: such a process compiles the kernels in its own threads;
``--side force`` starts ``pmaccel.warmup``'s side process all the same. Prints one JSON line: the seconds of the
imports and of the ``infer()`` call, and the run's phases (``<out>.summary.json``).
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--rows", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--side", choices=("auto", "force"), default="auto")
    args = ap.parse_args()
    started = time.perf_counter()
    import transformers  # noqa: F401  (what a script has usually done before it runs pmaccel)

    import pmaccel
    from pmaccel import run

    if args.side == "force":
        run._imports_ahead = lambda: True
    imported = time.perf_counter()
    records = pmaccel.infer(base_model=args.model, data_path=args.rows, out_path=args.out,
                            max_new_tokens=args.max_new_tokens, dtype="bf16")
    done = time.perf_counter()
    print(json.dumps({"side": args.side, "import_s": round(imported - started, 3),
                      "infer_s": round(done - imported, 3), "phases": records.summary.phases}), flush=True)


if __name__ == "__main__":
    main()
