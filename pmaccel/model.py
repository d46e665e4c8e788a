"""Loading a model for parallel decoding: base weights, optional LoRA, optional 2D RoPE (SPEC §4, §6, §10).

Foreign formats (GGUF, ParallelMind LoRA, PEFT) are adapted here, at the loading boundary; the
decoder only ever sees a transformers causal LM, patched or not.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pmaccel.errors import PMAccelError
from pmaccel.settings import default

DEFAULT_DTYPE, DEFAULT_DEVICE = default("dtype"), default("device")  # "auto": resolved per device

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def text_config(model: Any) -> Any:
    """The config of ``model``'s language model (its text config where the model has several)."""
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def resolve_device(device: str | torch.device = DEFAULT_DEVICE) -> torch.device:
    """``"auto"``: the first CUDA device if there is one, else the CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise PMAccelError(f"unknown device {device!r} ({e})", field="device") from None


def resolve_dtype(dtype: str | torch.dtype = DEFAULT_DTYPE, device: torch.device | None = None) -> torch.dtype:
    """``"auto"``: bfloat16 on CUDA, float32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise PMAccelError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}", field="dtype")
    return DTYPES[dtype]


def _looks_local(name: str) -> bool:
    # hub ids are "name" or "org/name"; anything else that does not exist is a missing local path
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def check_model_path(base_model: str | os.PathLike) -> Path:
    """``base_model`` as a path; a GGUF file or a local-looking directory that is missing is an error
    (checked before anything loads). A model id passes."""
    path = Path(base_model).expanduser()
    if path.suffix == ".gguf" and not path.is_file():
        raise PMAccelError(f"GGUF file {path} not found; pass an existing file", field="base_model")
    if not path.exists() and _looks_local(str(base_model)):
        raise PMAccelError(
            f"model directory {base_model} not found; pass a local directory or a model id", field="base_model"
        )
    return path


def check_hub_reachable(model_id: str, timeout: float = 3.0) -> None:
    """Fail at once, with the fix, when ``model_id`` is neither cached nor reachable (no network):
    transformers would otherwise retry for about a minute before failing."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE:
        return  # transformers reads the local cache alone and fails fast by itself
    cached = try_to_load_from_cache(model_id, "config.json")
    if isinstance(cached, str):
        return
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
    except OSError:
        raise PMAccelError(
            f"model {model_id!r} is not a local directory, not in the local cache, and {url.hostname} cannot be "
            "reached; pass a local model directory, or download it first (HF_HUB_OFFLINE=1 uses the cache alone)",
            field="base_model",
        ) from None


def _or_embedded(base_model: str | os.PathLike | None) -> str | os.PathLike:
    """``base_model``, or for ``None`` the embedded model's directory (converted once, then cached)."""
    if base_model is not None:
        return base_model
    from pmaccel.embedded import embedded_model_dir

    return embedded_model_dir()


