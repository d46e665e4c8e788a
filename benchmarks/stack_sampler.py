"""Where a run's wall clock goes: sample the main thread's Python stack every few milliseconds.

    python benchmarks/stack_sampler.py OUT.json -m pmaccel --base_model DIR --data_path rows.jsonl ...
    python benchmarks/stack_sampler.py --threads OUT.json -m pmaccel ...   # the other threads too

Runs the module as ``python -m`` would, while a thread reads the main thread's stack every
``--interval`` seconds (``sys._current_frames``). Unlike a tracing profiler it slows nothing down and
counts waiting as time: a frame that waits for the GPU (``.tolist()`` after the queued steps) shows
as long as it waits, so host work on the critical path and device-bound time separate. Seconds are
estimated as samples x (wall / samples). Prints the pmaccel frames by inclusive time; OUT.json keeps
the inclusive and leaf counts, the most frequent stacks, and a coarse timeline. With ``--threads``,
every other Python thread is sampled at the same moments, its inclusive counts kept under its name
(``threads`` in OUT.json; e.g. the kernel compiles of ``pmaccel.invariant.compile_ahead``).
"""

from __future__ import annotations

import collections
import json
import runpy
import sys
import threading
import time


def _name(frame) -> str:
    """``package/module.py:function``: the path from site-packages, or from this checkout's pmaccel/ or benchmarks/."""
    code = frame.f_code
    path = code.co_filename
    for marker in ("site-packages/", "/pmaccel/", "/benchmarks/"):
        if marker in path:
            path = marker.lstrip("/").replace("site-packages/", "") + path.split(marker, 1)[1]
            break
    return f"{path}:{code.co_name}"


def _chain(frame) -> list[str]:
    """The frame's stack, innermost first."""
    chain = []
    while frame is not None:
        chain.append(_name(frame))
        frame = frame.f_back
    return chain


def main() -> int:
    args = sys.argv[1:]
    interval, all_threads = 0.005, False
    while args[:1] in (["--interval"], ["--threads"]):
        if args[0] == "--threads":
            all_threads, args = True, args[1:]
        else:
            interval, args = float(args[1]), args[2:]
    if len(args) < 3 or args[1] != "-m":
        print(__doc__, file=sys.stderr)
        return 2
    out, module = args[0], args[2]
    sys.argv = [module, *args[3:]]
    main_thread = threading.get_ident()
    inclusive, leaf, stacks = collections.Counter(), collections.Counter(), collections.Counter()
    timeline: list[tuple[float, str]] = []
    others: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)  # thread -> inclusive
    taken, stop = [0], threading.Event()
    start = time.perf_counter()

    def sample() -> None:
        me = threading.get_ident()
        while not stop.wait(interval):
            frames = sys._current_frames()
            if all_threads:
                names = {t.ident: t.name for t in threading.enumerate()}
                for ident, other in frames.items():
                    if ident not in (main_thread, me):
                        others[names.get(ident, str(ident))].update(set(_chain(other)))
            frame = frames.get(main_thread)
            if frame is None:
                continue
            taken[0] += 1
            chain = _chain(frame)
            inclusive.update(set(chain))
            leaf[chain[0]] += 1
            own = [c for c in chain if c.startswith("pmaccel/")]
            stacks[" < ".join(chain[:2] + own[:3])] += 1
            if taken[0] % 50 == 0:
                timeline.append((round(time.perf_counter() - start, 2), own[0] if own else chain[0]))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        stop.set()
        sampler.join()
        wall = time.perf_counter() - start
        per = wall / max(taken[0], 1)
        with open(out, "w") as f:
            json.dump({"wall_s": wall, "samples": taken[0], "seconds_per_sample": per,
                       "inclusive": inclusive.most_common(300), "leaf": leaf.most_common(100),
                       "stacks": stacks.most_common(200), "timeline": timeline,
                       "threads": {name: counts.most_common(100) for name, counts in others.items()}}, f, indent=0)
        print(f"\n{taken[0]} samples over {wall:.1f} s; pmaccel frames by inclusive seconds:", file=sys.stderr)
        for name, n in inclusive.most_common():
            if name.startswith("pmaccel/") and n * per >= 0.1:
                print(f"{n * per:8.2f}  {name}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
