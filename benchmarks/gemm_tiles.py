"""The invariant GEMM's tilings against cuBLAS, per weight shape and row count (CUDA only).

    python benchmarks/gemm_tiles.py --model 0.5b --json gemm.json

For every weight shape of the model (q/k/v/o, gate/up, down, the output head) and a range of row counts,
times ``pmaccel.invariant``'s GEMM kernel under each candidate tiling (rows x columns per program, warps,
pipeline stages; the K block stays 64, so every tiling sums a product's terms in the same order) and
``F.linear`` (cuBLAS), and checks that each tiling's output is bit-identical to the wide tiling's and
that a row's result does not depend on how many rows share the call. Prints, per shape and row count,
the tiling ``pmaccel.invariant.gemm_tiling`` chooses and the fastest bit-identical one.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # (N, K, has_bias) of each linear layer, by model
    "0.5b": {"q/o": (896, 896, True), "k/v": (128, 896, True), "gate/up": (4864, 896, False),
             "down": (896, 4864, False), "head": (151936, 896, False)},
    "7b": {"q/o": (3584, 3584, True), "k/v": (512, 3584, True), "gate/up": (18944, 3584, False),
           "down": (3584, 18944, False), "head": (152064, 3584, False)},
}
ROWS = (8, 256, 1024, 2048, 8192)
TILES = list(itertools.product((64, 128), (64, 128, 256), (4, 8), (3, 4)))  # BM, BN, warps, stages


def run(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, tile: tuple[int, int, int, int]) -> torch.Tensor:
    """The invariant GEMM under one tiling."""
    from pmaccel.invariant import linear

    return linear(x, w, b, tiling=tile)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="0.5b", choices=sorted(SHAPES))
    p.add_argument("--rows", default=",".join(map(str, ROWS)))
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from triton.testing import do_bench

    from pmaccel.invariant import WIDE_TILE, gemm_tiling

    default = WIDE_TILE
    torch.manual_seed(0)
    dev = torch.device("cuda")
    rows = [int(r) for r in args.rows.split(",")]
    out = {"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
           "model": args.model, "default": default, "results": []}
    for name, (N, K, has_bias) in SHAPES[args.model].items():
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * K**-0.5
        b = torch.randn(N, device=dev, dtype=torch.bfloat16) if has_bias else None
        xs = torch.randn(max(rows), K, device=dev, dtype=torch.bfloat16)
        for M in rows:
            x = xs[:M]
            ref = run(x, w, b, default)
            cublas = do_bench(functools.partial(F.linear, x, w, b), warmup=5, rep=25)
            times, same = {}, {}
            for tile in TILES:
                try:
                    y = run(x, w, b, tile)
                except Exception as e:  # noqa: BLE001  (a tiling this card cannot run: out of resources)
                    times[str(tile)] = None
                    same[str(tile)] = repr(e)[:80]
                    continue
                same[str(tile)] = bool(torch.equal(y, ref)) and bool(torch.equal(run(x[:3], w, b, tile), ref[:3]))
                times[str(tile)] = do_bench(functools.partial(run, x, w, b, tile), warmup=5, rep=25)
            ok = {t: v for t, v in times.items() if v is not None and same[t] is True}
            best = min(ok, key=ok.get)
            chosen = str(gemm_tiling(M, N, x.element_size(), x.device))
            rec = {"shape": name, "N": N, "K": K, "M": M, "cublas_ms": cublas, "default_ms": times[str(default)],
                   "chosen": chosen, "chosen_ms": times[chosen], "best": best, "best_ms": ok[best], "times": times,
                   "same": same}
            out["results"].append(rec)
            print(f"{name:8s} M={M:5d} cublas {cublas * 1e3:8.1f} us  wide {times[str(default)] * 1e3:8.1f} us  "
                  f"chosen {chosen} {times[chosen] * 1e3:8.1f} us  best {best} {ok[best] * 1e3:8.1f} us  not identical: "
                  f"{[t for t, v in same.items() if v is not True]}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
