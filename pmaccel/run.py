"""The job runner behind ``infer()`` and ``score()``: rows in, ordered JSONL out, resumable; the same
call in plain Python, under ``notebook_launcher`` and under ``accelerate launch`` (SPEC §7, §8, §11).

Importing this module is light (torch, transformers and accelerate load when a job runs).

    settings -> check the output path -> read rows (an Arrow table, built once)
      -> tokenize (Dataset.map, cached), while the model loads in a thread -> group into samples (numpy)
      -> part files (resume)
      -> this rank's share, a chunk of samples at a time -> the main process merges the part files
         in sample order into the output, line by line -> clean up

What is computed per batch, and how results become records, is a ``Job``:
``pmaccel.inference.GenerateJob`` decodes (``infer``, with the ``--compare`` / ``--leakage`` extras of
``pmaccel.measure``); ``pmaccel.scoring.ScoreJob`` scores (``score``). The pipeline is one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import sys
import threading
import time
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from pmaccel import distribute, output
from pmaccel.errors import PMAccelError
from pmaccel.grouping import Grouping, Sample, SampleTable, group_samples, tokenize_rows
from pmaccel.rows import Row, RowsView, Skipped, check_data_path, load_rows, remapped
from pmaccel.settings import Settings, settings_from_kwargs

WRITE_EVERY_S = 1.0  # part files are appended and fsynced at most this often (and at the end)
RUN_CHUNK = 8192  # samples of a rank's share materialised (and handed to the engine) at a time
MERGE_CHUNK = 4096  # samples merged into the output at a time (and asked of other ranks without a shared disk)
SORT_WINDOW = 32 * RUN_CHUNK  # a rank's samples are ordered longest first within windows of this many


@dataclasses.dataclass
class Summary:
    """What a run did (printed at the end, and kept on the returned ``Records``)."""

    rows: int  # rows written
    samples: int
    branches: int
    skipped_rows: int
    samples_computed: int  # in this run; the others came from the part files of an interrupted run
    samples_resumed: int
    generated_tokens: int  # in this run (0 for pmaccel score)
    wall_time_s: float
    out_path: str
    job: str = "pmaccel"  # "pmaccel" (infer) or "pmaccel score"
    totals: dict[str, Any] = dataclasses.field(default_factory=dict)  # dataset totals (score, compare, leakage)
    notes: list[str] = dataclasses.field(default_factory=list)  # the totals, in words
    phases: list[dict[str, float]] = dataclasses.field(default_factory=list)  # per rank: seconds per phase
    tokens: int = 0  # tokens this run worked on: generated (pmaccel), or scored targets (pmaccel score)
    deterministic: bool = False  # results independent of the batch: invariant kernels on CUDA, or fp32 on the CPU

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

    def __str__(self) -> str:
        done = "generated" if self.job == "pmaccel" else "scored"
        work = f"{self.tokens} tokens {done} in {self.wall_time_s:.1f} s ({self.tokens_per_s:.1f} tokens/s)"
        return (f"{self.job}: {self.rows} rows ({self.samples} samples, {self.branches} branches) -> "
                f"{self.out_path}; {work}; {self.samples_computed} samples computed, "
                f"{self.samples_resumed} resumed; {self.skipped_rows} rows skipped"
                + ("; deterministic" if self.deterministic else "")
                + "".join(f"\n  {note}" for note in self.notes))


class Records(Sequence):
    """The output records (one per written row, in input order), with the run's ``summary``.

    Read from the output file on access (a run's records are never all held in memory): compare, index,
    slice and iterate them like a list; they reflect the file as it is when read.
    """

    summary: Summary

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._starts: array | None = None

    def _lines(self) -> array:
        if self._starts is None:
            self._starts = array("q")
            with open(self.path, "rb") as f:
                at = 0
                for line in f:
                    self._starts.append(at)
                    at += len(line)
        return self._starts

    def __len__(self) -> int:
        return len(self._lines())

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        starts = self._lines()
        with open(self.path, "rb") as f:
            f.seek(starts[i])
            return json.loads(f.readline())

    def __iter__(self) -> Iterator[dict]:
        with open(self.path, "rb") as f:
            for line in f:
                yield json.loads(line)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Records | list | tuple):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Records({len(self)} rows of {self.path})"


class Job:
    """What a run computes per batch of samples and how results become records.

    ``run_job`` reads the rows, shards them, keeps the part files, resumes and writes the ordered output;
    a job says what differs: ``pmaccel.inference.GenerateJob`` decodes (``infer``),
    ``pmaccel.scoring.ScoreJob`` scores (``score``). A result is a JSON dict per sample whose per-branch
    lists are in branch order.
    """

    name = "pmaccel"  # the progress bar and the summary
    kind = ""  # part of every resume key: results of another kind are never reused ("" = decoding)
    ignore: tuple[str, ...] = ()  # settings that do not change this job's results
    # fp32 on the CPU gives results that do not depend on the batch: tokens do (an argmax or a draw keeps
    # them), scores do not (their last bits follow the GEMMs' blocking, which follows the batch's shape)
    invariant_on_cpu = True

    def check(self, settings: Settings) -> None:
        """Refuse settings this job cannot run with (before anything is read or loaded)."""

    def data_path(self, settings: Settings) -> str | None:
        """The input file (``None``: the shipped example)."""
        return settings.data_path

    def counter(self, tokenizer: Any, settings: Settings) -> Callable[[Row], int] | None:
        """``row -> tokens`` for the grouping (checks a row for this job); ``None``: prompt tokens."""
        return None

    def run_samples(self, settings: Settings, model: Any, tokenizer: Any, samples: Sequence[Sample],
                    on_results: Callable[[list[tuple[int, dict]]], None]) -> dict[str, float]:
        """Compute every sample's result; hand finished ones to ``on_results`` as ``(position, result)``
        pairs as they come (the caller writes them out). Returns per-phase timings for the summary."""
        raise NotImplementedError

    def tokens(self, result: dict) -> int:
        """What a result counts toward the progress bar's tokens/s."""
        raise NotImplementedError

    def records(self, sample: Sample, rows: Sequence[Row], result: dict,
                settings: Settings) -> list[tuple[int, dict]]:
        """The output records of a sample's rows, as ``(row position, record)``."""
        raise NotImplementedError

    def totals(self, settings: Settings) -> Totals | None:
        """What takes this job's dataset totals as the main process writes the output; ``None`` when it has
        none."""
        return None


class Totals:
    """Dataset totals, taken on the main process from every sample's result once (de-duplicated, in index
    order, as the output is written): running sums, never averages of averages, so they do not depend on the
    number of processes, and never the results themselves, so memory does not grow with the dataset."""

    def add(self, sample: Sample, rows: Mapping[int, Row], result: dict) -> None:
        """Count one sample's result; ``rows`` holds its rows (``sample.rows``)."""
        raise NotImplementedError

    def summary(self) -> tuple[dict[str, Any], list[str]]:
        """The totals, and the same in words."""
        raise NotImplementedError


def run_settings(settings: Settings | None, kwargs: dict[str, Any]) -> Settings:
    """``settings`` (a ``Settings`` or None) overridden by ``kwargs``; what ``infer`` and ``score`` take."""
    if settings is not None and not isinstance(settings, Settings):
        kind = type(settings).__name__
        raise PMAccelError(f"the positional argument must be a pmaccel.Settings, got {kind}")
    return settings_from_kwargs(kwargs, base=settings)


def run_job(settings: Settings, job: Job, *, own_process: bool | None = None) -> Records | None:
    """Run ``job`` over the rows of ``settings.data_path`` and write its ordered, resumable output.

    Every process calls this; see ``pmaccel.inference.infer`` for the launchers. Returns the records on the main
    process, ``None`` on the others. With ``settings.num_processes`` > 1 and no launcher, the processes are
    started here (``pmaccel.launch``) and this returns the records once they are done. ``own_process``: run
    in a child process of this one (``None``: when ``spares_cuda`` says so; the CLI, whose process ends with
    the run, passes ``False``).
    """
    job.check(settings)
    from pmaccel import launch

    if launch.check_process_count(settings):
        return launch.run_processes(settings, job)
    if own_process is None:
        own_process = spares_cuda(settings)
    if own_process:
        return _run_in_child(settings, job)
    from pmaccel import warmup

    # a machine's first run, where no caller started it (the CLI does, earlier), and only while this process has its
    # imports ahead of it
    side = warmup.start(settings) if _imports_ahead() else None
    try:
        return _run_here(settings, job)
    finally:
        warmup.stop(side)  # a run that ended early


def end_process_group() -> None:
    """Take down this process's process group, where it is one of several and its run is over: the CLI's own
    process calls this before it exits, so that NCCL's communicators end while the interpreter is whole rather
    than in their destructors at exit (a rank could crash there, SIGSEGV, after a finished run). A caller's
    program keeps its group (it may communicate after ``infer``), and accelerate leaves the group of
    ``notebook_launcher``'s forked ranks alone."""
    from accelerate.state import PartialState

    if PartialState._shared_state and PartialState().num_processes > 1:
        PartialState().destroy_process_group()


def _imports_ahead() -> bool:
    """Whether this process has still to import transformers (seconds of a run's start-up). Only then does a side
    process gain time: it imports them and compiles the kernels meanwhile. A process that has imported them already
    (a script or notebook that loaded a model before) reaches ``compile_ahead`` within seconds of loading the
    weights and compiles sooner in its own threads than a side process that has those imports still to do."""
    return "transformers" not in sys.modules


def _run_here(settings: Settings, job: Job) -> Records | None:
    """``run_job`` in this process: an input error on a launcher's forked rank is one line and exit status 2."""
    from accelerate.state import AcceleratorState, PartialState

    ours = not PartialState._shared_state  # this call creates accelerate's process state
    try:
        return _run_job(settings, job)
    except PMAccelError as e:
        if _forked_rank():
            # a rank of notebook_launcher/debug_launcher: every rank meets the same input error; the main
            # one says it in one line and all end with status 2 (the launcher then reports the failed
            # processes), instead of each rank's traceback relayed by the launcher
            if _launched_rank() == 0:
                print(f"pmaccel: error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        raise
    finally:
        if ours and PartialState._shared_state and PartialState().num_processes == 1:
            # an in-process run leaves no state behind: a notebook's later notebook_launcher/debug_launcher
            # with several processes would fork children that believe they run alone (and hang)
            AcceleratorState._reset_state(reset_partial_state=True)


LAUNCHED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "FORK_LAUNCHED")  # set by accelerate, torchrun, notebook_launcher


def _forked_rank() -> bool:
    """One of several processes that a launcher forked to run a function (``notebook_launcher``,
    ``debug_launcher``), not a program started by ``accelerate launch``/``torchrun``."""
    import multiprocessing

    launched = os.environ.get("FORK_LAUNCHED") == "1" or "TORCHELASTIC_RUN_ID" in os.environ
    return launched and int(os.environ.get("WORLD_SIZE", "1")) > 1 and multiprocessing.parent_process() is not None


def _launched_rank() -> int:
    """This process's rank among a launcher's: the process group's when there is one (``debug_launcher``
    sets no ``RANK``, and Accelerate then sets it to 0 in every process), else ``RANK``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def spares_cuda(settings: Settings) -> bool:
    """Whether a run should keep CUDA out of the calling process: an interactive session (a notebook's
    kernel, a Python prompt), a GPU, CUDA not used yet and no launcher. CUDA cannot be shut down once
    started, and a process that has started it can no longer fork GPU workers (``notebook_launcher``); so
    such a run goes to a child process and the session can still launch several later. A script runs
    in its own process (a child would cost it a second start-up)."""
    if settings.device == "cpu" or any(name in os.environ for name in LAUNCHED_ENV) or not _interactive():
        return False
    from accelerate.state import PartialState

    if PartialState._shared_state:  # inside an Accelerate program already: run where it runs
        return False
    import torch

    # device_count asks NVML first, which leaves CUDA itself unstarted (is_available may not)
    return torch.backends.cuda.is_built() and not torch.cuda.is_initialized() and torch.cuda.device_count() > 0


def _interactive() -> bool:
    """A Jupyter/IPython kernel or shell, ``python -i`` or the plain prompt."""
    ipython = sys.modules.get("IPython")
    if ipython is not None and getattr(ipython, "get_ipython", lambda: None)() is not None:
        return True
    return bool(sys.flags.interactive) or hasattr(sys, "ps1")


def _run_in_child(settings: Settings, job: Job) -> Records | None:
    """``run_job`` in a fresh Python process (its output shows as it comes); its records or its error come back."""
    import pickle
    import subprocess
    import tempfile

    from pmaccel import warmup

    side = warmup.start(settings)  # a machine's first run: the kernels compile meanwhile (as the CLI does)
    with tempfile.TemporaryDirectory(prefix="pmaccel-") as tmp:
        task, result = Path(tmp, "task.pkl"), Path(tmp, "result.pkl")
        task.write_bytes(pickle.dumps((settings, job)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # what this process imports
        child = subprocess.Popen([sys.executable, "-c", "from pmaccel.run import _child_main; _child_main()",
                                  str(task), str(result)], env=env)
        try:
            status = child.wait()
        except BaseException:  # an interrupted caller (Ctrl-C, a notebook's stop button) stops the run too
            child.terminate()
            child.wait()
            raise
        finally:
            warmup.stop(side)
        if not result.exists():
            raise RuntimeError(f"pmaccel's run process ended with exit status {status}; its output is above")
        ok, value = pickle.loads(result.read_bytes())
    if not ok:
        raise value
    return value


def _child_main() -> None:
    """The child of ``_run_in_child``: run the pickled job, pickle its records or its input error back."""
    import pickle

    task, result = sys.argv[1:3]
    settings, job = pickle.loads(Path(task).read_bytes())
    try:
        value = (True, run_job(settings, job, own_process=False))
    except PMAccelError as e:
        value = (False, e)
    Path(result).write_bytes(pickle.dumps(value))


def _run_job(settings: Settings, job: Job) -> Records | None:
    started = time.perf_counter()
    clock = _Phases()
    clock.phases["start_s"] = _process_age()  # the interpreter and the imports before the run began
    clock.phases["started_at"] = round(time.time() - clock.phases["start_s"], 3)  # the process's start (epoch s)
    accelerator = _make_accelerator(settings)
    out_path = output.check_writable(settings.out_path)  # before the model loads
    _check_model_paths(settings)
    with output.exclusive(out_path) if accelerator.is_main_process else contextlib.nullcontext():
        return _run_locked(settings, job, accelerator, out_path, started, clock)


def _run_locked(settings: Settings, job: Job, accelerator: Any, out_path: Path, started: float,
                clock: _Phases) -> Records | None:
    data_path = check_data_path(job.data_path(settings))  # every rank: a missing file is everyone's error
    if accelerator.is_local_main_process:  # before any rank of this machine indexes part files (the barrier below)
        output.remove_stale_places(out_path)
    loading = _Loading(settings, accelerator)
    with loading.settled_on_error():
        with accelerator.main_process_first():  # the Arrow table of the rows is built once; the others map it
            rows = load_rows(data_path, num_workers=settings.num_workers)
        if not len(rows):
            raise PMAccelError("the file has no rows", file=rows.path)
        valid, read_skipped = rows.check(settings.on_error)  # every rank meets the same first bad row
        path, lists_as_json = rows.path, rows.lists_as_json
        del rows  # its mapping: the pages the check read leave this process
        loading.go()
        clock.mark("read_s")
        tokenizer, vocab_size = loading.tokenizer()
        clock.mark("load_s")
        grouping, tokens = _tokenize(settings, job, accelerator, valid, tokenizer, vocab_size, lists_as_json)
        clock.mark("tokenize_s")
        model = loading.model()
        clock.mark("load_s")
    if _embedding_rows(model) != vocab_size:  # a config that did not say the model's
        grouping, tokens = _tokenize(settings, job, accelerator, valid, tokenizer, _embedding_rows(model),
                                     lists_as_json)
    table, skipped = group_samples(RowsView(remapped(valid), lists_as_json), tokens, path, grouping, read_skipped)
    del valid, tokens  # the samples' table holds a fresh mapping of the rows and this one of the tokens
    _collect_from_here()
    param = next(model.parameters())
    keys = _Keys(settings, job, runtime=f"{param.dtype}@{param.device.type}")
    clock.mark("group_s")

    done = distribute.agree_on_done(accelerator, _resume_state(settings, accelerator, out_path, table, keys))
    mine = _longest_first(distribute.shard(accelerator, done), table.num_tokens)
    clock.mark("shard_s")
    clock.phases["peak_rss_before_run_gb"] = _peak_rss_gb()  # what reading, tokenizing and sharding took
    clock.phases.update(_resident_now_gb())  # and what is resident now: the process's own, or mapped files
    timings = _run_rank(settings, job, accelerator, model, tokenizer, _Share(table, mine, keys), out_path)
    clock.mark("run_s")
    clock.phases.update(timings, samples=len(mine))

    accelerator.wait_for_everyone()  # every part file is complete
    clock.mark("gather_s")
    records = _merge(accelerator, out_path, table, keys, skipped, job, settings, done=done, started=started)
    clock.mark("write_s")
    clock.phases["peak_rss_gb"] = _peak_rss_gb()
    clock.phases["ended_at"] = round(time.time(), 3)  # the end of the rank's timeline (epoch s): a launcher's share follows
    phases = distribute.gather_phases(accelerator, clock.phases)
    if accelerator.is_main_process:
        records.summary.phases = phases
        output.write_json(output.summary_path(out_path), {**dataclasses.asdict(records.summary),
                                                          "tokens_per_s": records.summary.tokens_per_s})
        print(records.summary, flush=True)
    accelerator.wait_for_everyone()  # the output is in place: the part files can go
    rank, world = accelerator.process_index, accelerator.num_processes
    output.remove_part_files([output.part_path(out_path, rank, world)])
    if accelerator.is_main_process:
        output.remove_part_files(output.find_part_files(out_path))
    return records


def _overlaps(settings: Settings, accelerator: Any) -> bool:
    """Whether the model loads in a thread while the rows are read and tokenized (``_Loading``): where there are
    several processes, whose ranks wait for the main one's reading and tokenizing (``main_process_first``) and
    load meanwhile; not in a process alone, where the two threads take turns at the interpreter and the reading
    and tokenizing slow down by what the overlap gains (docs/PERFORMANCE.md); not with tokenizing processes
    (``num_workers`` > 1: forked, and a lock a thread holds would stay held in them)."""
    return accelerator.num_processes > 1 and settings.num_workers <= 1


def _tokenize(settings: Settings, job: Job, accelerator: Any, valid: Any, tokenizer: Any, vocab_size: int,
              lists_as_json: bool) -> tuple[Grouping, Any]:
    """The grouping settings and the tokens of the valid rows (``tokenize_rows``)."""
    grouping = Grouping.from_settings(settings, vocab_size=vocab_size)
    with accelerator.main_process_first():  # tokenized once (num_workers processes), cached for the others
        tokens = tokenize_rows(valid, tokenizer, grouping, count=job.counter(tokenizer, settings), count_name=job.kind,
                               lists_as_json=lists_as_json, num_workers=settings.num_workers)
    return grouping, tokens


def _longest_first(indices: Any, num_tokens: Any) -> Any:
    """``indices`` by prompt tokens, longest first (stable), within each window of SORT_WINDOW of them: similar
    lengths run together and an OOM shows early, and the sort's temporaries do not grow with the share (the
    order in which a rank runs its samples changes no output: results are merged in sample order)."""
    import numpy as np

    out = np.empty_like(indices)
    for at in range(0, len(indices), SORT_WINDOW):
        window = indices[at:at + SORT_WINDOW]
        out[at:at + len(window)] = window[np.argsort(-num_tokens[window], kind="stable")]
    return out


def _collect_from_here() -> None:
    """Enable the garbage collector again if the caller (the CLI) disabled it for the start-up: one
    collection, then every object still alive is frozen, so the model, tokenizer, rows and the modules
    behind them stay out of each later full collection (a few hundred ms each with transformers loaded)."""
    if not gc.isenabled():
        gc.collect()
        gc.freeze()
        gc.enable()


def _process_age() -> float:
    """Seconds since this process started (0 where that cannot be read)."""
    try:  # Linux: the start in clock ticks since boot, against the boot clock (to 10 ms; psutil's start
        # time rests on a boot time given to the second)
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        return round(max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")), 3)
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil

        return round(max(0.0, time.time() - psutil.Process().create_time()), 3)
    except Exception:  # noqa: BLE001  (a platform without the figure: the phase is only informative)
        return 0.0


def _peak_rss_gb() -> float:
    """This process's peak resident memory so far, in GB (0 where the platform does not say)."""
    try:
        import resource
    except ImportError:  # not on this platform
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (1e9 if sys.platform == "darwin" else 1e6), 3)


