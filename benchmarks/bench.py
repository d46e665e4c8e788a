"""GPU throughput: pmaccel against transformers' own generation, on the same workloads, in one run.

Random weights of real architectures (no hub), pre-tokenized random prompts, EOS disabled, bf16, sdpa.

    python benchmarks/bench.py --model 0.5b --workloads W1,W2,W3 --json out.json
    python benchmarks/bench.py --model 7b --workloads W2 --baselines generate,static

Workloads (issue "GPU speed"):
    W1 throughput     128 samples x 4 branches, 64 prompt tokens per branch, 128 new
    W2 latency        1 sample x 8 branches, 64 prompt, 256 new
    W3 shared context 32 samples x 8 branches, a 512-token main, 32-token branches, 256 new
Baselines see every branch as its own row (main repeated), left-padded:
    generate   model.generate(), dynamic cache
    static     model.generate(cache_implementation="static") (transformers compiles the forward)
    batch      model.generate_batch() (continuous batching), when this transformers has it
Each figure is the median of --repeats warm runs; the first (cold) run is reported apart.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import transformers

import pmaccel

CONFIGS = {  # Qwen2.5 shapes (public config.json values)
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
}


@dataclass(frozen=True)
class Workload:
    name: str
    samples: int
    branches: int
    main: int
    prompt: int
    new: int


WORKLOADS = {
    "W1": Workload("W1", 128, 4, 0, 64, 128),
    "W2": Workload("W2", 1, 8, 0, 64, 256),
    "W3": Workload("W3", 32, 8, 512, 32, 256),
}


class IdsTokenizer:
    pad_token_id = 0
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return ""


def build_model(name: str, device: str):
    cfg = transformers.Qwen2Config(**CONFIGS[name], max_position_embeddings=32768, rope_theta=1e6,
                                   rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval().requires_grad_(False)


def make_samples(w: Workload, vocab: int, samples: int | None = None, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(10, vocab, (n,), generator=g).tolist()  # noqa: E731
    out = []
    for _ in range(samples or w.samples):
        s = {"branches": [{"input_ids": rand(w.prompt)} for _ in range(w.branches)]}
        if w.main:
            s["main"] = {"input_ids": rand(w.main)}
        out.append(s)
    return out


def rows_of(samples: list[dict]) -> list[list[int]]:
    return [s.get("main", {}).get("input_ids", []) + b["input_ids"] for s in samples for b in s["branches"]]


def timed(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def measure(fn_for, new: int, repeats: int) -> dict:
    """fn_for(max_new_tokens) -> a callable. Returns cold/warm times, prefill, ms/step, peak memory."""
    full, one = fn_for(new), fn_for(1)
    torch.cuda.reset_peak_memory_stats()
    cold = timed(full)
    warm = statistics.median(timed(full) for _ in range(repeats))
    peak = torch.cuda.max_memory_allocated() / 2**30
    timed(one)
    prefill = statistics.median(timed(one) for _ in range(repeats))
    return dict(cold_s=cold, warm_s=warm, prefill_s=prefill, ms_per_step=1e3 * (warm - prefill) / max(new - 1, 1),
                peak_gib=peak)


def run_pmaccel(model, samples, w: Workload, mask: str, repeats: int, **config) -> dict:
    """One engine for every repeat (graphs captured once); its stats give prefill and per-step times.
    ``config``: ``EngineConfig`` fields besides the pool's rows."""
    from pmaccel.engine import Engine, EngineConfig

    tok = IdsTokenizer()
    engine = Engine(model, EngineConfig(max_rows=len(samples), **config))

    def once():
        return pmaccel.generate(model, tok, samples, max_new_tokens=w.new, mask=mask, engine=engine)

    torch.cuda.reset_peak_memory_stats()
    cold = timed(once)
    walls, prefill, decode, steps = [], [], [], []
    for _ in range(repeats):
        before = dict(engine.stats)
        walls.append(timed(once))
        prefill.append(engine.stats["prefill_s"] - before["prefill_s"])
        decode.append(engine.stats["decode_s"] - before["decode_s"])
        steps.append(engine.stats["steps"] - before["steps"])
    engine.release()
    med = statistics.median
    return dict(cold_s=cold, warm_s=med(walls), prefill_s=med(prefill), ms_per_step=1e3 * med(decode) / med(steps),
                peak_gib=torch.cuda.max_memory_allocated() / 2**30)


def run_generate(model, samples, w: Workload, repeats: int, static: bool) -> dict:
    rows = rows_of(samples)
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=model.device)  # left padding
    att = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
    extra = {"cache_implementation": "static"} if static else {}

    def fn_for(n):
        return lambda: model.generate(ids, attention_mask=att, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      pad_token_id=0, **extra)

    return measure(fn_for, w.new, repeats)


