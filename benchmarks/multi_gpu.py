"""Aggregate generation throughput over the GPUs of one host, to compare with 1 GPU on the same machine.

    python benchmarks/multi_gpu.py --samples 2048                                  # 1 GPU
    accelerate launch --multi_gpu --num_processes 4 benchmarks/multi_gpu.py --samples 2048

Each rank takes its contiguous share of the samples (``split_between_processes``), decodes one
warm-up batch of the same shape (compilation and graph capture stay out of the timing), then all
ranks start together; the figure is total generated tokens over the slowest rank's time. The
output ids of every sample are hashed in index order, so runs on 1, 2 and 4 GPUs can be compared.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from bench import WORKLOADS, IdsTokenizer, build_model, make_samples

import pmaccel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="0.5b")
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--mask", default="columnar")
    args = ap.parse_args()
    acc = Accelerator()
    w = WORKLOADS["W1"]
    model = build_model(args.model, acc.device)
    samples = make_samples(w, model.config.vocab_size, samples=args.samples)
    tok = IdsTokenizer()
    kw = dict(max_new_tokens=w.new, mask=args.mask, batch_size=args.batch_size)
    with acc.split_between_processes(list(range(len(samples)))) as mine:
        mine = list(mine)
    warm = mine[: args.batch_size]
    pmaccel.generate(model, tok, [samples[i] for i in warm], indices=warm, **kw)
    acc.wait_for_everyone()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    results = pmaccel.generate(model, tok, [samples[i] for i in mine], indices=mine, **kw)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens = sum(sum(r["num_generated_tokens"]) for r in results)
    per_rank = gather_object([dict(rank=acc.process_index, samples=len(mine), tokens=tokens, seconds=seconds)])
    outputs = gather_object([(i, r["output_ids"]) for i, r in zip(mine, results)])
    if acc.is_main_process:
        digest = hashlib.sha256(json.dumps(sorted(dict(outputs).items())).encode()).hexdigest()[:16]
        total = sum(r["tokens"] for r in per_rank)
        slowest = max(r["seconds"] for r in per_rank)
        print(json.dumps(dict(world=acc.num_processes, card=torch.cuda.get_device_name(), model=args.model,
                              samples=args.samples, tokens=total, seconds=slowest, tok_per_s=total / slowest,
                              outputs_sha=digest, ranks=per_rank)), flush=True)


if __name__ == "__main__":
    main()
