"""Where a decode step's time goes: graph replay time, and the kernels of an eager step.

    python benchmarks/profile_step.py --model 0.5b --workload W2
"""

from __future__ import annotations

import argparse

import torch
from bench import WORKLOADS, IdsTokenizer, build_model, make_samples

import pmaccel
from pmaccel import fast
from pmaccel.layout import pack_sample
from pmaccel.samples import tokenize_sample


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="0.5b")
    ap.add_argument("--workload", default="W2")
    ap.add_argument("--mask", default="columnar")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--fold", default=fast.FOLD_KERNEL, choices=["auto", "matmul", "sdpa"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    fast.FOLD_KERNEL, fast.COMPILE = args.fold, args.compile
    model = build_model(args.model, "cuda")
    w = WORKLOADS[args.workload]
    samples = make_samples(w, model.config.vocab_size)
    pmaccel.generate(model, IdsTokenizer(), samples, max_new_tokens=w.new, mask=args.mask, batch_size=len(samples),
                     fast=True)
    (runner,) = [r for r in model._pmaccel_runners.values() if r.graph is not None][-1:]
    packs = [pack_sample(tokenize_sample(s, IdsTokenizer())) for s in samples]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.inference_mode():
        runner.prefill(packs, list(range(len(packs))), 0)  # fresh state: fewer steps than max_new_tokens follow
    for _ in range(3):
        runner.graph.replay()
    start.record()
    for _ in range(50):
        runner.graph.replay()
    end.record()
    torch.cuda.synchronize()
    print(f"graph replay: {start.elapsed_time(end) / 50:.3f} ms/step  (B={runner.B} K={runner.K} S={runner.S})")
    if args.no_profile:
        return
    with torch.inference_mode(), fast.grouped_attention(model):
        runner.prefill(packs, list(range(len(packs))), 0)
        start.record()
        for _ in range(10):
            runner.step()
        end.record()
        torch.cuda.synchronize()
        print(f"eager step:   {start.elapsed_time(end) / 10:.3f} ms/step")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):  # 10 + 5 + 53 steps stay under W1's 128
                runner.step()
            torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in events)
    print(f"kernels: {total / 5e3:.3f} ms/step in all")
    for e in events[: args.rows]:
        print(f"  {e.self_device_time_total / 5e3:7.3f} ms/step {e.count // 5:5d}x  {e.key[:90]}")


if __name__ == "__main__":
    main()
