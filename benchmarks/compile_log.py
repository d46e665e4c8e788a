"""Every Triton compile a command makes: when it started, how long it took, in which thread.

    python benchmarks/compile_log.py compiles.txt -m pmaccel --data_path rows.jsonl --out_path out.jsonl

Runs the module as ``python -m`` would, with ``triton.compiler.compile`` wrapped, and writes one line per
call: seconds since this script started, seconds the call took (a few ms when Triton's on-disk cache has
the kernel), the thread, the kernel and its warps and stages. Shows whether a first run compiles on the
critical path (``MainThread``) or ahead, in ``pmaccel.invariant.compile_ahead``'s threads.
"""

from __future__ import annotations

import runpy
import sys
import threading
import time


def main() -> int:
    started = time.perf_counter()
    if len(sys.argv) < 4 or sys.argv[2] != "-m":
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    out, module = sys.argv[1], sys.argv[3]
    sys.argv = [module, *sys.argv[4:]]
    import triton.compiler

    original = triton.compiler.compile
    lines: list[str] = []

    def compile(src, *args, **kwargs):  # noqa: A001  (the name Triton's JIT looks up)
        t = time.perf_counter()
        kernel = original(src, *args, **kwargs)
        options = kwargs.get("options") or {}
        name = getattr(getattr(src, "fn", None), "__name__", type(src).__name__)
        lines.append(f"{t - started:8.2f} {time.perf_counter() - t:6.3f} {threading.current_thread().name:20s} "
                     f"{name} warps={options.get('num_warps')} stages={options.get('num_stages')}")
        return kernel

    triton.compiler.compile = compile
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0
    finally:
        with open(out, "w") as f:
            f.write("\n".join(lines) + f"\nwall {time.perf_counter() - started:.2f}\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
