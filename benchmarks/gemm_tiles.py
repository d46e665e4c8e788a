"""The invariant GEMM's tilings against cuBLAS, per weight shape and row count (CUDA only).

    python benchmarks/gemm_tiles.py --model 0.5b --json gemm.json
    python benchmarks/gemm_tiles.py --graph --tiles small --rows 8,32,128,512,2048   # as a decode step runs

For every weight shape of the model (q/k/v/o, gate/up, down, the output head) and a range of row counts,
times ``pmaccel.invariant``'s GEMM kernel under each candidate tiling (rows x columns per program, warps,
pipeline stages; the K block is `k_block`'s, and every tiling sums a product's terms in the same order) and
``F.linear`` (cuBLAS), and checks that each tiling's output is bit-identical to the wide tiling's and
that a row's result does not depend on how many rows share the call. Prints, per shape and row count,
the tiling ``pmaccel.invariant.gemm_tiling`` chooses and the fastest bit-identical one. With ``--graph``
each launch is timed replayed from a CUDA graph, over 24 copies of the weight (a step's layers: no host
cost, no weight kept hot in L2), which is how a decode step runs them. (On Hopper the 128-row tilings of bf16
run the TMA kernel.)

    python benchmarks/gemm_tiles.py --graph --tma --rows 8,512,2048,8192,32768

--tma times, per shape and row count, only the tiling chosen with the TMA kernel and the one chosen without it
(the plain kernel everywhere), checks that their bits agree, and cuBLAS beside them.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import sys
import time
from collections.abc import Iterator
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
# few rows (a decode step's tail, one sample's branches): narrow column blocks, so that more programs stream
# the weights; the tilings pmaccel uses besides
SMALL_TILES = [*itertools.product((16, 64), (16, 32, 64), (4,), (3, 4, 6)), (128, 128, 8, 3), (128, 128, 8, 4)]
LAYERS = 24  # weight copies a graph walks through, as a step's layers do (not one weight hot in L2)


def run(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, tile: tuple[int, int, int, int]) -> torch.Tensor:
    """The invariant GEMM under one tiling."""
    from pmaccel.invariant import linear

    return linear(x, w, b, tiling=tile)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="0.5b", choices=sorted(SHAPES))
    p.add_argument("--rows", default=",".join(map(str, ROWS)))
    p.add_argument("--tiles", choices=("all", "small"), default="all",
                   help="small: the narrow tilings for few rows (and the chosen ones)")
    p.add_argument("--graph", action="store_true",
                   help=f"time each launch replayed from a CUDA graph over {LAYERS} weight copies, as a step runs")
    p.add_argument("--tma", action="store_true",
                   help="the tiling chosen with the TMA kernel against the one chosen without it (Hopper)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    tiles = SMALL_TILES if args.tiles == "small" else TILES
    if args.tma:
        return compare_tma(args)

    from pmaccel.invariant import WIDE_TILE, gemm_tiling

    default = WIDE_TILE
    out = {"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
           "model": args.model, "default": default, "results": []}
    for name, N, K, x, w, b, copies in operands(args):
        M = x.shape[0]
        ref = run(x, w, b, default)
        cublas = bench(F.linear, x, copies, b, args.graph)
        times, same = {}, {}
        chosen = str(gemm_tiling(M, N, x.element_size(), x.device))
        for tile in dict.fromkeys([*tiles, gemm_tiling(M, N, x.element_size(), x.device)]):  # and the chosen one
            try:
                y = run(x, w, b, tile)
            except Exception as e:  # noqa: BLE001  (a tiling this card cannot run: out of resources)
                times[str(tile)] = None
                same[str(tile)] = repr(e)[:80]
                continue
            same[str(tile)] = bool(torch.equal(y, ref)) and bool(torch.equal(run(x[:3], w, b, tile), ref[:3]))
            times[str(tile)] = bench(functools.partial(run, tile=tile), x, copies, b, args.graph)
        ok = {t: v for t, v in times.items() if v is not None and same[t] is True}
        best = min(ok, key=ok.get)
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


def operands(args: argparse.Namespace) -> Iterator[tuple]:
    """Per weight shape of ``args.model`` and row count of ``args.rows``: (name, N, K, x, weight, bias, the weight's
    copies a graph walks through), bf16 on the GPU, seeded."""
    torch.manual_seed(0)
    dev = torch.device("cuda")
    rows = [int(r) for r in args.rows.split(",")]
    for name, (N, K, has_bias) in SHAPES[args.model].items():
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * K**-0.5
        b = torch.randn(N, device=dev, dtype=torch.bfloat16) if has_bias else None
        xs = torch.randn(max(rows), K, device=dev, dtype=torch.bfloat16)
        copies = [w] + [w.clone() for _ in range(0 if name == "head" or not args.graph else LAYERS - 1)]
        for M in rows:
            yield name, N, K, xs[:M], w, b, copies


@contextlib.contextmanager
def plain_kernel() -> Iterator[None]:
    """Inside: no tiling runs the TMA kernel (tilings are chosen, and run, as on a card without it)."""
    from pmaccel import invariant

    original = invariant._tma_device
    invariant._tma_device = lambda itemsize, device: False
    try:
        yield
    finally:
        invariant._tma_device = original


def compare_tma(args: argparse.Namespace) -> int:
    """Per weight shape and row count: the tiling chosen with the TMA kernel and without it, timed, bits compared."""
    from pmaccel.invariant import gemm_tiling

    out = {"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
           "model": args.model, "graph": args.graph, "results": []}
    for name, N, K, x, w, b, copies in operands(args):
        M, dev = x.shape[0], x.device
        tma_tile = gemm_tiling(M, N, 2, dev)
        tma_out = run(x, w, b, tma_tile)
        tma_ms = bench(functools.partial(run, tile=tma_tile), x, copies, b, args.graph)
        with plain_kernel():
            plain_tile = gemm_tiling(M, N, 2, dev)
            plain_out = run(x, w, b, plain_tile)
            plain_ms = bench(functools.partial(run, tile=plain_tile), x, copies, b, args.graph)
        cublas = bench(F.linear, x, copies, b, args.graph)
        rec = {"shape": name, "N": N, "K": K, "M": M, "tma_tiling": tma_tile, "tma_ms": tma_ms,
               "plain_tiling": plain_tile, "plain_ms": plain_ms, "cublas_ms": cublas,
               "same": bool(torch.equal(tma_out, plain_out))}
        out["results"].append(rec)
        print(f"{name:8s} M={M:6d} with TMA {tma_tile} {tma_ms * 1e3:8.1f} us  plain {plain_tile} "
              f"{plain_ms * 1e3:8.1f} us  cuBLAS {cublas * 1e3:8.1f} us  same bits: {rec['same']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


def bench(fn, x: torch.Tensor, weights: list[torch.Tensor], b: torch.Tensor | None, graph: bool) -> float:
    """Milliseconds per ``fn(x, w, b)``: Triton's ``do_bench`` on the first weight, or replayed from a graph."""
    if not graph:
        from triton.testing import do_bench

        return do_bench(functools.partial(fn, x, weights[0], b), warmup=5, rep=25)
    return graph_ms(lambda: [fn(x, w, b) for w in weights], len(weights))


def graph_ms(fn, launches: int, replays: int = 20) -> float:
    """Milliseconds per launch of ``fn``'s ``launches`` GEMMs, captured once and replayed (no host cost)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (replays * launches)


if __name__ == "__main__":
    raise SystemExit(main())