def _resident_now_gb() -> dict[str, float]:
    """This process's resident memory when its first forward begins, in GB, in two parts (Linux; nothing
    elsewhere): its own (``rss_anon_before_run_gb``: heap, arrays) and mapped files' pages
    (``rss_file_before_run_gb``: the Arrow tables, libraries), page cache the ranks share and the system can
    take back."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        kib = {k: int(fields[k].split()[0]) for k in ("RssAnon", "RssFile", "RssShmem") if k in fields}
    except (OSError, ValueError):
        return {}
    if "RssAnon" not in kib:
        return {}
    return {"rss_anon_before_run_gb": round(kib["RssAnon"] / 1e6, 3),
            "rss_file_before_run_gb": round((kib.get("RssFile", 0) + kib.get("RssShmem", 0)) / 1e6, 3)}


class _Phases:
    """Wall-clock seconds of a rank's phases (read, load, tokenize, run, gather, write), as marked: the time since
    the last mark goes to the phase named (added up, for a phase marked twice)."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> float:
        now = time.perf_counter()
        self.phases[name] = round(self.phases.get(name, 0.0) + now - self._last, 3)
        self._last = now
        return self.phases[name]


def keep_off_gpus(settings: Settings) -> None:
    """In a process that ends with the run (the command's, a rank pmaccel's launcher started), before anything starts
    CUDA: a run on the CPU gets no GPU to see (``CUDA_VISIBLE_DEVICES`` empty). Otherwise torch's gloo barrier, which
    accelerate's ``wait_for_everyone`` calls with the rank's device id, starts CUDA on GPU <local rank> of a machine
    that has one: a context per process on GPUs the run does not use, and an error where there are fewer GPUs than
    processes. Never in a caller's process: CUDA counts its devices once, so they would stay hidden from it."""
    if settings.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def _make_accelerator(settings: Settings) -> Any:
    """The run's ``Accelerator``; on the CPU when asked to or when there is no GPU (gloo between
    processes, so ``torchrun``/``accelerate launch`` of several processes also works on a CPU box)."""
    import torch
    from accelerate import Accelerator

    if hasattr(torch, "accelerator"):
        has_accelerator = torch.accelerator.is_available()
    else:
        has_accelerator = torch.cuda.is_available()
    accelerator = Accelerator(cpu=settings.device == "cpu" or not has_accelerator)
    forked = os.environ.get("FORK_LAUNCHED") == "1"
    if forked and accelerator.num_processes > 1 and accelerator.device.type == "cpu":
        # ranks forked by notebook_launcher/debug_launcher: OpenMP is not fork-safe, and a thread team
        # started in a forked child can hang forever
        torch.set_num_threads(1)
    return accelerator