def run_generate_batch(model, samples, w: Workload, repeats: int) -> dict | None:
    if not hasattr(model, "generate_batch"):
        return None
    rows = rows_of(samples)
    cfg = transformers.GenerationConfig(max_new_tokens=w.new, do_sample=False, eos_token_id=None, pad_token_id=0)

    def fn_for(n):
        c = transformers.GenerationConfig(**{**cfg.to_dict(), "max_new_tokens": n})
        return lambda: model.generate_batch(rows, generation_config=c)

    return measure(fn_for, w.new, max(1, repeats // 2))


def run_engine(who: str, model, samples: list[dict], w: Workload, repeats: int, **config) -> dict | None:
    if who.startswith("pmaccel-"):
        return run_pmaccel(model, samples, w, who.removeprefix("pmaccel-"), repeats, **config)
    if who in ("generate", "static"):
        return run_generate(model, samples, w, repeats, static=who == "static")
    if who == "batch":
        return run_generate_batch(model, samples, w, repeats)
    raise SystemExit(f"unknown engine {who!r}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="0.5b", choices=CONFIGS)
    ap.add_argument("--workloads", default="W1,W2,W3")
    ap.add_argument("--masks", default="isolated,columnar")
    ap.add_argument("--baselines", default="generate,static,batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sweep", default="", help="comma-separated sample counts for a W1-shaped batch-size sweep")
    ap.add_argument("--sweep_engines", default="pmaccel-columnar,generate,static")
    ap.add_argument("--json", default=None, help="write all figures here")
    ap.add_argument("--prefill_tokens", type=int, default=None, help="pmaccel's prefill budget (default: its own)")
    args = ap.parse_args(argv)
    config = {} if args.prefill_tokens is None else {"prefill_tokens": args.prefill_tokens}
    if not torch.cuda.is_available():
        print("benchmarks need a CUDA device", file=sys.stderr)
        return 2
    model = build_model(args.model, "cuda")
    vocab = model.config.vocab_size
    info = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__,
                model=args.model, date=time.strftime("%Y-%m-%d"))
    print(json.dumps(info))
    results = []

    def record(workload: str, who: str, samples: list[dict], w: Workload, repeats: int) -> None:
        try:
            m = run_engine(who, model, samples, w, repeats, **config)
        except Exception as e:  # a baseline this transformers cannot run: say so, measure the rest
            print(json.dumps(dict(workload=workload, who=who, error=f"{type(e).__name__}: {e}"[:300])), flush=True)
            return
        if m is not None:
            tokens = len(samples) * w.branches * w.new
            results.append(dict(workload=workload, who=who, tokens=tokens, samples=len(samples), **m))
            print(json.dumps(results[-1]), flush=True)

    for wname in [x for x in args.workloads.split(",") if x]:
        w = WORKLOADS[wname]
        samples = make_samples(w, vocab)
        for who in [f"pmaccel-{m}" for m in args.masks.split(",") if m] + [b for b in args.baselines.split(",") if b]:
            record(wname, who, samples, w, args.repeats)
    for n in [int(x) for x in args.sweep.split(",") if x]:
        w = WORKLOADS["W1"]
        for who in args.sweep_engines.split(","):
            record(f"sweep{n}", who, make_samples(w, vocab, samples=n, seed=n), w, 1)
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(info=info, results=results), f, indent=1)
    return 0


def print_table(results: list[dict]) -> None:
    print(f"\n{'workload':9} {'engine':18} {'tok/s':>10} {'samples/s':>9} {'ms/step':>8} {'prefill ms':>10} "
          f"{'cold s':>7} {'peak GiB':>8}  ratios")
    base = {(r["workload"], r["who"]): r["tokens"] / r["warm_s"] for r in results}
    for r in results:
        tps = r["tokens"] / r["warm_s"]
        ratios = " ".join(f"{tps / base[(r['workload'], b)]:.2f}x {b}" for b in ("generate", "static", "batch")
                          if r["who"].startswith("pmaccel") and (r["workload"], b) in base)
        print(f"{r['workload']:9} {r['who']:18} {tps:10.0f} {r['samples'] / r['warm_s']:9.2f} {r['ms_per_step']:8.2f} "
              f"{1e3 * r['prefill_s']:10.1f} {r['cold_s']:7.2f} {r['peak_gib']:8.2f}  {ratios}")


if __name__ == "__main__":
    raise SystemExit(main())
