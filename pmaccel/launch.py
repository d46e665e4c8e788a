"""``--num_processes N``: a run that starts its own processes on this machine, one per GPU.

``pmaccel --num_processes 2 [flags]`` (or ``infer(..., num_processes=2)``) does what
``accelerate launch --multi_gpu --num_processes 2 -m pmaccel [flags]`` does, called from this process: an
input error is one line and exit status 2, not a launcher's traceback. The processes each run the same job
as a launched ``pmaccel`` would; the ordered output file is the same at any process count. Under a
launcher (``accelerate launch``, ``torchrun``, ``notebook_launcher``) the launcher's own process count
applies.

How the processes start:

- the command's own process (``pmaccel``, ``python -m pmaccel``) forks them, as ``notebook_launcher`` does
  (torch's elastic agent, ``start_method="fork"``), once it has imported what a run imports: the
  interpreter's start and those imports (seconds) are paid once, not by a launcher and then again by every
  process, one after the other;
- a caller's process (``infer(..., num_processes=2)`` in a script or notebook: threads, CUDA or state of
  its own that a fork would copy) starts fresh interpreters through accelerate's launcher
  (``accelerate.commands.launch``, which runs ``torch.distributed.run``), without the ``accelerate``
  command's own start-up (every subcommand's imports).
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
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pmaccel.errors import PMAccelError

# they report every failed process (and the ones they stop)
LAUNCHER_LOGGERS = ("torch.distributed.elastic", "torch.distributed.run", "torch.multiprocessing")
# what every process imports: the command's process imports it before it forks them
RANK_IMPORTS = ("pmaccel.run", "pmaccel.model", "datasets", "transformers", "transformers.modeling_utils")
NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"  # torch.cuda.is_available() asks NVML, which starts no CUDA
_forked_here = False  # this process is one that ``run_processes`` forked


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


def run_processes(settings: Any, job: Any, *, fork: bool = False) -> Any:
    """Run ``job`` in ``settings.num_processes`` processes started here; wait for them.

    ``fork``: this process is the run's own (it ends with the run): the processes are forked from it where
    it can fork (``can_fork``); otherwise they are fresh interpreters.

    Returns the records of the output file (as the main process of a launched run returns them).

    Raises:
        PMAccelError: an input error of a process (the main one's when it met one), to be said once.
        RuntimeError: a process failed otherwise (its traceback is in the output above).
        SystemExit: this process got SIGTERM (status 143): the launcher stopped the processes.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from pmaccel.output import summary_path
    from pmaccel.run import Records, Summary

    n = settings.num_processes
    with tempfile.TemporaryDirectory(prefix="pmaccel-launch-") as tmp:
        errors = Path(tmp, "errors")
        errors.mkdir()
        try:
            with _quiet(LAUNCHER_LOGGERS):  # a failed process says why itself; the launcher's report repeats it
                if fork and can_fork():
                    _fork_processes(n, settings, job, errors)
                else:
                    _launch_processes(n, settings, job, Path(tmp, "task.pkl"), errors)
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


def can_fork() -> bool:
    """Whether this process can fork the run's processes, as ``notebook_launcher`` does: on Linux (elsewhere a
    fork of a process with system frameworks loaded is unsafe), with no other thread running (one holding a
    lock, the import lock say, would leave it held in the children) and CUDA not started here (it cannot be
    used in a forked child)."""
    if sys.platform != "linux" or threading.active_count() > 1:
        return False
    import torch

    return not torch.cuda.is_initialized()


def _launch_processes(n: int, settings: Any, job: Any, task: Path, errors: Path) -> None:
    """The processes as fresh interpreters, through accelerate's launcher (``python -m pmaccel.launch``)."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    task.write_bytes(pickle.dumps((settings, job)))
    # the GPUs this process sees (CUDA_VISIBLE_DEVICES), not a default accelerate config's gpu_ids: the
    # count was checked against them
    flags = ["--multi_gpu", "--num_processes", str(n), "--num_machines", "1", "--gpu_ids", "all",
             "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
             "-m", "pmaccel.launch", str(task), str(errors)]
    launch_command(launch_command_parser().parse_args(flags))


def _fork_processes(n: int, settings: Any, job: Any, errors: Path) -> None:
    """The processes forked from this one by torch's elastic agent (what ``notebook_launcher`` runs), with the
    environment accelerate's launcher gives them (no mixed precision or dynamo of a user's default config; one
    CPU thread a process unless ``OMP_NUM_THREADS`` says otherwise), once what each would import is imported.

    Meanwhile this process asks NVML, not CUDA, whether there are GPUs (``PYTORCH_NVML_BASED_CUDA_CHECK``; the
    launcher's config asks, to bind each process to its GPU's NUMA node): CUDA's driver, once started, cannot be
    used in a forked child. The processes get the variable as it was."""
    import importlib

    from accelerate.utils import patch_environment
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in RANK_IMPORTS:
        importlib.import_module(name)
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    nvml_check = os.environ.get(NVML_CHECK)
    with patch_environment(accelerate_mixed_precision="no", accelerate_dynamo_backend="NO", omp_num_threads=threads,
                           **{NVML_CHECK: "1"}):
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=f"pmaccel-{os.getpid()}",
                              rdzv_backend="static", rdzv_endpoint=f"127.0.0.1:{_free_port()}",
                              rdzv_configs={"rank": 0}, max_restarts=0, start_method="fork")
        elastic_launch(config, _forked_main)(settings, job, str(errors), int(threads), nvml_check)


@contextlib.contextmanager
def _quiet(prefixes: tuple[str, ...]) -> Iterator[None]:
    """Only critical records from the loggers under ``prefixes`` meanwhile. A filter, not a level: torch
    resets its loggers' levels when its logging is set up again (which importing parts of it can do)."""
    import torch.distributed.run  # noqa: F401  (the launcher's modules, so that their loggers exist)
    import torch.multiprocessing.spawn  # noqa: F401

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