def _check_model_paths(settings: Settings) -> None:
    """A missing model directory, GGUF file or LoRA is an error before rows are read or anything loads."""
    from pmaccel.lora import check_lora_path
    from pmaccel.model import check_model_path

    if settings.base_model is not None:
        check_model_path(settings.base_model)
    if settings.lora_path is not None:
        check_lora_path(settings.lora_path)


def _compile_ahead(settings: Settings, model: Any) -> None:
    """Start compiling the invariant kernels (where they run) in background threads (``invariant.compile_ahead``),
    once a side process that compiles them for the same configuration on this machine is done
    (``pmaccel.warmup``: the CLI starts it): then each is in Triton's cache."""
    from pmaccel import invariant, warmup

    if invariant.resolve(settings.deterministic, next(model.parameters()).device):
        invariant.compile_ahead(model, after=lambda: warmup.wait(settings))


class _Loading:
    """The model and its tokenizer, loaded beside the rows' reading and tokenizing where that gains (``_overlaps``).

    Overlapping, in a thread of its own, which makes no collective call (the ranks' barriers stay in the caller's
    thread, in one order): first what costs no device memory (the imports, the device's context, the tokenizer
    and the model's config), while the rows are read; then, once the rows passed their check (``go``), the
    weights, the LoRA and 2D RoPE (``load_model``) and the kernels' compiling ahead (``_compile_ahead``), while
    the rows are tokenized. A bad row is said without loading any weights.

    Otherwise, in the caller's thread: all of it when the tokenizer is asked for (after the reading), so that the
    kernels compile in their threads while the rows are tokenized; with tokenizing processes (``num_workers`` > 1:
    forked, and a lock a thread holds would stay held in them) the kernels start once the model is asked for,
    after the tokenizing. Each rank loads its own copy at the same time.
    """

    def __init__(self, settings: Settings, accelerator: Any):
        self.settings = settings
        self.device = _run_device(settings, accelerator)
        if settings.base_model is None:
            from pmaccel.embedded import embedded_model_dir

            with accelerator.main_process_first():  # the embedded model is converted once, by the main process
                embedded_model_dir()
        self._tokenizer: Future = Future()
        self._model: Future = Future()
        self._go, self._cancelled = threading.Event(), False
        self._thread: threading.Thread | None = None
        if _overlaps(settings, accelerator):
            # imported whole first: datasets' hashing reads transformers' names where it is in sys.modules, and
            # could meet it half-imported by the thread
            import transformers  # noqa: F401

            self._thread = threading.Thread(target=self._load, name="pmaccel-load")
            self._thread.start()

    def go(self) -> None:
        """The rows are fine: the weights may load."""
        self._go.set()

    def tokenizer(self) -> tuple[Any, int]:
        """The tokenizer and the model's vocabulary size (waits for them; raises the loading's error)."""
        if self._thread is None and not self._tokenizer.done():  # in this thread: the model too, and at once
            tokenizer = self._load_tokenizer()
            model = self._load_model(tokenizer)
            self._model.set_result(model)
            self._tokenizer.set_result((tokenizer, _embedding_rows(model)))
        return self._tokenizer.result()

    def model(self) -> Any:
        """The model, in place (waits for it; raises the loading's error)."""
        self.go()
        model = self._model.result()
        if self._thread is not None:
            self._thread.join()  # done but for its return
        if self.settings.num_workers > 1:  # the tokenizing processes are done: the kernels' threads may start
            _compile_ahead(self.settings, model)
        return model

    @contextlib.contextmanager
    def settled_on_error(self) -> Iterator[None]:
        """On an error meanwhile (a bad row, say), no weights load after it. The error goes up at once (the main
        rank says it before the others end); the thread ends by itself, and the process waits for it before it
        exits (the thread is no daemon: no process exits under it while it starts the device)."""
        try:
            yield
        except BaseException:
            self._cancelled = True
            self._go.set()
            raise

    def _load(self) -> None:
        """The thread: the tokenizer and the vocabulary size as soon as the config says it, the model once the rows
        are fine (and the vocabulary size then, where the config was not read)."""
        try:
            self._start_device()
            tokenizer = self._load_tokenizer()
            vocab_size = self._config_vocab_size()
            if vocab_size is not None:
                self._tokenizer.set_result((tokenizer, vocab_size))
            self._go.wait()
            if self._cancelled:
                return
            model = self._load_model(tokenizer)
            self._model.set_result(model)
            if vocab_size is None:
                self._tokenizer.set_result((tokenizer, _embedding_rows(model)))
        except BaseException as e:  # noqa: BLE001  (the caller's to raise, when it asks)
            for future in (self._tokenizer, self._model):
                if not future.done():
                    future.set_exception(e)

    def _start_device(self) -> None:
        """This thread on the run's device, and the device's context started, while the rows are read."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # a thread's current device is its own (device 0 at first)
            torch.empty(1, device=self.device)

    def _load_tokenizer(self) -> Any:
        from pmaccel.model import load_tokenizer

        return load_tokenizer(self.settings.base_model)

    def _config_vocab_size(self) -> int | None:
        """The vocabulary size the model's config gives, and its code imported; ``None`` for a GGUF file (reading
        its config costs about as much as its tokenizer: the model's own count comes soon enough)."""
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        from pmaccel.model import model_config, vocab_size

        base = self.settings.base_model
        if base is not None and Path(base).suffix == ".gguf":
            return None
        config = model_config(base)
        with contextlib.suppress(Exception):  # the model's code imports now (load_model says what else is wrong)
            MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        return vocab_size(config)

    def _load_model(self, tokenizer: Any) -> Any:
        from pmaccel.model import load_model

        s = self.settings
        model, _ = load_model(s.base_model, lora_path=s.lora_path, lora_rank=s.lora_rank,
                              rope_2d_ratio=s.rope_2d_ratio, patch_rope=s.patch_rope, dtype=s.dtype,
                              device=self.device, tokenizer=tokenizer)
        if s.num_workers <= 1:
            _compile_ahead(s, model)
        return model


