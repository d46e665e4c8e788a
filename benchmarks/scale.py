"""Large inputs on CPU: the work each process does before its first forward, and its peak memory.

    python benchmarks/scale.py --rows 100000 --procs 2
    python benchmarks/scale.py --rows 400000 --procs 4 --num_workers 2

Writes --rows parallel rows (a 40-word main, 4 branches of 20 words), then runs pmaccel through
`accelerate launch` (CPU, gloo) with a tiny random model and the embedded SmolLM2 tokenizer,
--max_new_tokens 1, so the run is reading, tokenizing, sharding and writing. Per rank, from the run's
<out>.summary.json: read, load, tokenize and shard seconds (the work before the first forward), the run
and write seconds, and peak RSS (when the first forward begins, and over the whole run). --fresh clears
datasets' cache of the input first (a first run; without it a repeated run reuses the row table and
the tokens).

    python benchmarks/scale.py --rows 400000 --prepare 1,2

--prepare N,M,... times reading (load_rows) and tokenizing (tokenize_rows) alone, in a fresh process with
a cold cache for each --num_workers value, with the peak RSS of that process (workers not counted).

    python benchmarks/scale.py --rows 4000000 --procs 4 --num_workers 2 --merge_only

--merge_only writes a part file holding a (dummy) result for every sample first, under the keys the run
computes, so the launched run reads, tokenizes, resumes every sample and merges: the memory of the
resume and of the merge at a size whose decoding would take hours on a small CPU. With --fresh the part
file's own pass tokenizes under a cache of its own, so the launched run still starts from a cold cache.
--max_samples N runs only the first N samples after reading and tokenizing every row: a fresh run's work before
its first forward, without decoding every sample (which takes hours on a small CPU).
--job score writes rows with a target per branch and runs `pmaccel score` (with --merge_only, its dummy results
differ from sample to sample), so the merge also takes the dataset totals (perplexity, accuracy).
--tokenizer DIR gives the model a tokenizer from a directory instead of the embedded model's (a machine
without the embedded model's package). On a GPU machine the GPUs are hidden from the run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORDS = ("the a cat dog sea sun moon tree river city house book time year day night red blue green big small "
         "old new good once upon there lived who what why how when where").split()


def write_rows(path: Path, n: int, seed: int = 0, targets: bool = False) -> None:
    """``n`` parallel rows; with ``targets``, rows to score (each branch a 15-word prompt and a 5-word target)."""
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    def branch() -> str | dict:
        return {"text": text(15), "target": text(5)} if targets else text(20)

    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": i, "main": text(40), "branches": [branch() for _ in range(4)]}) + "\n")


def write_model(path: Path, tokenizer: str | None = None) -> None:
    """A 2-layer random Llama over the vocabulary of ``tokenizer`` (a directory; default: the embedded
    SmolLM2 model's)."""
    import torch
    import transformers

    if tokenizer is None:
        from pmaccel.embedded import embedded_model_dir

        tokenizer = str(embedded_model_dir())
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)


PREPARE = """
import json, resource, sys, time
from transformers import AutoTokenizer
from pmaccel.grouping import Grouping, tokenize_rows
from pmaccel.rows import load_rows
rows, model, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(model)
t = time.perf_counter()
valid, _ = load_rows(rows, num_workers=workers).check("raise")
read = time.perf_counter() - t
tokens = tokenize_rows(valid, tok, Grouping(vocab_size=len(tok)), num_workers=workers)
print(json.dumps({"read_s": read, "tokenize_s": time.perf_counter() - t - read,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}))
"""


DUMMY_PARTS = """
import resource, sys, time
from pathlib import Path
from transformers import AutoConfig, AutoTokenizer
from pmaccel import output
from pmaccel.grouping import Grouping, group_samples, tokenize_rows
from pmaccel.rows import RowsView, load_rows
from pmaccel.settings import Settings
rows, model, out, workers, job = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
settings = Settings(base_model=model, data_path=rows, out_path=out, max_new_tokens=1, device="cpu",
                    num_workers=workers)
if job == "score":
    from pmaccel.scoring import ScoreJob
    kind, ignore = ScoreJob.kind, ScoreJob.ignore
else:
    kind, ignore = "", ()
tok = AutoTokenizer.from_pretrained(model)
t = time.perf_counter()
table = load_rows(rows, num_workers=workers)
valid, skipped = table.check("raise")
read = time.perf_counter() - t
g = Grouping.from_settings(settings, vocab_size=AutoConfig.from_pretrained(model).vocab_size)
tokens = tokenize_rows(valid, tok, g, num_workers=workers)
tokenize = time.perf_counter() - t - read
samples, _ = group_samples(RowsView(valid), tokens, table.path, g, skipped)
print(f"cold cache, one process, --num_workers {workers}: read {read:.1f} s, tokenize {tokenize:.1f} s, group "
      f"{time.perf_counter() - t - read - tokenize:.1f} s, peak RSS "
      f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB", flush=True)
with output.PartWriter(output.part_path(Path(out), 0, 1)) as writer:
    for start in range(0, len(samples), 4096):
        chunk = samples.take(range(start, min(start + 4096, len(samples))), with_ids=False)
        keys = output.sample_keys(chunk, settings, kind=kind, ignore=ignore, runtime="torch.float32@cpu")
        if job == "score":  # a result as scoring writes it, different for every sample
            results = [{"logprobs": [-1.5 - (s.index % 97) / 8 - b for b in range(len(s.branches))],
                        "num_target_tokens": [5] * len(s.branches)} for s in chunk]
        else:
            results = [{"outputs": ["x"] * len(s.branches), "finish_reasons": ["length"] * len(s.branches),
                        "num_generated_tokens": [1] * len(s.branches)} for s in chunk]
        writer.append((s.index, k, r) for s, k, r in zip(chunk, keys, results))
"""


