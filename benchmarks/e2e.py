"""End-to-end wall clock: fresh processes, timed the way a user runs them, pmaccel against the usual idioms.

    python benchmarks/e2e.py prepare --arch 0.5b                    # only model/ and rows.jsonl in --workdir
    python benchmarks/e2e.py run --gpus 1,2,4                        # every run, 1, 2 and 4 GPUs
    python benchmarks/e2e.py --arch 0.5b --runs idiom,pmaccel --gpus 1 --max_new_tokens 128
    python benchmarks/e2e.py --runs pmaccel_patch --pmaccel_args "--batch_size 64"
    python benchmarks/e2e.py --arch tiny --rows 12 --max_new_tokens 8 --device cpu --gpus 1 \\
        --runs idiom,static,batch,pmaccel,pmaccel_patch              # CPU smoke test

prepare (skipped when --workdir already holds the same arch, dtype, rows and seed; --force redoes it):
    model/      random weights of a real architecture (--arch 0.5b: Qwen2.5-0.5B's shape; tiny for CPU),
                seeded, saved with save_pretrained (safetensors) with the embedded SmolLM2 tokenizer;
                generation_config.json stops on every id i with i % 64 == 7, so branches end at varied lengths
    rows.jsonl  --rows parallel rows {"id", "main": 0-120 words, "branches": 2-8 of 4-60 words}
run: every run is a fresh subprocess (wall clock around it, logs in <workdir>/logs, exit status checked):
    idiom          benchmarks/idiom.py: generate() on batches of 256 left-padded prompts (one per branch,
                   main's ids + the branch's ids), split_between_processes + gather_object
    static         the same with generate(cache_implementation="static") (transformers compiles the forward)
    batch          all of a process's prompts in one model.generate_batch() (transformers' continuous batching)
    pmaccel        the CLI: pmaccel --base_model model --data_path rows.jsonl --out_path ... --max_new_tokens N
    pmaccel_patch  the same with --patch_rope (2D RoPE, columnar mask)
    pmaccel_det, pmaccel_patch_det   the same two with --deterministic (batch-invariant kernels)
    One GPU: plain `python` / `pmaccel`; N > 1: `accelerate launch --multi_gpu --num_processes N`
    (--launcher torchrun: `torchrun --nproc_per_node N`; --launcher pmaccel: `pmaccel --num_processes N`,
    the runs of idiom.py then under accelerate launch).
    Runs named in --twice (default static, pmaccel, pmaccel_patch) run twice: "first" with empty compile
    caches (HOME, XDG_CACHE_HOME, PMACCEL_CACHE, TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR point at a fresh
    directory of the workdir; HF_HUB_OFFLINE=1), then "repeat" with those caches warm. Every other run gets
    fresh caches too.
Against another commit (an A/B in one go):
    python benchmarks/e2e.py --runs idiom,pmaccel --twice pmaccel --rounds 2 --against /tmp/base
    where /tmp/base holds the other commit's package (git archive BASE pmaccel | tar -x -C /tmp/base): each of
    pmaccel's runs is paired with the same run of that package (this checkout's first in odd rounds, the
    other's first in even ones: the later run of a pair finds the OS's caches warmer), --rounds times over, and
    each output file is compared with this checkout's byte for byte; the idiom runs once.
Reported per run: wall seconds, generated tokens (read from the output file; a branch's tokens stop before
its first eos id), tokens/s, speed-up over idiom with the same GPU count (idiom wall / wall), the fraction of
branch outputs identical to idiom's (all but pmaccel_patch, whose 2D RoPE changes the outputs; bf16 on GPU
never agrees fully), and per-phase seconds (idiom.py's own; pmaccel's from "phases" in
<out>.summary.json when it writes them), as the slowest rank's; for pmaccel also the seconds outside every
rank's own timeline (wall - the slowest rank's start_s + phases: the launcher and the exit). All figures go
to <workdir>/e2e.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
RUNS = ("idiom", "static", "batch", "pmaccel", "pmaccel_patch", "pmaccel_det", "pmaccel_patch_det")
IDIOM_MODES = {"idiom": "generate", "static": "static", "batch": "batch"}
EOS_EVERY, EOS_AT = 64, 7  # stop ids: every i with i % EOS_EVERY == EOS_AT
TINY_VOCAB = 49152  # the SmolLM2 tokenizer's ids
WORDS = """
the of and to in is was for on that with as by at from his her they this which have are not but had one
all were when there can more an their if would about time will out up other into has two some could them
see him only new first people my than its now over very what well then down may also after made many
day back years most where way long little world good through should just before old take place because
year same home work still under last house found come both life between never below while might water
great city each small light country give part land hand high number name river school night sound point
three being story garden early young mountain morning evening window table letter road village
music book friend family question answer study paper market street winter summer autumn spring forest
ocean island bridge stone tree flower bird horse dog cat boat train station doctor teacher student
child mother father sister brother king queen castle tower field valley lake cloud rain snow wind fire
bread cheese apple coffee tea milk sugar salt honey kitchen door floor wall room chair bed lamp clock
happy quiet bright dark warm cold green blue red yellow white black gentle strong simple careful sudden
walk run read write speak listen watch learn teach build open close carry follow remember forget begin
finish travel wonder explain discover imagine decide return arrive leave bring send keep hold turn
""".split()
ARCH_EXTRA = dict(max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6, bos_token_id=None,
                  eos_token_id=None)


@dataclass
class Job:
    run: str
    gpus: int
    cache: str  # "first": empty compile caches; "repeat": those of the first
    cmd: list[str]
    out: Path
    cache_dir: Path
    result: dict = field(default_factory=dict)
    engine: str = ""  # "": this checkout's pmaccel; else the --against directory's
    round: int = 1

    @property
    def name(self) -> str:
        tags = ([f"round{self.round}"] if self.round > 1 else []) + (["against"] if self.engine else [])
        return "-".join([self.run, f"g{self.gpus}", self.cache, *tags])


def resolved_dtype(args: argparse.Namespace) -> str:
    """--dtype, with auto = fp32 on the CPU and bf16 elsewhere."""
    if args.dtype != "auto":
        return args.dtype
    return "fp32" if args.device == "cpu" else "bf16"


def prepare(args: argparse.Namespace) -> None:
    """Write <workdir>/model and <workdir>/rows.jsonl unless the same ones are there."""
    work = Path(args.workdir)
    spec = dict(arch=args.arch, dtype=resolved_dtype(args), rows=args.rows, seed=args.seed)
    marker = work / "prepare.json"
    if not args.force and marker.exists() and json.loads(marker.read_text()) == spec:
        print(f"prepare: reusing {work} ({spec})", flush=True)
        return
    work.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    t = time.perf_counter()
    write_model(work / "model", args.arch, spec["dtype"], args.seed, args.tokenizer)
    write_rows(work / "rows.jsonl", args.rows, args.seed)
    marker.write_text(json.dumps(spec))
    print(f"prepare: {work} in {time.perf_counter() - t:.1f} s ({spec})", flush=True)


def write_model(path: Path, arch: str, dtype: str, seed: int, tokenizer_dir: str | None = None) -> None:
    """Random weights of ``arch`` (bench.CONFIGS), the embedded tokenizer, stop ids spread over the vocabulary."""
    import torch
    import transformers
    from bench import CONFIGS

    from pmaccel.embedded import embedded_model_dir

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir or embedded_model_dir())
    shape = dict(CONFIGS[arch])
    if arch == "tiny":
        shape["vocab_size"] = TINY_VOCAB
    if shape["vocab_size"] < len(tokenizer):
        raise SystemExit(f"--arch {arch}: vocab_size {shape['vocab_size']} < the tokenizer's {len(tokenizer)} ids")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    config = transformers.Qwen2Config(**shape, **ARCH_EXTRA, pad_token_id=pad)
    torch.manual_seed(seed)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    eos = [i for i in range(shape["vocab_size"]) if i % EOS_EVERY == EOS_AT]
    model.generation_config = transformers.GenerationConfig(eos_token_id=eos, pad_token_id=pad, bos_token_id=None)
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def write_rows(path: Path, n: int, seed: int) -> None:
    """``n`` seeded parallel rows of random words: main 0-120 words, 2-8 branches of 4-60."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    with path.open("w") as f:
        for i in range(n):
            main = text(0, 120)
            f.write(json.dumps({"id": i, "main": main, "branches": [text(4, 60) for _ in range(rng.randint(2, 8))]})
                    + "\n")


