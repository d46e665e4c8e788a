"""Where a decode step's time goes: graph replay time per row bucket, and the kernels of an eager step.

    python benchmarks/profile_step.py --model 0.5b --workload W1
    python benchmarks/profile_step.py --e2e_dir /tmp/pmaccel-e2e   # the rows and model benchmarks/e2e.py wrote

With ``--e2e_dir`` the engine first decodes those rows twice (the second run warm) and prints its phases;
``--prefill`` then times and profiles the admission of a pool's worth of those rows (prefill forwards only).
"""

from __future__ import annotations

import argparse
import collections
import json
import time
import traceback
import warnings
from pathlib import Path

import torch
from bench import WORKLOADS, IdsTokenizer, build_model, make_samples

import pmaccel
from pmaccel.engine import Engine, EngineConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="0.5b")
    ap.add_argument("--workload", default="W2")
    ap.add_argument("--mask", default="columnar")
    ap.add_argument("--rows", type=int, default=25, help="kernels to list")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--e2e_dir", default=None, help="profile the model and rows.jsonl of a benchmarks/e2e.py workdir")
    ap.add_argument("--max_new_tokens", type=int, default=128, help="with --e2e_dir")
    ap.add_argument("--prefill_tokens", type=int, default=None, help="the engine's prefill budget (default: its own)")
    ap.add_argument("--no_deterministic", action="store_true", help="the default kernels, not the invariant ones")
    ap.add_argument("--prefill", action="store_true", help="with --e2e_dir: profile prefill, not the step")
    ap.add_argument("--live", action="store_true",
                    help="profile a whole warm run of --workload, kernels per step (an empty pool's step attends to "
                         "no keys); not with --e2e_dir")
    args = ap.parse_args()
    if args.live and args.e2e_dir:
        ap.error("--live profiles a --workload run; with --e2e_dir use --prefill or the step profile")
    deterministic = False if args.no_deterministic else None
    budget = {} if args.prefill_tokens is None else {"prefill_tokens": args.prefill_tokens}
    if args.e2e_dir:
        work = Path(args.e2e_dir)
        model, tok = pmaccel.load_model(str(work / "model"), dtype="bf16")
        rows = [json.loads(line) for line in (work / "rows.jsonl").read_text().splitlines()]
        engine = Engine(model, EngineConfig(deterministic=deterministic, **budget))
        for run in ("first", "warm"):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = pmaccel.generate(model, tok, rows, max_new_tokens=args.max_new_tokens, mask=args.mask, engine=engine)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t
            st = engine.stats
            tokens = sum(len(ids) for r in out for ids in r["output_ids"])
            lanes_used = tokens / max(1, st["steps"] * st["lanes"])
            print(f"{run}: {wall:.2f} s, {tokens} tokens, steps {st['steps']:.0f}, rows {st['rows']:.0f} x K "
                  f"{st['lanes'] / st['rows']:.0f}, lane use {lanes_used:.0%}; capture {st['capture_s']:.2f}, "
                  f"prefill {st['prefill_s']:.2f} ({st['prefills']:.0f} forwards), decode {st['decode_s']:.2f}, "
                  f"other {wall - st['capture_s'] - st['prefill_s'] - st['decode_s']:.2f}")
            engine._reset_stats()
    else:
        model = build_model(args.model, "cuda")
        w = WORKLOADS[args.workload]
        samples = make_samples(w, model.config.vocab_size)
        engine = Engine(model, EngineConfig(max_rows=len(samples), deterministic=deterministic, **budget))
        pmaccel.generate(model, IdsTokenizer(), samples, max_new_tokens=w.new, mask=args.mask, engine=engine)
        if args.live:
            before = engine.stats["steps"]
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                pmaccel.generate(model, IdsTokenizer(), samples, max_new_tokens=w.new, mask=args.mask, engine=engine)
                torch.cuda.synchronize()
            steps = int(engine.stats["steps"] - before)
            print_kernels(prof, f"kernels of a whole run ({steps} steps and the prefill), per step", args.rows,
                          per=steps, unit="ms/step", scale=1e3)
            return
    runner = engine.runner  # kept after the run: its pool is empty, so a step costs what a full one does
    if args.e2e_dir and args.prefill:
        profile_prefill(args, engine, tok, rows)
        return
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for n in sorted(runner.graphs, reverse=True):
        runner.run_steps(n, 3)
        start.record()
        runner.run_steps(n, 50)
        end.record()
        torch.cuda.synchronize()
        print(f"graph replay: {start.elapsed_time(end) / 50:.3f} ms/step  (rows={n} K={runner.K} S={runner.S})")
    if args.no_profile:
        return
    n = runner.R
    with torch.inference_mode(), engine.attention():
        start.record()
        for _ in range(10):
            runner.step(n)
        end.record()
        torch.cuda.synchronize()
        print(f"eager step:   {start.elapsed_time(end) / 10:.3f} ms/step")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                runner.step(n)
            torch.cuda.synchronize()
    print_kernels(prof, "kernels", args.rows, per=5, unit="ms/step", scale=1e3)


