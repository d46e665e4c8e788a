"""Large inputs on CPU: the work each process does before its first forward, and its peak memory.

    python benchmarks/scale.py --rows 100000 --procs 2
    python benchmarks/scale.py --rows 400000 --procs 4

Writes --rows parallel rows (a 40-word main, 4 branches of 20 words), then runs pmaccel through
`accelerate launch` (CPU, gloo) with a tiny random model and the embedded SmolLM2 tokenizer,
--max_new_tokens 1, so the run is reading, tokenizing, sharding and writing. Per rank, from the run's
<out>.summary.json: read, load, tokenize and shard seconds (the work before the first forward), the run
and write seconds, and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORDS = ("the a cat dog sea sun moon tree river city house book time year day night red blue green big small "
         "old new good once upon there lived who what why how when where").split()


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": i, "main": text(40), "branches": [text(20) for _ in range(4)]}) + "\n")


def write_model(path: Path) -> None:
    """A 2-layer random Llama over the embedded SmolLM2 tokenizer's vocabulary."""
    import torch
    import transformers

    from pmaccel.embedded import embedded_model_dir

    tok = transformers.AutoTokenizer.from_pretrained(embedded_model_dir())
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/pmaccel-scale")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows, model, out = work / f"rows{args.rows}.jsonl", work / "model", work / "out.jsonl"
    if not rows.exists():
        write_rows(rows, args.rows)
    if not model.exists():
        write_model(model)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(HERE.parent / "accelerate_configs" / "cpu_2proc.yaml"), "--num_processes", str(args.procs),
           "-m", "pmaccel", "--base_model", str(model), "--data_path", str(rows), "--out_path", str(out),
           "--max_new_tokens", "1", "--device", "cpu", "--no_resume"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    phases = json.loads(Path(f"{out}.summary.json").read_text())["phases"]
    print(f"{args.rows} rows ({rows.stat().st_size / 1e6:.0f} MB), {args.procs} processes, {wall:.1f} s in all")
    print("| rank | before the first forward s | read | load | tokenize | shard | run | gather | peak RSS GB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rank, p in enumerate(phases):
        before = sum(p.get(k, 0.0) for k in ("read_s", "load_s", "tokenize_s", "shard_s"))
        print(f"| {rank} | {before:.1f} | {p['read_s']:.1f} | {p['load_s']:.1f} | {p['tokenize_s']:.1f} | "
              f"{p['shard_s']:.1f} | {p['run_s']:.1f} | {p['gather_s']:.1f} | {p['peak_rss_gb']:.2f} |")


if __name__ == "__main__":
    main()
