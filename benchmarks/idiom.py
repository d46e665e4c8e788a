"""Transformers + Accelerate's usual batch-inference idiom, the baseline of ``benchmarks/e2e.py``.

Every branch of every parallel row becomes its own prompt: the ids of ``main`` followed by the ids of the
branch (each tokenized alone, no special tokens). The prompts are split over the processes with
``split_between_processes(..., apply_padding=True)``, generated greedily, gathered with ``gather_object`` and
written by the main process, one line per row in input order.

    python benchmarks/idiom.py --model DIR --rows rows.jsonl --out out.jsonl --max_new_tokens 128
    python benchmarks/idiom.py ... --mode static     # generate(cache_implementation="static")
    python benchmarks/idiom.py ... --mode batch      # generate_batch(): continuous batching
    accelerate launch --multi_gpu --num_processes 4 benchmarks/idiom.py ...

Output rows: ``{"id", "output_ids": [[int]], "num_generated_tokens": [int], "finish_reasons": [str]}``; the
new tokens of a branch stop before its first eos id (like pmaccel's). ``<out>.phases.json`` holds
``{"phases": [{phase_s: seconds}, ...]}``, one dict per rank: import_s, load_s, tokenize_s, generate_s,
gather_write_s.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import gather_object  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def read_prompts(path: Path, tokenizer) -> tuple[list[int | str], list[int], list[list[int]]]:
    """(row ids, branches per row, one prompt's ids per branch in row order)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    mains = tokenizer([r.get("main") or "" for r in rows], add_special_tokens=False)["input_ids"]
    branches = tokenizer([b for r in rows for b in r["branches"]], add_special_tokens=False)["input_ids"]
    prompts, k = [], 0
    for r, m in zip(rows, mains):
        for _ in r["branches"]:
            prompts.append(m + branches[k])
            k += 1
    return [r.get("id", n) for n, r in enumerate(rows)], [len(r["branches"]) for r in rows], prompts


def cut_at_eos(ids: list[int], eos: set[int]) -> tuple[list[int], str]:
    """The new tokens before the first eos id, and the finish reason."""
    for k, t in enumerate(ids):
        if t in eos:
            return ids[:k], "stop"
    return ids, "length"


def eos_ids(gen: GenerationConfig) -> set[int]:
    """The generation config's stop ids as a set."""
    eos = gen.eos_token_id
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


def run_generate(model, tokenizer, mine: list[tuple[int, list[int]]], args: argparse.Namespace,
                 eos: set[int]) -> list[tuple[int, list[int], str]]:
    """model.generate() on batches of ``batch_size`` left-padded prompts, in order."""
    extra = {"cache_implementation": "static"} if args.mode == "static" else {}
    out = []
    for start in range(0, len(mine), args.batch_size):
        chunk = mine[start:start + args.batch_size]
        batch = tokenizer.pad({"input_ids": [ids for _, ids in chunk]}, padding_side="left", return_tensors="pt")
        batch = batch.to(model.device)
        with torch.inference_mode():
            seqs = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False, **extra)
        width = batch["input_ids"].shape[1]
        for (i, _), row in zip(chunk, seqs[:, width:].tolist()):
            out.append((i, *cut_at_eos(row, eos)))
    return out


def run_generate_batch(model, mine: list[tuple[int, list[int]]], args: argparse.Namespace,
                       eos: set[int]) -> list[tuple[int, list[int], str]]:
    """transformers' continuous batching over all of this rank's prompts at once."""
    gen = model.generation_config
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=gen.eos_token_id,
                              pad_token_id=gen.pad_token_id)
    # no_grad, not inference_mode: generate_batch's worker thread updates tensors made here in place, which
    # inference tensors refuse outside inference mode (transformers 5.17 on H200 failed that way)
    with torch.no_grad():
        results = model.generate_batch(inputs=[ids for _, ids in mine], generation_config=config)
    outputs = list(results.values())
    if len(outputs) != len(mine) or any(o.error is not None for o in outputs):
        errors = [o.error for o in outputs if o.error is not None]
        raise RuntimeError(f"generate_batch: {len(outputs)} results for {len(mine)} prompts; errors: {errors[:3]}")
    return [(i, *cut_at_eos(list(o.generated_tokens), eos)) for (i, _), o in zip(mine, outputs)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model directory (weights, config, tokenizer)")
    ap.add_argument("--rows", required=True, help="parallel rows, JSONL")
    ap.add_argument("--out", required=True, help="output JSONL")
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--batch_size", type=int, default=256, help="prompts per generate() call")
    ap.add_argument("--mode", choices=("generate", "static", "batch"), default="generate")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--device", default="auto", help="cpu, or auto = the accelerator's device")
    args = ap.parse_args(argv)
    phases = {"import_s": time.perf_counter() - STARTED}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        phases[name + "_s"] = now - since
        return now

    t = time.perf_counter()
    acc = Accelerator(cpu=args.device == "cpu")
    attn = "sdpa"  # generate_batch takes plain sdpa (the "paged|" prefix is deprecated in transformers 5.x)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype], attn_implementation=attn)
    model = model.to(acc.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    t = lap("load", t)

    ids, counts, prompts = read_prompts(Path(args.rows), tokenizer)
    with acc.split_between_processes(list(enumerate(prompts)), apply_padding=True) as mine:
        mine = list(mine)
    t = lap("tokenize", t)

    eos = eos_ids(model.generation_config)
    if args.mode == "batch":
        done = run_generate_batch(model, mine, args, eos)
    else:
        done = run_generate(model, tokenizer, mine, args, eos)
    t = lap("generate", t)

    gathered = gather_object(done)
    if acc.is_main_process:
        by_index = {i: (new, why) for i, new, why in gathered}  # padding repeats prompts: keep one of each
        out, k = Path(args.out), 0
        with out.open("w") as f:
            for row_id, n in zip(ids, counts):
                got = [by_index[k + b] for b in range(n)]
                k += n
                f.write(json.dumps({"id": row_id, "output_ids": [g[0] for g in got],
                                    "num_generated_tokens": [len(g[0]) for g in got],
                                    "finish_reasons": [g[1] for g in got]}) + "\n")
    lap("gather_write", t)
    every = gather_object([phases])
    if acc.is_main_process:
        Path(args.out + ".phases.json").write_text(json.dumps({"phases": every}, indent=1))
    acc.wait_for_everyone()
    acc.end_training()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