def _forked_main(settings: Any, job: Any, errors: str, threads: int, nvml_check: str | None) -> None:
    """One process ``_fork_processes`` forked: ``_rank``, with the CPU threads a launched process would have and
    ``PYTORCH_NVML_BASED_CUDA_CHECK`` as the command had it. An unforeseen error is shown as a launched process
    shows it (the launcher keeps a forked one's in a file)."""
    import torch

    from pmaccel.cli import startup

    global _forked_here
    _forked_here = True
    # the launcher's signal handlers came with the fork: stopped by it (SIGTERM), a process ends at once, as a fresh
    # one does, not once the collective call it waits in returns
    for name in ("SIGTERM", "SIGHUP", "SIGQUIT"):
        signal.signal(getattr(signal, name), signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if nvml_check is None:
        os.environ.pop(NVML_CHECK, None)
    else:
        os.environ[NVML_CHECK] = nvml_check
    torch.set_num_threads(threads)  # torch took its count in the command's process, at its import
    try:
        with startup():
            status = _rank(settings, job, errors)
    except Exception:
        traceback.print_exc()
        raise
    if status:
        raise SystemExit(status)


def forked_here() -> bool:
    """Whether this process is one that ``run_processes`` forked (its input errors go back to the starting one)."""
    return _forked_here


def _rank_main(task: str, errors: str) -> int:
    """One started process: the pickled job (``_rank``)."""
    from pmaccel.cli import startup

    with startup():
        settings, job = pickle.loads(Path(task).read_bytes())  # imports the job's modules: after start-up began
        return _rank(settings, job, errors)


def _rank(settings: Any, job: Any, errors: str) -> int:
    """One started process's run (within the command's start-up): its exit status. An input error goes back to the
    starting process, which says the main process's (or else the first rank's) once."""
    from pmaccel.run import end_process_group, keep_off_gpus, run_job

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
