"""LoRA adapters: ParallelMind checkpoints (one file) and PEFT adapter directories.

ParallelMind format: a ``.pth``/``.pt``/``.bin`` (``torch.load``) or ``.safetensors`` file holding, for
EVERY square ``nn.Linear`` of the model (``in_features == out_features``)::

    "{module_name}.lora.A.weight": [r, in]
    "{module_name}.lora.B.weight": [out, r]

and the adapted output is ``W x + B(A(x))`` (no alpha / scaling). ``module_name`` is the name in
``model.named_modules()`` of the model as loaded by ``AutoModelForCausalLM``.

PEFT format: a directory with ``adapter_config.json`` and the adapter weights, loaded through
``peft.PeftModel.from_pretrained`` (peft is imported only then).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from pmaccel.errors import PMAccelError

_A, _B = ".lora.A.weight", ".lora.B.weight"
_TORCH_EXTS = (".pth", ".pt", ".bin")
_NESTED_KEYS = ("state_dict", "model", "module")


class LoRALinear(nn.Module):
    """``base(x) + lora_B(lora_A(x))``: an unmerged adapter around a (square) ``nn.Linear``."""

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor):
        super().__init__()
        r = A.shape[0]
        self.base = base
        w = base.weight
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.lora_A.weight.copy_(A)  # A: [r, in]
            self.lora_B.weight.copy_(B)  # B: [out, r]

    # Some model code reads these off its projections; delegate to the wrapped linear.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., r] -> [..., out]
        return self.base(x) + self.lora_B(self.lora_A(x))


def check_lora_path(path: str | os.PathLike) -> Path:
    """The adapter's path, if it is a file or a PEFT adapter directory (checked before any model loads)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise PMAccelError(
            f"LoRA file not found: {str(p)!r} (pass a ParallelMind .pth/.pt/.bin/.safetensors file "
            "or a PEFT adapter directory containing adapter_config.json)", field="lora_path"
        )
    if p.is_dir():
        if not (p / "adapter_config.json").is_file():
            raise PMAccelError(
                "directory has no adapter_config.json, so it is not a PEFT adapter "
                "(pass a PEFT adapter directory or a ParallelMind .pth/.safetensors file)",
                file=str(p),
            )
    elif p.suffix.lower() not in (*_TORCH_EXTS, ".safetensors"):
        raise PMAccelError(
            f"unsupported LoRA file type {p.suffix!r} (expected .pth, .pt, .bin, .safetensors "
            "or a PEFT adapter directory)",
            file=str(p),
        )
    return p