def _pythonpath() -> str:
    """This checkout first, then what this process was given (packages installed there)."""
    return os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH", "")) if p)


def prepare(rows: Path, model: Path, workers: int, work: Path) -> None:
    """Reading and tokenizing alone, cold cache, ``workers`` processes."""
    cache = work / "hf-datasets-cache-prepare"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "PYTHONPATH": _pythonpath(),
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    out = subprocess.run([sys.executable, "-c", PREPARE, str(rows), str(model), str(workers)], env=env, check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    r = json.loads(out)
    print(f"{rows.name}: --num_workers {workers}: read {r['read_s']:.1f} s, tokenize {r['tokenize_s']:.1f} s, "
          f"peak RSS {r['peak_rss_gb']:.2f} GB ({os.cpu_count()} CPU cores)")
    shutil.rmtree(cache, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--num_workers", type=int, default=0, help="pmaccel --num_workers (reading, tokenizing)")
    ap.add_argument("--workdir", default="/tmp/pmaccel-scale")
    ap.add_argument("--fresh", action="store_true", help="a cold datasets cache (a fresh HF_DATASETS_CACHE)")
    ap.add_argument("--prepare", default="", help="time reading + tokenizing alone at these --num_workers values")
    ap.add_argument("--merge_only", action="store_true", help="every sample resumed from a part file: no decoding")
    ap.add_argument("--max_samples", type=int, default=0,
                    help="pmaccel --max_samples: every row is read and tokenized, only this many samples run")
    ap.add_argument("--job", choices=("infer", "score"), default="infer",
                    help="score: rows with a target per branch, run as `pmaccel score` (its dataset totals included)")
    ap.add_argument("--tokenizer", default=None,
                    help="a tokenizer directory for the model (default: the embedded SmolLM2 model's)")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    scoring = args.job == "score"
    rows = work / f"rows{args.rows}{'_score' if scoring else ''}.jsonl"
    model, out = work / "model", work / "out.jsonl"
    if not rows.exists():
        write_rows(rows, args.rows, targets=scoring)
    if not model.exists():
        write_model(model, args.tokenizer)
    if args.prepare:
        for workers in map(int, args.prepare.split(",")):
            prepare(rows, model, workers, work)
        return
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(HERE.parent / "accelerate_configs" / "cpu_2proc.yaml"), "--num_processes", str(args.procs),
           "-m", "pmaccel", *(["score"] if scoring else []), "--base_model", str(model), "--data_path", str(rows),
           "--out_path", str(out), "--device", "cpu", "--num_workers", str(args.num_workers)]
    cmd += [] if scoring else ["--max_new_tokens", "1"]
    cmd += ["--resume"] if args.merge_only else ["--no_resume"]
    cmd += ["--max_samples", str(args.max_samples)] if args.max_samples else []
    # a CPU benchmark: on a GPU machine the GPUs are hidden (4 launched ranks on a 1-GPU machine fail otherwise)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": _pythonpath(), "CUDA_VISIBLE_DEVICES": ""}
    if args.fresh:
        cache = work / "hf-datasets-cache"
        shutil.rmtree(cache, ignore_errors=True)
        env["HF_DATASETS_CACHE"] = str(cache)
    if args.merge_only:
        parts_env = dict(env)
        if args.fresh:  # the run's own cache stays cold
            parts_cache = work / "hf-datasets-cache-parts"
            shutil.rmtree(parts_cache, ignore_errors=True)
            parts_env["HF_DATASETS_CACHE"] = str(parts_cache)
        subprocess.run([sys.executable, "-c", DUMMY_PARTS, str(rows), str(model), str(out), str(args.num_workers),
                        args.job], env=parts_env, check=True)
    t = time.perf_counter()
    with open(work / "run.log", "w") as log:  # the progress bars and warnings
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=log)
    wall = time.perf_counter() - t
    phases = json.loads(Path(f"{out}.summary.json").read_text())["phases"]
    print(f"{args.rows} rows ({rows.stat().st_size / 1e6:.0f} MB), pmaccel {args.job}, {args.procs} processes, "
          f"--num_workers {args.num_workers}, {os.cpu_count()} CPU cores, {wall:.1f} s in all")
    print("| rank | before the first forward s | read | load | tokenize | shard | run | gather | write "
          "| peak RSS GB before the first forward | of which own / mapped files then | peak RSS GB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rank, p in enumerate(phases):
        before = sum(p.get(k, 0.0) for k in ("read_s", "load_s", "tokenize_s", "shard_s"))
        print(f"| {rank} | {before:.1f} | {p['read_s']:.1f} | {p['load_s']:.1f} | {p['tokenize_s']:.1f} | "
              f"{p['shard_s']:.1f} | {p['run_s']:.1f} | {p['gather_s']:.1f} | {p.get('write_s', 0.0):.1f} | "
              f"{p.get('peak_rss_before_run_gb', float('nan')):.2f} | "
              f"{p.get('rss_anon_before_run_gb', float('nan')):.2f} / {p.get('rss_file_before_run_gb', float('nan')):.2f} | "
              f"{p['peak_rss_gb']:.2f} |")


if __name__ == "__main__":
    main()
