"""``pmaccel [flags]`` / ``python -m pmaccel [flags]`` / ``accelerate launch -m pmaccel [flags]``,
and ``pmaccel score [flags]`` (the same launchers).

A thin entry point: flags -> ``Settings`` -> the job of ``infer`` (or ``score``), in this process.
A bad input or setting is one line on stderr (``pmaccel: error: file:row: field: problem``) and exit
status 2.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import textwrap
from collections.abc import Iterator, Sequence
from typing import NoReturn

from pmaccel.errors import PMAccelError

PREVIEW_RECORDS = 10
INTERRUPTED = ("pmaccel: interrupted; the samples finished so far are kept in the part files next to --out_path: "
               "the same command again resumes from them")
_FORKS_COLLECT = False  # whether forked children turn the collector back on (registered once)
BYTECODE_PROBES = ("torch", "transformers")  # the largest imports of a run
BYTECODE_WARMERS = ("import datasets, triton", "import transformers.modeling_utils")  # what a run imports after torch
SCORE_DESCRIPTION = ("Score given continuations under the packed layout (teacher-forced log-likelihood, "
                     "perplexity, multiple choice): the same flags, launchers and ordered, resumable output "
                     "as `pmaccel`. Without --data_path: the shipped easy multiple-choice set.")


def main(argv: Sequence[str] | None = None) -> int:
    """Run pmaccel with command-line flags (``pmaccel --help`` lists them).

    Args:
        argv: the flags; default ``sys.argv[1:]``: then this process runs the command (its bytecode may go
            to pmaccel's cache, and a run on the CPU, ``--device cpu``, hides the GPUs from it). Given flags
            leave the calling program's settings as they were.

    Returns:
        The exit status: 0 on success, 2 on a bad input or setting (argparse's own errors exit 2 too).

    Example:
        >>> main(["--data_path", "rows.jsonl", "--out_path", "out.jsonl"])  # doctest: +SKIP
        0
        >>> main(["score", "--data_path", "heldout.jsonl", "--out_path", "scores.jsonl"])  # doctest: +SKIP
        0
    """
    with startup(own_process=argv is None):
        return _main(argv)


def command() -> NoReturn:
    """The ``pmaccel`` command (and ``python -m pmaccel``): ``main`` with ``sys.argv``, then this process ends with
    its exit status (``end_now``)."""
    end_now(main())


def end_now(status: int) -> NoReturn:
    """End the command's process with ``status``, as ``sys.exit`` would but without the interpreter's teardown
    (every module's objects freed one by one, with torch, transformers and datasets loaded: 1.2-1.4 s on a 2-core
    machine, about 0.2 s on a GPU host, after the run is over). What comes before the teardown still happens, in
    the interpreter's order: thread pools are told to end and every thread that is no daemon is waited for, the
    exit handlers run (logging's, multiprocessing's, temporary directories'), the output is flushed. Where the
    interpreter does not expose the first step, the process exits as usual."""
    import atexit
    import threading

    shutdown = getattr(threading, "_shutdown", None)  # what the interpreter calls first when it exits
    if shutdown is None:
        raise SystemExit(status)
    shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken pipe: nothing more can be said
            stream.flush()
    os._exit(status)


@contextlib.contextmanager
def startup(own_process: bool = True) -> Iterator[None]:
    """A process's start-up as a run's own process (the command, or one a launch started): bytecode kept in
    pmaccel's cache where Python writes none, and no garbage collection while imports, weights and rows
    load (the run turns the collector on again, with those objects frozen: ``run._collect_from_here``).
    Afterwards the collector is as it was (a run that ended early, on a bad input). Nothing for
    ``own_process=False``: a caller's process keeps its own settings."""
    if not own_process:
        yield
        return
    _cache_bytecode()
    collecting = gc.isenabled()
    # start-up makes long-lived objects, hardly any garbage
    gc.disable()
    global _FORKS_COLLECT
    if not _FORKS_COLLECT and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=gc.enable)  # processes forked meanwhile (datasets' map workers)
        _FORKS_COLLECT = True  # collect as usual
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def _main(argv: Sequence[str] | None) -> int:
    from pmaccel import warmup
    from pmaccel.settings import parse_settings

    command = argv is None  # this process runs the command (the console script, `python -m pmaccel`, a launch)
    argv = list(sys.argv[1:] if argv is None else argv)
    scoring = argv[:1] == ["score"]
    side = None
    try:
        if scoring:
            settings = parse_settings(argv[1:], prog="pmaccel score", description=SCORE_DESCRIPTION)
        else:
            settings = parse_settings(argv)
        from pmaccel.run import end_process_group, keep_off_gpus, run_job

        if command:  # not in a caller's process: its GPUs stay its own
            keep_off_gpus(settings)
            # a machine's first run: its kernels compile in a side process while this one imports and loads (for a
            # caller, run_job decides: it starts one while the caller has the imports ahead of it)
            side = warmup.start(settings)

        if scoring:
            from pmaccel.scoring import ScoreJob

            job = ScoreJob()
        else:
            from pmaccel.inference import GenerateJob

            job = GenerateJob()
        records = run_job(settings, job, own_process=False)  # the process ends with the run: nothing to spare
        if command:
            end_process_group()
    except PMAccelError as e:
        # under a launcher every rank meets the same input error: the main one says it, once
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"pmaccel: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0")) == 0:
            print(INTERRUPTED, file=sys.stderr, flush=True)
        return 130  # as a shell reports a process that SIGINT ended
    finally:
        warmup.stop(side)  # a run that ended early
    if records is not None and settings.data_path is None and not scoring:  # the demo: show what came out
        _print_preview(records, settings.out_path)
    return 0