def load_lora_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ParallelMind LoRA file: ``{"<module>.lora.A.weight": [r, in], ...}`` on CPU.

    A top-level ``{"state_dict": {...}}`` / ``{"model": {...}}`` nesting is unwrapped and a ``module.``
    prefix (DDP checkpoints) is stripped when every key has it. Keys are not checked against a model.

    Raises:
        PMAccelError: the file is missing, of an unknown type, unreadable, or holds non-tensor values.
    """
    p = check_lora_path(path)
    if p.is_dir():
        raise PMAccelError("is a PEFT adapter directory, not a ParallelMind LoRA file", file=str(p))
    try:
        if p.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p), device="cpu")
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickle with disallowed globals, ...
        raise PMAccelError(f"cannot read LoRA file: {type(e).__name__}: {e}", file=str(p)) from e
    if isinstance(state, dict) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        for k in _NESTED_KEYS:
            if isinstance(state.get(k), dict):
                state = state[k]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PMAccelError("expected a dict of tensors {name: tensor} (a state dict)", file=str(p))
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _peft_rank(p: Path) -> int:
    try:
        return int(json.loads((p / "adapter_config.json").read_text())["r"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PMAccelError(f"cannot read 'r' from adapter_config.json: {e}", file=str(p)) from e


def _file_rank(state: dict[str, torch.Tensor], file: str) -> int:
    """The common rank r of all A tensors (their first dim)."""
    As = {k: v for k, v in state.items() if k.endswith(_A)}
    if not As:
        raise PMAccelError(f"no '<module>{_A}' tensor in the file (not a ParallelMind LoRA file?)", file=file)
    for k, v in As.items():
        if v.dim() != 2:
            raise PMAccelError(f"{k}: expected shape [r, in], got {list(v.shape)}", file=file)
    (k0, A0), *rest = As.items()
    r = A0.shape[0]
    for k, A in rest:
        if A.shape[0] != r:
            raise PMAccelError(
                f"LoRA ranks differ: {k0} has shape {list(A0.shape)} (r={r}) but {k} has shape "
                f"{list(A.shape)} (r={A.shape[0]}); all adapters must share one rank",
                file=file,
            )
    if r < 1:
        raise PMAccelError(f"LoRA rank must be >= 1, got r={r} ({k0})", file=file)
    return r


def lora_rank_of(path: str | os.PathLike) -> int:
    """The LoRA rank r of a ParallelMind file (A tensors' first dim) or PEFT directory (config ``r``)."""
    p = check_lora_path(path)
    return _peft_rank(p) if p.is_dir() else _file_rank(load_lora_state(p), str(p))


def _square_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {
        n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.in_features == m.out_features
    }


def _check_keys(state: dict[str, torch.Tensor], targets: dict[str, nn.Linear], file: str) -> None:
    """Every key must belong to a square Linear of the model, and every square Linear needs A and B."""
    for k in state:
        name = k[: -len(_A)] if k.endswith((_A, _B)) else None
        if name not in targets:
            example = next(iter(targets), "model.layers.0.self_attn.q_proj")
            raise PMAccelError(
                f"unexpected key {k!r}: not '<module>{_A}' or '<module>{_B}' of a square nn.Linear "
                f"of the model (e.g. {example!r})",
                file=file,
            )
    missing = [n + s for n in targets for s in (_A, _B) if n + s not in state]
    if missing:
        lin = targets[missing[0][: -len(_A)]]
        raise PMAccelError(
            f"missing key {missing[0]!r} for square Linear [{lin.out_features}, {lin.in_features}]; "
            f"{len(missing)} of {2 * len(targets)} adapter keys missing in total "
            "(the adapter must cover every square nn.Linear of the model)",
            file=file,
        )


def _check_shapes(state: dict[str, torch.Tensor], targets: dict[str, nn.Linear], r: int, file: str) -> None:
    for name, lin in targets.items():
        for key, want in ((_A, (r, lin.in_features)), (_B, (lin.out_features, r))):
            got = tuple(state[name + key].shape)
            if got != want:
                raise PMAccelError(
                    f"{name}{key}: expected shape {list(want)}, got {list(got)} "
                    f"(Linear [{lin.out_features}, {lin.in_features}], r={r})",
                    file=file,
                )


def _apply_peft(model: nn.Module, p: Path, lora_rank: int | None, merge: bool) -> nn.Module:
    r = _peft_rank(p)
    if lora_rank is not None and lora_rank != r:
        raise PMAccelError(f"lora_rank={lora_rank} but the adapter has r={r}", file=str(p), field="lora_rank")
    try:
        from peft import PeftModel
    except ImportError as e:
        raise PMAccelError(
            "loading a PEFT adapter directory needs peft: pip install peft", file=str(p)
        ) from e
    peft_model = PeftModel.from_pretrained(model, str(p))
    peft_model.eval()
    return peft_model.merge_and_unload() if merge else peft_model


def apply_lora(
    model: nn.Module, path: str | os.PathLike, *, lora_rank: int | None = None, merge: bool = True
) -> nn.Module:
    """Apply a LoRA adapter (ParallelMind file or PEFT directory) to ``model``.

    Args:
        model: a causal LM as loaded by ``AutoModelForCausalLM`` (its module names must match the file).
        path: a ParallelMind ``.pth``/``.pt``/``.bin``/``.safetensors`` file with
            ``"<module>.lora.A.weight"`` [r, in] and ``"<module>.lora.B.weight"`` [out, r] for every
            square ``nn.Linear``, or a PEFT adapter directory (``adapter_config.json`` + weights).
        lora_rank: expected rank; if given it must equal the file's rank (the rank is read from the file).
        merge: True folds the adapter into the weights (``W += B @ A``; PEFT: ``merge_and_unload``);
            False keeps it separate (``LoRALinear`` modules; PEFT: the ``PeftModel``).

    Returns:
        The adapted model. ParallelMind: ``model`` itself, modified in place. PEFT: the merged base model
        (``merge=True``) or a ``PeftModel`` wrapping ``model`` (``merge=False``); ``model`` is modified.

    Raises:
        PMAccelError: missing path, unknown file type, missing/unexpected keys, mis-shaped tensors,
            ranks differing between modules or from ``lora_rank``, or peft not installed.

    Example:
        >>> model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M")
        >>> model = apply_lora(model, "parallelmind_lora.pth", merge=True)
    """
    p = check_lora_path(path)
    if p.is_dir():
        return _apply_peft(model, p, lora_rank, merge)
    file = str(p)
    state = load_lora_state(p)
    targets = _square_linears(model)
    _check_keys(state, targets, file)
    r = _file_rank(state, file)
    if lora_rank is not None and lora_rank != r:
        raise PMAccelError(f"lora_rank={lora_rank} but the file has rank r={r}", file=file, field="lora_rank")
    _check_shapes(state, targets, r, file)
    with torch.no_grad():
        for name, lin in targets.items():
            A, B = state[name + _A], state[name + _B]  # A: [r, in], B: [out, r]
            w = lin.weight  # W: [out, in]
            if merge:
                delta = B.to(w.device, torch.float32) @ A.to(w.device, torch.float32)  # [out, r] @ [r, in]
                w.copy_((w.float() + delta).to(w.dtype))
            else:
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name)
                setattr(parent, child, LoRALinear(lin, A, B))
    return model
