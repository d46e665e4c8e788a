"""``--num_processes N``: a run that starts its own processes on this machine, one per GPU.

``pmaccel --num_processes 2 [flags]`` (or ``infer(..., num_processes=2)``) does what
``accelerate launch --multi_gpu --num_processes 2 -m pmaccel [flags]`` does, through the same launcher
(``accelerate.commands.launch``, which starts the processes with ``torch.distributed.run``), called from
this process: the ``accelerate`` command's own start-up (every subcommand's imports, transformers
among them) is not paid, and an input error is one line and exit status 2, not a launcher's
traceback. The processes each run the same job as a launched ``pmaccel`` would; the ordered output
file is the same at any process count. Under a launcher (``accelerate launch``, ``torchrun``,
``notebook_launcher``) the launcher's own process count applies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pickle
import signal
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pmaccel.errors import PMAccelError

LAUNCHER_LOGGERS = ("torch.distributed.elastic", "torch.distributed.run")  # they report every failed process


def launched() -> bool:
    """Whether this process is one of several that a launcher started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def check_process_count(settings: Any) -> bool:
    """Whether this run must start its own processes (``num_processes`` > 1 and no launcher).

    Raises:
        PMAccelError: ``num_processes`` disagrees with the launcher's count, or asks for more GPUs than
            this machine has.
    """
    n = settings.num_processes
    if launched() or "LOCAL_RANK" in os.environ:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if n not in (1, world):
            raise PMAccelError(f"{n} asked for, but the launcher started {world} processes: give the count to "
                               "the launcher only", field="num_processes")
        return False
    if n == 1:
        return False
    if settings.device != "cpu":
        import torch

        gpus = torch.cuda.device_count()  # asks NVML: CUDA itself stays unstarted in this process
        if gpus and n > gpus:
            raise PMAccelError(f"{n} processes, one per GPU, but this machine has {gpus}: use at most {gpus} "
                               "(or --device cpu)", field="num_processes")
    return True


def run_processes(settings: Any, job: Any) -> Any:
    """Run ``job`` in ``settings.num_processes`` processes started here; wait for them.

    Returns the records of the output file (as the main process of a launched run returns them).

    Raises:
        PMAccelError: an input error of a process (the main one's when it met one), to be said once.
        RuntimeError: a process failed otherwise (its traceback is in the output above).
        SystemExit: this process got SIGTERM (status 143): the launcher stopped the processes.
    """
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from pmaccel.output import summary_path
    from pmaccel.run import Records, Summary

    n = settings.num_processes
    with tempfile.TemporaryDirectory(prefix="pmaccel-launch-") as tmp:
        task, errors = Path(tmp, "task.pkl"), Path(tmp, "errors")
        errors.mkdir()
        task.write_bytes(pickle.dumps((settings, job)))
        # the GPUs this process sees (CUDA_VISIBLE_DEVICES), not a default accelerate config's gpu_ids: the
        # count was checked against them
        flags = ["--multi_gpu", "--num_processes", str(n), "--num_machines", "1", "--gpu_ids", "all",
                 "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                 "-m", "pmaccel.launch", str(task), str(errors)]
        args = launch_command_parser().parse_args(flags)
        try:
            with _quiet(LAUNCHER_LOGGERS):  # a failed process says why itself; the launcher's report repeats it
                launch_command(args)
        except ChildFailedError as e:
            said = sorted(errors.glob("*.pkl"), key=lambda f: int(f.stem))  # by rank: the main one's first
            if said:
                raise pickle.loads(said[0].read_bytes()) from None
            codes = sorted({failure.exitcode for failure in e.failures.values()})
            raise RuntimeError(f"{len(e.failures)} of {n} pmaccel processes failed (exit status "
                               f"{', '.join(map(str, codes))}); their output is above") from None
        except SignalException as e:  # the launcher stopped the processes; Ctrl-C is the caller's as usual
            if e.sigval == signal.SIGINT:
                raise KeyboardInterrupt from None
            raise SystemExit(128 + e.sigval) from None  # SIGTERM (a job scheduler): ended as the signal ends a process
    records = Records(settings.out_path)
    fields = {f.name for f in dataclasses.fields(Summary)}
    summary = json.loads(summary_path(Path(settings.out_path)).read_text())
    records.summary = Summary(**{k: v for k, v in summary.items() if k in fields})
    return records


@contextlib.contextmanager
def _quiet(prefixes: tuple[str, ...]) -> Iterator[None]:
    """Only critical records from the loggers under ``prefixes`` meanwhile. A filter, not a level: torch
    resets its loggers' levels when its logging is set up again (which importing parts of it can do)."""
    import torch.distributed.run  # noqa: F401  (the launcher's modules, so that their loggers exist)

    def critical_only(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.CRITICAL

    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict) if name.startswith(prefixes)]
    for logger in loggers:
        logger.addFilter(critical_only)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(critical_only)


def _free_port() -> int:
    """A TCP port nobody listens on now (for the processes' rendezvous; accelerate's default may be taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(task: str, errors: str) -> int:
    """One started process: the pickled job, with the command's start-up; an input error goes back to
    the starting process, which says the main process's (or else the first rank's) once."""
    from pmaccel.cli import startup
    from pmaccel.run import end_process_group, keep_off_gpus, run_job

    with startup():
        settings, job = pickle.loads(Path(task).read_bytes())  # imports the job's modules: after start-up began
        keep_off_gpus(settings)
        try:
            run_job(settings, job, own_process=False)
            end_process_group()  # the process ends with the run
        except PMAccelError as e:
            Path(errors, f"{int(os.environ.get('RANK', '0'))}.pkl").write_bytes(pickle.dumps(e))
            return 2
        except KeyboardInterrupt:  # Ctrl-C reaches every process of the terminal: the starting one says it
            return 130
    return 0


if __name__ == "__main__":
    from pmaccel.cli import end_now

    end_now(_rank_main(*sys.argv[1:3]))
