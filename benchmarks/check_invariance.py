"""bf16 on GPU: does a sample's output depend on what the engine decoded before, or on its companions?

    python benchmarks/check_invariance.py --samples 256
"""

from __future__ import annotations

import argparse

from bench import WORKLOADS, IdsTokenizer, build_model, make_samples

import pmaccel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=128)
    args = ap.parse_args()
    w = WORKLOADS["W1"]
    model = build_model("0.5b", "cuda")
    samples = make_samples(w, model.config.vocab_size, samples=args.samples)
    tok, bs = IdsTokenizer(), args.batch_size
    kw = dict(max_new_tokens=w.new, mask="columnar", batch_size=bs)
    half = samples[bs:]
    full = pmaccel.generate(model, tok, samples, **kw)[bs:]  # second batch after the first
    alone = pmaccel.generate(model, tok, half, indices=list(range(bs, len(samples))), **kw)
    again = pmaccel.generate(model, tok, half, indices=list(range(bs, len(samples))), **kw)
    shifted = pmaccel.generate(model, tok, samples[bs // 2:bs // 2 + bs], **kw)  # other batch companions
    same = lambda a, b: sum(x["output_ids"] == y["output_ids"] for x, y in zip(a, b))  # noqa: E731
    print(f"after another batch vs alone: {same(full, alone)}/{len(half)} equal")
    print(f"alone vs alone again:         {same(alone, again)}/{len(half)} equal")
    print(f"other batch companions:       {same(shifted[bs // 2:], alone[: bs // 2])}/{bs // 2} equal")
    small = pmaccel.generate(model, tok, half[:16], **{**kw, "batch_size": 4})
    print(f"pool of 4 vs pool of {bs}:      {same(small, alone[:16])}/16 equal")


if __name__ == "__main__":
    main()