def _cache_bytecode() -> None:
    """Keep the bytecode of what the run imports in pmaccel's cache when Python is told not to write it
    next to the sources (``PYTHONDONTWRITEBYTECODE``, common in container images) and none is there:
    otherwise every process compiles torch's and transformers' sources again, seconds each. A
    ``PYTHONPYCACHEPREFIX`` of the user's own is kept."""
    if not sys.dont_write_bytecode or sys.pycache_prefix is not None:
        return
    import importlib.util

    def compiled(package: str) -> bool:
        spec = importlib.util.find_spec(package)  # locates a top-level package without importing it
        return spec is None or not spec.origin or os.path.exists(importlib.util.cache_from_source(spec.origin))

    if all(compiled(package) for package in BYTECODE_PROBES):
        return  # the bytecode is there already
    from pmaccel.embedded import cache_root

    prefix = cache_root() / "bytecode"
    try:
        prefix.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # nowhere to keep it (a read-only home): as before, every process compiles
    sys.pycache_prefix = str(prefix)  # Python mirrors each source's path under it
    sys.dont_write_bytecode = False
    if not all(compiled(package) for package in BYTECODE_PROBES):  # nothing cached there yet
        _warm_bytecode()


def _warm_bytecode() -> None:
    """A first run with an empty bytecode cache: side processes import (so compile and cache) what the run
    imports after torch, while this process compiles torch. Not on a machine of few cores, and only on the
    first process of a machine."""
    if (os.cpu_count() or 1) < 4 or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    import subprocess

    env = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = sys.pycache_prefix
    for code in BYTECODE_WARMERS:  # each ends by itself; a failed import only leaves less cached
        subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _print_preview(records: list[dict], out_path: str) -> None:
    """Every answer of the shipped example, in full, under its question (the demo a newcomer sees)."""
    width = 100
    for record in records[:PREVIEW_RECORDS]:
        print("-" * width)
        if record.get("main"):
            print(_fill(record["main"], "", width))
        branches = record.get("branches") or [record.get("text") or record.get("prompt", "")]
        outputs = record.get("outputs") or [record.get("output", "")]
        reasons = record.get("finish_reasons") or [record.get("finish_reason")]
        for branch, out, reason in zip(branches, outputs, reasons):
            text = branch if isinstance(branch, str) else branch.get("text", branch)
            print(_fill(str(text).strip(), "  Q: ", width))
            cut = " [cut at --max_new_tokens]" if reason == "length" else ""
            print(_fill((out.strip() or "(no text)") + cut, "  A: ", width))
    if len(records) > PREVIEW_RECORDS:
        print(f"... and {len(records) - PREVIEW_RECORDS} more rows in {out_path}")


def _fill(text: str, label: str, width: int) -> str:
    """Wrap each line of ``text`` on its own (lists and paragraphs keep their breaks), under ``label``."""
    indent = " " * len(label)
    lines = [textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent) if line.strip() else ""
             for line in text.splitlines() or [""]]
    return label + "\n".join(lines)[len(indent):]
