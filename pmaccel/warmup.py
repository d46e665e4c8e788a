"""The kernels of a machine's first run, compiled in a process of their own while the run starts up.

With the batch-invariant kernels (CUDA and Triton), a machine's first run compiles some thirty Triton
variants (``pmaccel.invariant.compile_ahead``: a few seconds on many cores). The run can start them only
once its weights are loaded, after Python has imported torch, accelerate, datasets and transformers, and
threads of the same process gain little during those imports (they wait for Python's lock). So the CLI
starts this module as a side process before its own imports, and ``run_job`` where no caller did and the
process has yet to import transformers (a script's or a launched rank's first ``infer()``, a run in a process
of its own)::

    python -m pmaccel.warmup --model DIR --dtype auto --device cuda

It imports torch and transformers in parallel with the run, builds the model from its ``config.json`` on
the meta device (no weights read), and launches each kernel variant once (``compile_ahead`` with a
``device``: each launch gets zero weights of a layer's shape), so Triton's on-disk cache holds them. The
run's own ``compile_ahead`` first waits for it (``wait``), then finds every variant there; what the
skeleton lacks (a LoRA's layers) still compiles in the run.

It runs once per configuration and machine: a stamp under ``<cache>/kernels/`` (``cache_root``) records that
it ran to its end (and how it went: a model transformers cannot build from its config fails the same way
every time, so it is not tried again), keyed by the model's config, the dtype, pmaccel's kernel source, Triton's
installation and Triton's cache directory. With the stamp there, or no GPU device node, or another
local rank than the first, nothing starts. A lock on the stamp's ``.lock`` file is held while it compiles;
every rank of the machine waits for it (``wait``) before compiling its own.

This module imports only the standard library until the side process needs more (and ``huggingface_hub``
to find a hub id's snapshot in the local cache).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import subprocess

WAIT_S = 180.0  # the longest a run waits for the side process before it compiles on its own
POLL_S = 0.05
ROOM_BYTES = 4 << 30  # free device memory the side process leaves beyond the run's weights
STARTED_ENV = "PMACCEL_WARMUP_PID"  # the side process a run started, for the processes the run starts


@dataclass(frozen=True)
class Plan:
    """Where one configuration's kernels are compiled ahead: the model, dtype and device the side process
    builds them for, its lock and the stamp of its attempt."""

    model: Path
    dtype: str
    device: str
    lock: Path
    stamp: Path

    def done(self) -> bool:
        """Whether the stamp is there, and Triton's cache directory where it stands for kernels compiled there."""
        try:
            lines = self.stamp.read_text().splitlines()
        except OSError:
            return False
        if len(lines) > 1 and lines[1].startswith("not compiled"):
            return True  # tried: another try would end the same way
        return _triton_cache_dir().is_dir()


def plan(settings: Any) -> Plan | None:
    """The compile-ahead plan of a run's settings; ``None`` where it does not apply: the CPU, the kernels
    turned off (``deterministic`` false), or a model whose ``config.json`` is not on this machine (an embedded
    model not converted yet, a GGUF file, a hub id not in the local hub cache).

    Args:
        settings: the run's ``pmaccel.settings.Settings``.

    Example:
        >>> p = plan(parse_settings(["--base_model", "models/qwen"]))  # doctest: +SKIP
        >>> p.stamp.name  # doctest: +SKIP
        '3f2a....done'
    """
    device = str(settings.device)
    if settings.deterministic is False or not (device == "auto" or device.startswith("cuda")):
        return None
    model = _model_dir(settings.base_model)
    if model is None:
        return None
    try:
        config = (model / "config.json").read_bytes()
        kernels = Path(__file__).with_name("invariant.py").read_bytes()
    except OSError:
        return None
    key = hashlib.sha256()
    for part in (config, kernels, settings.dtype.encode(), _installed("triton").encode(),
                 str(_triton_cache_dir()).encode()):
        key.update(hashlib.sha256(part).digest())
    from pmaccel.embedded import cache_root

    name = key.hexdigest()[:24]
    root = cache_root() / "kernels"
    return Plan(model, settings.dtype, "cuda" if device == "auto" else device, root / f"{name}.lock",
                root / f"{name}.done")