def _source(base_model: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """What ``from_pretrained`` takes for ``base_model``: the name (a local directory or a model id) and, for a
    GGUF file, ``gguf_file`` (transformers dequantizes it; needs the gguf package)."""
    path = check_model_path(base_model)
    kwargs: dict[str, Any] = {}
    if path.suffix == ".gguf":
        kwargs["gguf_file"] = path.name
        path = path.parent
    name = str(path) if path.exists() else str(base_model)
    if not path.exists():
        check_hub_reachable(name)
    return name, kwargs


@contextlib.contextmanager
def _loading(base_model: str | os.PathLike) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PMAccelError(f"cannot load model {base_model!r}: {first}", field="base_model") from None


def load_tokenizer(base_model: str | os.PathLike | None = None) -> Any:
    """The tokenizer ``load_model`` returns for ``base_model``, without loading the weights.

    Args:
        base_model: as for ``load_model``; ``None`` = the embedded SmolLM2-135M-Instruct.

    Returns:
        The tokenizer, with the eos token as its pad token where it has none.

    Example:
        >>> tokenizer = load_tokenizer("Qwen/Qwen2.5-0.5B")  # doctest: +SKIP
        >>> model, tokenizer = load_model("Qwen/Qwen2.5-0.5B", tokenizer=tokenizer)  # doctest: +SKIP
    """
    from transformers import AutoTokenizer

    base_model = _or_embedded(base_model)
    name, kwargs = _source(base_model)
    with _loading(base_model):
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_config(base_model: str | os.PathLike | None = None) -> Any:
    """``base_model``'s transformers config, read alone (no weights are loaded)."""
    from transformers import AutoConfig

    base_model = _or_embedded(base_model)
    name, kwargs = _source(base_model)
    with _loading(base_model):
        return AutoConfig.from_pretrained(name, **kwargs)


def vocab_size(config: Any) -> int:
    """The rows of the input embedding of a model built from ``config`` (token ids below it are the model's)."""
    return int((config.get_text_config() if hasattr(config, "get_text_config") else config).vocab_size)


def load_model(
    base_model: str | os.PathLike | None = None,
    *,
    lora_path: str | os.PathLike | None = None,
    lora_rank: int | None = None,
    rope_2d_ratio: float = default("rope_2d_ratio"),
    patch_rope: bool | None = None,
    dtype: str | torch.dtype = DEFAULT_DTYPE,
    device: str | torch.device = DEFAULT_DEVICE,
    merge_lora: bool = True,
    attn_implementation: str = "sdpa",
    tokenizer: Any = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, ready for ``pmaccel.generate``.

    Args:
        base_model: a local directory, a GGUF file, or a model id; ``None`` = the embedded
            SmolLM2-135M-Instruct (converted from its GGUF once, then cached).
        lora_path: a ParallelMind LoRA file (``.pth``/``.safetensors``) or a PEFT adapter directory.
        lora_rank: if given, must agree with the rank read from the file.
        rope_2d_ratio: the fraction of rotary frequency pairs given to (branch, time) in 2D RoPE.
        patch_rope: apply 2D RoPE; ``None`` = on when a LoRA is given.
        dtype: ``"auto"`` (bf16 on CUDA, fp32 on CPU), a name such as ``"bf16"``, or a torch dtype.
        device: ``"auto"``, ``"cpu"``, ``"cuda:1"``, ... or a torch device.
        merge_lora: merge the adapter into the base weights (same logits, faster).
        attn_implementation: ``"sdpa"`` or ``"eager"`` (both take the packed 4D mask).
        tokenizer: this model's, from ``load_tokenizer`` (it is not loaded again); default: loaded here.

    Returns:
        ``(model, tokenizer)``, the model in eval mode on ``device``.

    Example:
        >>> model, tokenizer = load_model()  # doctest: +SKIP
        >>> model, tokenizer = load_model("Qwen/Qwen2.5-0.5B", lora_path="pm_lora.pth")  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM

    from pmaccel.lora import apply_lora
    from pmaccel.rope import patch_rope as apply_rope_2d

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    base_model = _or_embedded(base_model)
    if tokenizer is None:
        tokenizer = load_tokenizer(base_model)
    name, kwargs = _source(base_model)
    if dev.type == "cuda" and "gguf_file" not in kwargs:
        kwargs["device_map"] = dev  # weights go straight to the GPU, not through host memory first
    with _loading(base_model):
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, attn_implementation=attn_implementation,
                                                     **kwargs)
    if lora_path is not None:
        model = apply_lora(model, lora_path, lora_rank=lora_rank, merge=merge_lora)
    elif lora_rank is not None:
        raise PMAccelError("lora_rank was given without lora_path", field="lora_rank")
    if patch_rope is None:
        patch_rope = lora_path is not None
    if patch_rope:
        apply_rope_2d(model, rope_2d_ratio)
    model.to(dev).eval().requires_grad_(False)
    return model, tokenizer
