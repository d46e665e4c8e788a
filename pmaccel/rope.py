"""2D RoPE (SPEC §4), bit-compatible with ParallelMind checkpoints.

The model's own rotary module is wrapped, not rewritten: its ``inv_freq`` (length F, any rope
scaling already applied) and ``attention_scaling`` are reused. Of the F frequency pairs the last
``n = clamp(round(F * ratio), 1, F)`` (the lowest frequencies) are *selected*; the m-th selected
pair turns with the branch position ``bpos`` when m is even and with ``time`` when m is odd; every
other pair turns with ``pos1d``::

    pair j:   0 ........ F-n-1 | F-n   F-n+1  F-n+2  ...
    angle:    inv_freq * pos1d | *bpos  *time  *bpos  ...

Positions travel with every forward as ``position_ids`` of shape [B, T, 3] = (pos1d, bpos, time),
so no state survives from one call to the next. A plain [B, T] ``position_ids`` is handed to the
original module unchanged (ordinary RoPE).
"""

from __future__ import annotations

import torch
from torch import nn

from pmaccel.errors import PMAccelError
from pmaccel.settings import default

POS1D, BPOS, TIME = 0, 1, 2  # columns of the [B, T, 3] position_ids


def selected_pairs(num_pairs: int, ratio: float) -> int:
    """``n = clamp(round(F * ratio), 1, F)``: how many of the F pairs carry (bpos, time)."""
    return min(max(round(num_pairs * ratio), 1), num_pairs)


def pair_sources(num_pairs: int, ratio: float) -> torch.Tensor:
    """For each frequency pair, which column of position_ids drives it: [F] of POS1D/BPOS/TIME."""
    n = selected_pairs(num_pairs, ratio)
    src = torch.full((num_pairs,), POS1D, dtype=torch.long)
    m = torch.arange(n)
    src[num_pairs - n :] = torch.where(m % 2 == 0, BPOS, TIME)
    return src


class Rope2D(nn.Module):
    """Wraps a transformers rotary-embedding module (``forward(x, position_ids) -> (cos, sin)``)."""

    def __init__(self, rotary: nn.Module, ratio: float):
        super().__init__()
        if not 0.0 < ratio <= 1.0:
            raise PMAccelError(f"rope_2d_ratio must be in (0, 1], got {ratio}", field="rope_2d_ratio")
        self.rotary = rotary
        self.ratio = ratio
        sources = pair_sources(rotary.inv_freq.numel(), ratio).to(rotary.inv_freq.device)
        self.register_buffer("sources", sources, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if position_ids.dim() == 2:  # plain positions: the model's own RoPE
            return self.rotary(x, position_ids)
        # position_ids: [B, T, 3] -> per-pair positions [B, T, F]
        pos = position_ids[..., self.sources]
        inv_freq = self.rotary.inv_freq.to(device=x.device, dtype=torch.float)
        with torch.autocast(device_type=x.device.type, enabled=False):
            freqs = pos.float() * inv_freq  # [B, T, F]
            emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, 2F]
            scale = getattr(self.rotary, "attention_scaling", 1.0)
            cos, sin = emb.cos() * scale, emb.sin() * scale
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def _rotary_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(getattr(m, "inv_freq", None), torch.Tensor) and not isinstance(m, Rope2D)
    ]


def patch_rope(model: nn.Module, ratio: float = default("rope_2d_ratio")) -> list[str]:
    """Replace every rotary module of ``model`` by a ``Rope2D`` wrapper, in place.

    Args:
        model: a transformers causal LM (possibly wrapped by peft).
        ratio: ``rope_2d_ratio``, the fraction of frequency pairs given to (bpos, time).

    Returns:
        The names of the patched modules.

    Raises:
        PMAccelError: the model has no rotary module.

    Example:
        >>> patch_rope(model, 0.5)  # doctest: +SKIP
        ['model.rotary_emb']
    """
    if is_rope_2d(model):
        raise PMAccelError("2D RoPE is already applied to this model", field="patch_rope")
    found = _rotary_modules(model)
    if not found:
        raise PMAccelError(
            f"{type(model).__name__} has no rotary position embedding, so 2D RoPE cannot be applied; "
            "run with patch_rope=False (--no_patch_rope)",
            field="patch_rope",
        )
    for name, module in found:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Rope2D(module, ratio))
    return [name for name, _ in found]


def is_rope_2d(model: nn.Module) -> bool:
    """Whether ``patch_rope`` was applied to ``model``."""
    return any(isinstance(m, Rope2D) for m in model.modules())