def start(settings: Any) -> subprocess.Popen | None:
    """Start the side process for ``settings`` where it can help (the first local rank of a machine with a GPU
    device node, its kernels not compiled ahead yet); its handle, or ``None``.

    Args:
        settings: the run's ``pmaccel.settings.Settings``.

    Example:
        >>> side = start(settings)  # doctest: +SKIP
        >>> ...  # the run imports and loads meanwhile; its compile_ahead waits for the side process
        >>> stop(side)  # doctest: +SKIP
    """
    if os.environ.get("LOCAL_RANK", "0") != "0" or not _gpu_node() or sys.platform == "win32" or _started_above():
        return None
    try:
        p = plan(settings)
    except (OSError, RuntimeError):  # no home directory for the cache, say: the run compiles on its own
        return None
    if p is None or p.done():
        return None
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}  # this pmaccel
    try:
        p.lock.parent.mkdir(parents=True, exist_ok=True)
        side = subprocess.Popen(
            [sys.executable, "-m", "pmaccel.warmup", "--model", str(p.model), "--dtype", p.dtype, "--device", p.device],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:  # a read-only cache, no interpreter to start: the run compiles on its own, as without this
        return None
    os.environ[STARTED_ENV] = str(side.pid)  # the run's own processes (a child, launched ranks) start no other
    return side


def _started_above() -> bool:
    """Whether this process or one above it started a side process that still runs (``STARTED_ENV``)."""
    try:
        os.kill(int(os.environ[STARTED_ENV]), 0)
    except (KeyError, ValueError, OSError):
        return False
    return True


def stop(process: subprocess.Popen | None) -> None:
    """End the side process if it still runs (the run ended early, on a bad input or an interrupt), and take its
    pid out of the environment (a notebook's later runs find no trace of it)."""
    if process is None:
        return
    if process.poll() is None:
        import subprocess

        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
    if os.environ.get(STARTED_ENV) == str(process.pid):
        del os.environ[STARTED_ENV]


def wait(settings: Any, timeout: float = WAIT_S) -> None:
    """Wait until no side process compiles for ``settings`` on this machine (its lock is free), at most
    ``timeout`` seconds; at once where none was started.

    Args:
        settings: the run's ``pmaccel.settings.Settings``.
        timeout: seconds to wait at most.

    Example:
        >>> wait(settings)  # doctest: +SKIP
        >>> compile_ahead(model)  # finds each variant in Triton's cache
    """
    try:
        p = plan(settings)
        f = open(p.lock, "rb") if p is not None else None
    except (OSError, RuntimeError):  # no lock file: no side process ever compiled for this configuration
        return
    if f is None:
        return
    import fcntl

    deadline = time.monotonic() + timeout
    with f:
        while time.monotonic() < deadline:  # past it, the caller compiles what is missing on its own
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return  # free: released with the file
            except OSError:
                time.sleep(POLL_S)


def main(argv: list[str] | None = None) -> int:
    """The side process: hold the lock, compile the model's kernel variants ahead, stamp the attempt (its
    outcome in the stamp). Always exits 0 (a failure only leaves the run to compile on its own)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pmaccel.warmup")
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    settings = argparse.Namespace(base_model=args.model, dtype=args.dtype, device=args.device, deterministic=None)
    p = plan(settings)
    if p is None:
        return 0
    import fcntl

    p.lock.parent.mkdir(parents=True, exist_ok=True)
    with open(p.lock, "ab") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return 0  # another side process compiles them
        if p.done():
            return 0
        try:
            failed = compile_skeleton(p.model, p.dtype, p.device)
            outcome = ("compiled" if failed == 0 else f"compiled; {failed} launches failed" if failed > 0
                       else "not compiled: no CUDA device, no Triton or too little free device memory")
        except Exception as e:  # noqa: BLE001  (a model transformers cannot build from its config alone, say)
            outcome = f"not compiled: {type(e).__name__}: {e}"
        # tried: later runs start none (another try would end the same way; what is missing compiles in the run)
        p.stamp.write_text(f"{args.model}\n{outcome}\n")
    return 0


def compile_skeleton(model_dir: str | os.PathLike[str], dtype: str, device: str) -> int:
    """Compile the kernel variants of the model in ``model_dir`` on ``device`` from its config alone; the number
    of launches that failed (``-1``: nothing could be tried: no CUDA, no Triton, too little free memory).

    Args:
        model_dir: a transformers model directory (its ``config.json`` is read, no weights).
        dtype: ``auto`` or a pmaccel dtype name.
        device: a CUDA device.

    Example:
        >>> compile_skeleton("models/qwen", "auto", "cuda")  # doctest: +SKIP
        0
    """
    import glob
    import threading

    import torch

    from pmaccel import invariant
    from pmaccel.model import resolve_dtype

    dev = torch.device(device)
    if dev.type != "cuda" or not invariant.available():
        return -1
    weights = sum(os.path.getsize(f) for f in glob.glob(os.path.join(model_dir, "*.safetensors")))
    if torch.cuda.mem_get_info(dev)[0] < weights + ROOM_BYTES:
        return -1  # the run's weights come first
    # Triton's key and driver (file hashing, a C compiler's run) while transformers imports
    ready = threading.Thread(target=invariant.prepare_triton, args=(dev,), name="pmaccel-prepare-triton")
    ready.start()
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype, dev))
    for m in model.modules():  # the norms' weights on the device (ones, as they start): their checks run them
        if not isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            for name, param in list(m.named_parameters(recurse=False)):
                setattr(m, name, torch.nn.Parameter(torch.ones_like(param, device=dev), requires_grad=False))
    ready.join()
    future = invariant.compile_ahead(model, device=dev)
    return -1 if future is None else future.result()


def _model_dir(base_model: str | None) -> Path | None:
    if base_model is None:
        from pmaccel.embedded import EMBEDDED_MODEL_NAME, cache_root

        path = cache_root() / EMBEDDED_MODEL_NAME
    else:
        path = Path(base_model).expanduser()
        if not path.exists():
            path = _cached_snapshot(base_model) or path
    return path if (path / "config.json").is_file() else None


def _cached_snapshot(model_id: str) -> Path | None:
    """The directory of ``model_id``'s snapshot in the local hub cache (the one transformers loads offline), found
    without the network; ``None`` where its ``config.json`` is not cached."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_id, "config.json")
    except Exception:  # noqa: BLE001  (no model id, say a path that does not exist: the run reports that)
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def _triton_cache_dir() -> Path:
    """Triton's on-disk kernel cache: ``TRITON_CACHE_DIR``, else ``.triton/cache`` under ``TRITON_HOME`` or
    the home directory (as Triton finds it)."""
    explicit = os.environ.get("TRITON_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get("TRITON_HOME") or Path.home()).expanduser() / ".triton" / "cache"


def _installed(package: str) -> str:
    """Where ``package`` is installed and when its entry file last changed (an upgrade changes it), found
    without importing it; ``""`` where it is not."""
    try:
        spec = importlib.util.find_spec(package)
        stat = os.stat(spec.origin)
    except (ImportError, ValueError, TypeError, AttributeError, OSError):
        return ""
    return f"{spec.origin}:{stat.st_size}:{stat.st_mtime_ns}"


def _gpu_node() -> bool:
    """Whether this machine shows a GPU to the process (an NVIDIA or AMD device node, not hidden by
    ``CUDA_VISIBLE_DEVICES``), found without importing torch."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    try:
        nodes = os.listdir("/dev")
    except OSError:
        return False
    return "kfd" in nodes or any(name[6:].isdigit() for name in nodes if name.startswith("nvidia"))


if __name__ == "__main__":
    sys.exit(main())
