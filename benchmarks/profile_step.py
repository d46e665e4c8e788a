"""Where a decode step's time goes: graph replay time per row bucket, and the kernels of an eager step.

    python benchmarks/profile_step.py --model 0.5b --workload W1
"""

from __future__ import annotations

import argparse

import torch
from bench import WORKLOADS, IdsTokenizer, build_model, make_samples

import pmaccel
from pmaccel.engine import Engine, EngineConfig
from pmaccel.slots import grouped_attention


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="0.5b")
    ap.add_argument("--workload", default="W2")
    ap.add_argument("--mask", default="columnar")
    ap.add_argument("--rows", type=int, default=25, help="kernels to list")
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    model = build_model(args.model, "cuda")
    w = WORKLOADS[args.workload]
    samples = make_samples(w, model.config.vocab_size)
    engine = Engine(model, EngineConfig(max_rows=len(samples)))
    pmaccel.generate(model, IdsTokenizer(), samples, max_new_tokens=w.new, mask=args.mask, engine=engine)
    runner = engine.runner  # kept after the run: its pool is empty, so a step costs what a full one does
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
    with torch.inference_mode(), grouped_attention(model):
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
    events = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in events)
    print(f"kernels: {total / 5e3:.3f} ms/step in all")
    for e in events[: args.rows]:
        print(f"  {e.self_device_time_total / 5e3:7.3f} ms/step {e.count // 5:5d}x  {e.key[:90]}")


if __name__ == "__main__":
    main()