def profile_prefill(args: argparse.Namespace, engine: Engine, tok, rows: list[dict]) -> None:
    """Admit a full pool of rows (the engine's own chunks), timed with the device, then once under the profiler."""
    from pmaccel.engine import _prefill_chunks
    from pmaccel.request import Layout, pack_request

    runner = engine.runner
    packs = [pack_request(r, tok, Layout.of({}), i)[1] for i, r in enumerate(rows[: runner.R])]
    packs = [p for p in packs if len(p.branch_ids) <= runner.K]
    take = list(enumerate(range(len(packs))))
    budget = engine.prefill_budget(max(p.num_tokens for p in packs))
    chunks = list(_prefill_chunks(take, packs, budget))
    tokens = sum(p.num_tokens for p in packs)
    pad = tok.pad_token_id or 0

    def admit() -> None:
        for chunk in chunks:
            rows_, pos = [r for r, _ in chunk], [i for _, i in chunk]
            runner.prefill([packs[i] for i in pos], rows_, pos, pad)
        runner.clear_row(slice(None))

    with torch.inference_mode(), engine.attention():
        admit()
        torch.cuda.synchronize()
        t = time.perf_counter()
        admit()
        host = time.perf_counter() - t
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
        padded = sum(len(c) * max(packs[i].num_tokens for _, i in c) for c in chunks)
        print(f"prefill: {len(packs)} samples, {tokens} prompt tokens ({padded} padded, budget {budget}), "
              f"{len(chunks)} forwards: {wall:.3f} s "
              f"({tokens / wall:,.0f} tok/s; host done after {host:.3f} s)")
        syncs: list[str] = []

        def where(message, *_args, **_kwargs) -> None:  # the calling line outside torch's own modules
            if "synchroniz" in str(message):
                frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename
                          and "warnings" not in f.filename and not f.filename.endswith("invariant.py")]
                syncs.append(" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-3:][::-1]))

        with warnings.catch_warnings():  # what in a prefill waits for the device
            warnings.simplefilter("always")
            warnings.showwarning = where
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for chunk in chunks[:1]:
                    runner.prefill([packs[i] for _, i in chunk], [r for r, _ in chunk], [i for _, i in chunk], pad)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            runner.clear_row(slice(None))
        print(f"prefill forward: {len(syncs)} host syncs"
              + "".join(f"\n  {n}x {m}" for m, n in collections.Counter(syncs).most_common(8)))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            admit()
            torch.cuda.synchronize()
        import cProfile
        import pstats

        host = cProfile.Profile()  # where the host's time goes (a prefill is bound by it where kernels are short)
        host.enable()
        admit()
        torch.cuda.synchronize()
        host.disable()
    print_kernels(prof, "prefill kernels", args.rows, per=1, unit="s", scale=1e6)
    print("prefill on the host (cProfile, its own overhead included), by own time:")
    pstats.Stats(host).sort_stats("tottime").print_stats(args.rows)


def print_kernels(prof, title: str, rows: int, per: int, unit: str, scale: float) -> None:
    """The profiled device time in all and its ``rows`` largest kernels, per ``per`` repetitions
    (device microseconds / ``scale`` in ``unit``)."""
    events = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in events)
    print(f"{title}: {total / per / scale:.3f} {unit} in all")
    for e in events[:rows]:
        print(f"  {e.self_device_time_total / per / scale:7.3f} {unit} {e.count // per:5d}x  {e.key[:90]}")


if __name__ == "__main__":
    main()