def launcher(gpus: int, name: str = "accelerate") -> list[str]:
    """How a user starts N processes: nothing for one, ``accelerate launch`` (or ``torchrun``) for several."""
    if gpus == 1:
        return []
    if name == "torchrun":
        return [exe("torchrun"), "--nproc_per_node", str(gpus)]
    return [exe("accelerate"), "launch", "--multi_gpu", "--num_processes", str(gpus), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no"]


def exe(name: str) -> str:
    """A console script of this environment (the one running this file), else the one on PATH."""
    here = BIN / name
    return str(here) if here.exists() else shutil.which(name) or name


def command(run: str, gpus: int, out: Path, args: argparse.Namespace) -> list[str]:
    """The command line of ``run`` on ``gpus`` processes, writing ``out``."""
    work = Path(args.workdir)
    if run in IDIOM_MODES:
        script = [sys.executable] if gpus == 1 else []
        return launcher(gpus, args.launcher) + script + [
            str(HERE / "idiom.py"), "--model", str(work / "model"), "--rows", str(work / "rows.jsonl"),
            "--out", str(out), "--max_new_tokens", str(args.max_new_tokens), "--mode", IDIOM_MODES[run],
            "--dtype", resolved_dtype(args), "--device", args.device, "--batch_size", str(args.batch_size)]
    script = shutil.which("pmaccel", path=str(BIN)) or shutil.which("pmaccel")
    alone = [script] if script else [sys.executable, "-m", "pmaccel"]
    if args.launcher == "pmaccel":  # the run starts its own processes
        entry = alone + (["--num_processes", str(gpus)] if gpus > 1 else [])
    else:
        entry = launcher(gpus, args.launcher) + (alone if gpus == 1 else ["-m", "pmaccel"])
    cmd = entry + [
        "--base_model", str(work / "model"), "--data_path", str(work / "rows.jsonl"), "--out_path", str(out),
        "--max_new_tokens", str(args.max_new_tokens), "--dtype", resolved_dtype(args)]
    if args.device != "auto":
        cmd += ["--device", args.device]
    if "patch" in run:
        cmd.append("--patch_rope")
    if run.endswith("_det"):
        cmd.append("--deterministic")
    return cmd + shlex.split(args.pmaccel_args)


def plan(args: argparse.Namespace) -> list[Job]:
    """Every job, in order: per GPU count, per run, first then repeat. pmaccel's runs are repeated
    ``--rounds`` times, and with ``--against`` each is paired with the same run of that directory's
    pmaccel (interleaved, so that a drift of the machine reaches both alike; this checkout's first in odd
    rounds, the other's in even ones); the idiom's run once."""
    work = Path(args.workdir)
    twice = set(split(args.twice))
    engines = [""] + ([str(Path(args.against).resolve())] if args.against else [])
    jobs = []
    for gpus in [int(g) for g in split(args.gpus)]:
        for run in split(args.runs):
            if run not in RUNS:
                raise SystemExit(f"unknown run {run!r}; choose from {', '.join(RUNS)}")
            ours = run.startswith("pmaccel")
            for rnd in range(1, (args.rounds if ours else 1) + 1):
                # the --against runs go first in even rounds: the later of a pair finds the OS's caches warmer
                order = engines if rnd % 2 else engines[::-1]
                for engine in order if ours else [""]:
                    for cache in ("first", "repeat") if run in twice else ("first",):
                        job = Job(run, gpus, cache, [], Path(), Path(), engine=engine, round=rnd)
                        job.cache_dir = work / "caches" / job.name.replace(f"-{cache}", "")
                        job.out = work / "out" / job.name / "out.jsonl"
                        job.cmd = command(run, gpus, job.out, args)
                        jobs.append(job)
    return jobs


def split(text: str) -> list[str]:
    """A comma list's items."""
    return [x.strip() for x in text.split(",") if x.strip()]


def environment(cache_dir: Path, engine: str = "") -> dict[str, str]:
    """This process's environment with every compile cache (and HOME) inside ``cache_dir``; with ``engine`` (a
    directory holding another pmaccel package) first on PYTHONPATH."""
    env = dict(os.environ, HOME=str(cache_dir / "home"), XDG_CACHE_HOME=str(cache_dir / "xdg"),
               PMACCEL_CACHE=str(cache_dir / "pmaccel"), TORCHINDUCTOR_CACHE_DIR=str(cache_dir / "inductor"),
               TRITON_CACHE_DIR=str(cache_dir / "triton"), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if engine:
        env["PYTHONPATH"] = os.pathsep.join([engine, *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def execute(job: Job, timeout: float, logs: Path) -> None:
    """Run ``job`` in a fresh process group; the wall clock is taken around the subprocess alone."""
    if job.cache == "first":
        shutil.rmtree(job.cache_dir, ignore_errors=True)
    (job.cache_dir / "home").mkdir(parents=True, exist_ok=True)
    shutil.rmtree(job.out.parent, ignore_errors=True)  # no stale output, part files or summary
    job.out.parent.mkdir(parents=True)
    logs.mkdir(parents=True, exist_ok=True)
    stdout, stderr = logs / f"{job.name}.out", logs / f"{job.name}.err"
    print(f"\n[{job.name}] {shlex.join(job.cmd)}", flush=True)
    with stdout.open("w") as o, stderr.open("w") as e:
        t, launched_at = time.perf_counter(), time.time()
        # `python -m` puts the working directory first on the path: the other engine's runs start in its own
        proc = subprocess.Popen(job.cmd, stdout=o, stderr=e, env=environment(job.cache_dir, job.engine),
                                cwd=job.engine or HERE.parent, start_new_session=True)
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the ranks it started
            rc, timed_out = proc.wait(), True
        wall, returned_at = time.perf_counter() - t, time.time()
    job.result = dict(run=job.run, gpus=job.gpus, cache=job.cache, cmd=shlex.join(job.cmd), rc=rc,
                      timed_out=timed_out, wall_s=wall, stdout=str(stdout), stderr=str(stderr), out=str(job.out),
                      engine=job.engine or "this checkout", round=job.round)
    rows = read_jsonl(job.out) if rc == 0 and not timed_out else None
    if timed_out:
        job.result["error"] = f"timed out after {timeout:.0f} s"
    elif rc != 0:
        job.result["error"] = last_line(stderr) or f"exit status {rc}"
    elif rows is None:
        job.result["error"] = "no output file"
    if rows is not None:
        job.result["rows"] = len(rows)
        job.result["gen_tokens"] = sum(sum(r.get("num_generated_tokens") or []) for r in rows)
        job.result["tok_s"] = job.result["gen_tokens"] / wall
    job.result["phases"] = read_phases(job)
    job.result["outside_ranks_s"] = outside_ranks(wall, job.result["phases"])
    job.result["timeline"] = timeline(launched_at, returned_at, job.result["phases"])
    status = job.result.get("error") or f"{job.result['gen_tokens']} tokens"
    print(f"[{job.name}] {wall:.1f} s, {status}", flush=True)


def read_jsonl(path: Path) -> list[dict] | None:
    """The rows of a JSONL file, None when it is missing."""
    if not path.exists():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_line(path: Path) -> str:
    """The last line of a log that reads like an error (else its last line)."""
    lines = [x.strip() for x in path.read_text(errors="replace").splitlines() if x.strip()]
    errors = [x for x in lines if "Error" in x or "error:" in x]
    return (errors or lines or [""])[-1][:300]


def read_phases(job: Job) -> list[dict] | None:
    """Seconds per phase, one dict per rank: idiom.py's <out>.phases.json, pmaccel's <out>.summary.json."""
    for name in (job.out.name + ".phases.json", job.out.name + ".summary.json"):
        path = job.out.with_name(name)
        if path.exists():
            try:
                phases = json.loads(path.read_text()).get("phases")
            except (json.JSONDecodeError, AttributeError):
                return None
            if isinstance(phases, dict):
                phases = [phases]
            return phases if isinstance(phases, list) else None
    return None


TIMELINE = ("start_s", "read_s", "load_s", "tokenize_s", "group_s", "shard_s", "run_s", "gather_s", "write_s")  # one after another


def outside_ranks(wall: float, phases: list[dict] | None) -> float | None:
    """Seconds of the wall clock outside every rank's own timeline (start_s and the phases after it): the
    launcher's imports, spawning and shut-down, and the ranks' exit. None without pmaccel's start_s."""
    if not phases or any("start_s" not in rank for rank in phases):
        return None
    return round(wall - max(sum(float(rank.get(k, 0.0)) for k in TIMELINE) for rank in phases), 3)


def timeline(launched_at: float, returned_at: float, phases: list[dict] | None) -> list[dict] | None:
    """Per rank, on the command's clock: when its process started (``began_s``, after the command's own start-up
    and the launcher's), when its timeline ended (``ended_s``) and how long the command ran after that
    (``after_s``: the last barrier, the exit, the launcher's shut-down). None without pmaccel's stamps."""
    if not phases or any("started_at" not in rank or "ended_at" not in rank for rank in phases):
        return None
    return [{"began_s": round(rank["started_at"] - launched_at, 3), "ended_s": round(rank["ended_at"] - launched_at, 3),
             "after_s": round(returned_at - rank["ended_at"], 3)} for rank in phases]


def slowest(phases: list[dict] | None) -> dict[str, float]:
    """Per phase, the slowest rank's seconds: the entries named ``*_s`` (counts left out), else every number."""
    out: dict[str, float] = {}
    for rank in phases or []:
        numbers = {k: float(v) for k, v in rank.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        timed = {k[:-2]: v for k, v in numbers.items() if k.endswith("_s")}
        for k, v in (timed or numbers).items():
            out[k] = max(out.get(k, 0.0), v)
    return out


def compare(jobs: list[Job], model_dir: Path) -> None:
    """Per job, the fraction of branches whose output matches idiom's (same GPU count) token for token.

    Outputs with ids are compared as ids; pmaccel's (text and counts) against idiom's ids decoded with
    skip_special_tokens=True, with the same number of tokens.
    """
    idioms = {j.gpus: read_jsonl(j.out) for j in jobs if j.run == "idiom" and "error" not in j.result}
    todo = [j for j in jobs if j.run != "idiom" and "patch" not in j.run and "error" not in j.result
            and idioms.get(j.gpus)]
    if not todo:
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for job in todo:
        ref, got = idioms[job.gpus], read_jsonl(job.out)
        if got is None or len(got) != len(ref):
            continue
        same = total = 0
        for a, b in zip(ref, got):
            for k, ids in enumerate(a["output_ids"]):
                total += 1
                if "output_ids" in b:
                    same += b["output_ids"][k] == ids
                else:
                    text = tokenizer.decode(ids, skip_special_tokens=True)
                    same += b["outputs"][k] == text and b["num_generated_tokens"][k] == len(ids)
        job.result["agree"] = same / total if total else None
        job.result["agree_branches"] = [same, total]


def compare_engines(jobs: list[Job]) -> None:
    """Per run of the --against engine, whether its output file is byte for byte this checkout's of the same
    run, GPU count, cache and round."""
    ours = {(j.run, j.gpus, j.cache, j.round): j for j in jobs if not j.engine and "error" not in j.result}
    for job in jobs:
        twin = ours.get((job.run, job.gpus, job.cache, job.round))
        if job.engine and twin is not None and "error" not in job.result:
            job.result["same_output"] = job.out.read_bytes() == twin.out.read_bytes()


def finish(jobs: list[Job]) -> None:
    """Speed-up over idiom (same GPU count) by wall clock and by tokens/s."""
    idiom = {j.gpus: j.result for j in jobs if j.run == "idiom" and "gen_tokens" in j.result}
    for job in jobs:
        ref = idiom.get(job.gpus)
        if ref and "gen_tokens" in job.result:
            job.result["x_idiom"] = ref["wall_s"] / job.result["wall_s"]
            job.result["x_idiom_tok_s"] = job.result["tok_s"] / ref["tok_s"] if ref["tok_s"] else None


def info(args: argparse.Namespace) -> dict:
    """Date, card, versions and workload, for the results file."""
    versions = {}
    for pkg in ("torch", "transformers", "accelerate", "pmaccel"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    gpu = None
    if shutil.which("nvidia-smi") and args.device != "cpu":
        q = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                           text=True, check=False)
        gpu = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else None
    return dict(date=time.strftime("%Y-%m-%d %H:%M"), host=os.uname().nodename, gpu=gpu, python=sys.version.split()[0],
                **versions, arch=args.arch, dtype=resolved_dtype(args), rows=args.rows,
                max_new_tokens=args.max_new_tokens, device=args.device)


def save(path_list: list[Path], head: dict, args: argparse.Namespace, jobs: list[Job]) -> None:
    """Write the results so far to every path."""
    data = dict(info=head, args=vars(args), results=[j.result for j in jobs if j.result])
    for path in path_list:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1))


def table(results: list[dict]) -> str:
    """The results as a Markdown table."""
    lines = ["| run | gpus | cache | wall s | gen tokens | tok/s | × idiom | agree | phases (s, slowest rank) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        if "error" in r:
            cells = [f"{r['wall_s']:.1f}", "–", "–", "–", "–", f"**{r['error']}**"]
        else:
            x = r.get("x_idiom")
            agree = r.get("agree")
            phases = " · ".join(f"{k} {v:.2f}" for k, v in slowest(r.get("phases")).items()) or "–"
            if r.get("outside_ranks_s") is not None:
                phases += f" · outside the ranks {r['outside_ranks_s']:.2f}"
            if r.get("timeline"):
                phases += " · ranks began/ended at " + ", ".join(
                    f"{t['began_s']:.1f}/{t['ended_s']:.1f}" for t in r["timeline"])
            cells = [f"{r['wall_s']:.1f}", str(r["gen_tokens"]), f"{r['tok_s']:.0f}",
                     "–" if x is None else f"{x:.2f}", "–" if agree is None else f"{agree:.1%}", phases]
        tags = ([f"round {r['round']}"] if r.get("round", 1) > 1 else []) + (
            ["against" + {True: ", same output", False: ", **other output**"}.get(r.get("same_output"), "")]
            if r.get("engine", "this checkout") != "this checkout" else [])
        run = r["run"] + (f" ({'; '.join(tags)})" if tags else "")
        lines.append("| " + " | ".join([run, str(r["gpus"]), r["cache"], *cells]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", nargs="?", choices=("run", "prepare"), default="run",
                    help="run (default; prepares the workdir first when needed) or only prepare")
    ap.add_argument("--workdir", default="/tmp/pmaccel-e2e")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory; default: the embedded SmolLM2's")
    ap.add_argument("--arch", default="0.5b", choices=("0.5b", "7b", "tiny"))
    ap.add_argument("--rows", type=int, default=768, help="parallel rows to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="prepare again even if the workdir matches")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma list of {', '.join(RUNS)}")
    ap.add_argument("--launcher", choices=("accelerate", "torchrun", "pmaccel"), default="accelerate",
                    help="what starts several processes (one runs without a launcher; pmaccel: "
                         "pmaccel --num_processes N)")
    ap.add_argument("--twice", default="static,pmaccel,pmaccel_patch",
                    help="runs done twice: empty compile caches, then warm ones")
    ap.add_argument("--gpus", default="1", help="comma list of process counts (1 = no accelerate launch)")
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--batch_size", type=int, default=256, help="prompts per generate() call in idiom/static")
    ap.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                    help="auto: bf16, or fp32 with --device cpu")
    ap.add_argument("--device", default="auto", help="auto (each process's accelerator device) or cpu")
    ap.add_argument("--pmaccel_args", default="", help="extra pmaccel flags, one shell-quoted string")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess before it is killed")
    ap.add_argument("--rounds", type=int, default=1, help="run pmaccel's runs this many times")
    ap.add_argument("--against", default=None, metavar="DIR",
                    help="also run pmaccel's runs with the pmaccel package in DIR (another commit: DIR/pmaccel), "
                         "paired with this checkout's (either first, by turns), and compare the output files byte for byte")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.against and not (Path(args.against) / "pmaccel" / "__init__.py").is_file():
        ap.error(f"--against {args.against}: no pmaccel package there (give the directory that holds pmaccel/)")
    if args.rounds < 1:
        ap.error("--rounds must be 1 or more")
    args.workdir = str(Path(args.workdir).resolve())  # the --against runs start in another directory

    work = Path(args.workdir)
    prepare(args)
    if args.stage == "prepare":
        return 0
    head = info(args)
    print(json.dumps(head), flush=True)
    jobs = plan(args)
    paths = [work / "e2e.json"] + ([Path(args.json)] if args.json else [])
    for job in jobs:
        execute(job, args.timeout, work / "logs")
        save(paths, head, args, jobs)
    compare(jobs, work / "model")
    compare_engines(jobs)
    finish(jobs)
    save(paths, head, args, jobs)
    print("\n" + table([j.result for j in jobs]))
    print(f"\nresults: {', '.join(map(str, paths))}")
    return 0 if all("error" not in j.result for j in jobs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
