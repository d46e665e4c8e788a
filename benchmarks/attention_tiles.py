"""The invariant attention's blockings, timed as a decode step runs them (CUDA only).

    python benchmarks/attention_tiles.py
    python benchmarks/attention_tiles.py --shapes w1,w2 --json attention.json

For decode-step shapes of the Qwen2.5-0.5B attention (14 query heads over 2 KV heads of 64), times
``pmaccel.invariant.attention`` under each candidate (keys per block, keys per chunk, warps, stages), with
each chunk in one program and each in its own (``split``), every launch replayed from a CUDA graph over
24 copies of the KV memory (a step's layers). Prints, per shape, each variant's time and whether its
output is bit-identical to the default's (a blocking other than the default sums in another order; the
split and unsplit runs of one blocking must agree).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
from pathlib import Path

import torch
from gemm_tiles import graph_ms  # a launch's time, replayed from a CUDA graph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name: (rows, queries per row, slots per row, fewest and most keys a query sees)
SHAPES = {
    "w1": (128, 4, 832, 256, 768),  # bench.py's W1: 128 samples x 4 branches, 64-token prompts, 128 new
    "w2": (1, 8, 2624, 512, 2560),  # W2: 1 sample x 8 branches, 256 new
    "e2e": (256, 8, 1536, 100, 1200),  # e2e.py's rows: up to 8 branches, prompts and outputs of varied length
}
HEADS, KV_HEADS, HEAD_DIM = 14, 2, 64
LAYERS = 24
BLOCKINGS = [*itertools.product((32, 64, 128), (256, 512), (4, 8), (2, 3))]
QUICK = [(64, 256, 4, 3), (128, 512, 4, 3)]  # the earlier default, and a variant


def make(shape: tuple[int, int, int, int, int], device: str, seed: int = 0):
    """One layer's query and key lists, and LAYERS copies of a KV memory."""
    B, Q, S, lo, hi = shape
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(lo, hi + 1, (B, Q), generator=g)
    rank = torch.rand(B, Q, S, generator=g).argsort(-1)  # each query sees a random ordered subset of the slots
    seen = (rank < n[..., None]).to(device)
    from pmaccel.invariant import key_lists

    keys, count = key_lists(seen)
    q = torch.randn(B, Q, HEADS, HEAD_DIM, generator=g).to(device, torch.bfloat16).transpose(1, 2)
    kv = [(torch.randn(B, KV_HEADS, S, HEAD_DIM, generator=g).to(device, torch.bfloat16),
           torch.randn(B, KV_HEADS, S, HEAD_DIM, generator=g).to(device, torch.bfloat16)) for _ in range(2)]
    kv = [kv[i % 2] for i in range(LAYERS)]  # two distinct memories alternate: none stays hot in L2 alone
    return q, kv, keys, count


def layers(q, kv, keys, count, split: bool, blocks) -> None:
    """One attention per layer, as a step runs them."""
    from pmaccel import invariant

    for k, v in kv:
        invariant.attention(q, k, v, keys, count, HEAD_DIM**-0.5, split=split, blocks=blocks)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help=f"the default blocking and {QUICK} only")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("attention_tiles.py needs a CUDA device")
    from pmaccel import invariant

    results = []
    for name in args.shapes.split(","):
        q, kv, keys, count = make(SHAPES[name], "cuda")
        ref = invariant.attention(q, *kv[0], keys, count, HEAD_DIM**-0.5, split=False)
        default = invariant.ATTENTION_BLOCKS[2]
        print(f"\n{name}: rows {SHAPES[name][0]}, queries {SHAPES[name][1]}, slots {SHAPES[name][2]}, "
              f"keys {SHAPES[name][3]}-{SHAPES[name][4]}; default {default}, chosen split: "
              f"{count.shape[0] * count.shape[1] * KV_HEADS < invariant._multiprocessors(q.device)}")
        for blocks in [default, *[b for b in (QUICK if args.quick else BLOCKINGS) if b != default]]:
            row = {"shape": name, "blocks": blocks}
            for split in (False, True):
                try:
                    out = invariant.attention(q, *kv[0], keys, count, HEAD_DIM**-0.5, split=split, blocks=blocks)
                    us = 1e3 * graph_ms(functools.partial(layers, q, kv, keys, count, split, blocks), LAYERS)
                    row["split" if split else "one"] = {"us": round(us, 2), "same_as_default": torch.equal(out, ref)}
                except Exception as e:  # noqa: BLE001  (a blocking the card cannot run: shared memory)
                    row["split" if split else "one"] = {"error": str(e).splitlines()[0][:80]}
            results.append(row)
            cells = "  ".join(f"{k} {v['us']:7.2f} us {'=' if v['same_as_default'] else '≠'}" if "us" in v
                              else f"{k} {v['error']}" for k, v in row.items() if k in ("one", "split"))
            print(f"  {str(blocks):20} {cells}")
    if args.json:
        info = {"card": torch.cuda.get_device_name(), "torch": torch.__version__}
        Path(args.json).write_text(json.dumps({"info": info, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