def _run_device(settings: Settings, accelerator: Any) -> Any:
    """The device the run loads its model on: the accelerator's (``--device auto``) or the one given, with its index.
    A ``cuda`` without one is the current device of the calling thread (device 0 where CUDA has not started): a
    thread that loads for it has a current device of its own."""
    import torch

    from pmaccel.model import resolve_device

    device = accelerator.device if settings.device == "auto" else resolve_device(settings.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_initialized() else 0)
    return device


def _embedding_rows(model: Any) -> int:
    """The rows of ``model``'s input embedding: its vocabulary size, which given token ids must lie below."""
    return model.get_input_embeddings().num_embeddings


class _Keys:
    """Resume keys (``output.sample_keys``) of the samples asked for: computed where needed, never for all."""

    def __init__(self, settings: Settings, job: Job, runtime: str):
        self.settings, self.kind, self.ignore, self.runtime = settings, job.kind, job.ignore, runtime

    def of(self, samples: Sequence[Sample]) -> list[str]:
        return output.sample_keys(samples, self.settings, kind=self.kind, ignore=self.ignore, runtime=self.runtime)


class _Share(Sequence):
    """This rank's samples in the order they run, materialised RUN_CHUNK at a time (the last two chunks are
    held), with their resume keys: a rank never holds the rows of the samples it does not run."""

    def __init__(self, table: SampleTable, indices: Any, keys: _Keys):
        self.table, self.indices, self.keys = table, indices, keys
        self._chunks: dict[int, tuple[list[Sample], list[str]]] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def _chunk(self, c: int) -> tuple[list[Sample], list[str]]:
        if c not in self._chunks:
            samples = self.table.take(self.indices[c * RUN_CHUNK:(c + 1) * RUN_CHUNK])
            self._chunks = {k: v for k, v in self._chunks.items() if k == c - 1}
            self._chunks[c] = samples, self.keys.of(samples)
        return self._chunks[c]

    def __getitem__(self, pos: Any) -> Any:
        if isinstance(pos, slice):
            return [self[p] for p in range(*pos.indices(len(self)))]
        if not 0 <= pos < len(self):
            raise IndexError(pos)
        return self._chunk(pos // RUN_CHUNK)[0][pos % RUN_CHUNK]

    def key(self, pos: int) -> str:
        return self._chunk(pos // RUN_CHUNK)[1][pos % RUN_CHUNK]


def _resume_state(settings: Settings, accelerator: Any, out_path: Path, table: SampleTable, keys: _Keys) -> Any:
    """``[S]`` bool: the finished samples this rank found in part files (none with ``resume=False``); keys are
    computed only for the samples found there, and split among the processes of a machine."""
    import numpy as np

    parts = output.find_part_files(out_path)
    resume = settings.resume if settings.resume is not None else bool(parts)
    done = np.zeros(len(table), dtype=bool)
    if resume:
        # the processes of one machine see the same part files: each indexes and checks its share of what they
        # hold (``agree_on_done`` combines the shares; another machine's processes check their own files)
        local, machine = int(os.environ.get("LOCAL_RANK", "-1")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        share = (local, machine) if 0 <= local < machine else None  # set together by the launchers
        with output.PartResults(out_path, share=share) as found:
            for present in found.index_ranges():  # a range of indices at a time, in order
                present = present[(present >= 0) & (present < len(table))]
                for start in range(0, len(present), MERGE_CHUNK):
                    samples = table.take(present[start:start + MERGE_CHUNK], with_ids=False)
                    indices = [s.index for s in samples]
                    done[indices] = found.locate(indices, keys.of(samples)) >= 0
    else:
        output.remove_part_files(parts)
    accelerator.wait_for_everyone()  # no rank deletes a part file another has opened
    return done


def _run_rank(settings: Settings, job: Job, accelerator: Any, model: Any, tokenizer: Any, samples: _Share,
              out_path: Path) -> dict[str, float]:
    """Run this rank's samples, appending results to the rank's part file as they finish (fsynced at
    most every WRITE_EVERY_S seconds, and always before an error propagates); results are not kept in
    memory. Returns the job's timings."""
    from tqdm.auto import tqdm

    world = accelerator.num_processes
    bar = tqdm(total=len(samples), unit="sample", disable=not accelerator.is_main_process,
               desc=job.name if world == 1 else f"{job.name} (rank 0 of {world})")
    tokens, started, last_write = 0, time.perf_counter(), time.perf_counter()
    unwritten: list[tuple[int, str, dict]] = []

    def write() -> None:
        nonlocal last_write
        if unwritten:
            writer.append(unwritten)
            unwritten.clear()
        last_write = time.perf_counter()

    def on_results(results: list[tuple[int, dict]]) -> None:
        nonlocal tokens
        batch = [(samples[pos].index, samples.key(pos), r) for pos, r in results]
        unwritten.extend(batch)
        tokens += sum(job.tokens(r) for _, _, r in batch)
        bar.update(len(batch))
        bar.set_postfix(tokens_per_s=f"{tokens / max(time.perf_counter() - started, 1e-9):.1f}", refresh=False)
        if time.perf_counter() - last_write >= WRITE_EVERY_S:
            write()

    part = output.part_path(out_path, accelerator.process_index, world)
    with output.PartWriter(part) as writer, bar:
        try:
            timings = job.run_samples(settings, model, tokenizer, samples, on_results) if len(samples) else {}
        finally:
            write()  # what finished is kept, also when the run stops on an error
    return timings


def _merge(accelerator: Any, out_path: Path, table: SampleTable, keys: _Keys, skipped: list[Skipped], job: Job,
           settings: Settings, done: Any, started: float) -> Records | None:
    """The main process writes the output: samples in order, MERGE_CHUNK at a time, each result read from the part
    files it sees (by offset) or, where it sees none (no shared filesystem), sent to it alone by the rank that
    has it, a chunk at a time; records go to the file line by line. The other ranks answer those requests.
    Returns the records (read back from the file) on the main process, ``None`` elsewhere."""
    if not accelerator.is_main_process:
        _serve_results(accelerator, out_path, table, keys)
        return None
    world = accelerator.num_processes
    count = {"rows": 0, "computed": 0, "generated": 0, "tokens": 0}
    totals = job.totals(settings)

    def results(found: output.PartResults) -> Iterator[tuple[Sample, dict[int, Row], dict]]:
        try:
            for start in range(0, len(table), MERGE_CHUNK):
                rows: dict[int, Row] = {}
                samples = table.take(range(start, min(start + MERGE_CHUNK, len(table))), rows, with_ids=False)
                where = found.locate([s.index for s in samples], keys.of(samples))
                missing = [s.index for s, e in zip(samples, where) if e < 0]
                sent: dict[int, dict] = {}
                if world > 1:
                    distribute.broadcast_from_main(accelerator, missing)
                    for part in (distribute.gather_to_main(accelerator, {}) if missing else None) or []:
                        sent.update(part)
                for s, e in zip(samples, where):
                    assert s.index in sent or e >= 0, f"sample {s.index} has no result"
                    yield s, rows, sent[s.index] if e < 0 else found.read(int(e))
        finally:
            if world > 1:
                distribute.broadcast_from_main(accelerator, None)  # the other ranks stop answering

    def lines(found: output.PartResults) -> Iterator[dict]:
        last = -1
        for sample, rows, result in results(found):
            if not done[sample.index]:  # computed in this run
                count["computed"] += 1
                count["tokens"] += job.tokens(result)
                count["generated"] += sum(result.get("num_generated_tokens", []))
            if totals is not None:
                totals.add(sample, rows, result)
            for pos, record in job.records(sample, rows, result, settings):
                assert pos > last, "samples come in row order"
                last = pos
                count["rows"] += 1
                yield record

    with output.PartResults(out_path) as found:
        output.write_jsonl(out_path, lines(found))
    errors = output.errors_path(out_path)
    if skipped:
        output.write_jsonl(errors, (
            {"file": table.path, "row": s.number, "error": s.error, "input": s.content} for s in skipped))
    else:
        errors.unlink(missing_ok=True)  # from an earlier run
    records = Records(out_path)
    records.summary = _summary(table, skipped, count, totals, started, out_path, job, settings)
    return records


def _serve_results(accelerator: Any, out_path: Path, table: SampleTable, keys: _Keys) -> None:
    """A rank other than the main one: until the main process is done, send it the results it asks for that
    this rank's part files hold (only those, only to it). The part files are indexed at the first request:
    where the main process sees every part file (a shared filesystem) it asks for nothing."""
    own: output.PartResults | None = None
    try:
        while (asked := distribute.broadcast_from_main(accelerator, None)) is not None:
            if not asked:
                continue
            if own is None:
                own = output.PartResults(out_path)
            samples = table.take(asked, with_ids=False)
            where = own.locate([s.index for s in samples], keys.of(samples))
            mine = {s.index: own.read(int(e)) for s, e in zip(samples, where) if e >= 0}
            distribute.gather_to_main(accelerator, mine)
    finally:
        if own is not None:
            own.close()


def _summary(table: SampleTable, skipped: list[Skipped], count: dict[str, int], totals: Totals | None,
             started: float, out_path: Path, job: Job, settings: Settings) -> Summary:
    sums, notes = totals.summary() if totals is not None and len(table) else ({}, [])
    return Summary(
        rows=count["rows"], samples=len(table), branches=int(table.num_branches.sum()),
        skipped_rows=len(skipped), samples_computed=count["computed"], samples_resumed=len(table) - count["computed"],
        generated_tokens=count["generated"], tokens=count["tokens"],
        wall_time_s=time.perf_counter() - started, out_path=str(out_path), job=job.name, totals=sums, notes=notes,
        deterministic=_deterministic(settings, job),
    )


def _deterministic(settings: Settings, job: Job) -> bool:
    """Whether the run's results do not depend on the batch: the invariant kernels ran (CUDA), or fp32 on the CPU
    for a job whose results keep that (``Job.invariant_on_cpu``)."""
    from accelerate import PartialState

    from pmaccel import invariant

    device = PartialState().device
    if device.type == "cuda":
        return invariant.resolve(settings.deterministic, device)
    return job.invariant_on_cpu and settings.dtype in ("auto", "float32", "fp32")
