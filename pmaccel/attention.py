"""Where attention actually goes: the mass each branch puts on main, on itself and on the other branches.

The columnar mask (SPEC §3) lets a branch see the earlier tokens of *every* branch; this module
measures how much the model uses that. One forward over a sample's final packed sequence (prompt
+ generated tokens, ``pmaccel.layout.append_outputs``) with the same mask and positions as decoding,
eager attention, ``output_attentions=True``; then, per layer::

    P      [H, N, N]   attention probabilities (a query's row sums to 1)
    p      [N, N]      averaged over heads
    onto   [N, G]      p summed over the keys of each group        (G = main? + branches)
    M      [G, G]      onto averaged over the queries of each group

Row g of ``M`` is the average attention distribution of group g's tokens over the groups; it sums
to 1. A token's attention to itself counts toward its own group (the diagonal). Under the isolated
mask a branch's row is exactly 0 outside main and itself; main's row is ``[1, 0, ..., 0]`` under
both masks (main tokens come before every branch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from pmaccel.errors import PMAccelError
from pmaccel.layout import MASKS, PackedSample, TokenMeta, additive_mask, allowed, stack_positions
from pmaccel.rope import is_rope_2d


@dataclass
class GroupAttention:
    """Attention mass between the groups (main, then each branch) of one sample.

    Attributes:
        per_layer: [L, G, G]; ``per_layer[l, g, h]`` = the mean, over the tokens of group g, of the
            attention (averaged over heads) they put on the tokens of group h in layer l.
        branch_ids: the branch id of each group (main is 0 when present).
        labels: ``"main"``, ``"branch 1"``, ... (the given branches are numbered from 1).
        has_main: whether group 0 is main.
        mask: the mask of the forward.
    """

    per_layer: torch.Tensor
    branch_ids: list[int]
    labels: list[str]
    has_main: bool
    mask: str

    @property
    def num_layers(self) -> int:
        return int(self.per_layer.shape[0])

    def matrix(self, layer: int | None = None) -> torch.Tensor:
        """[G, G] for one layer, or averaged over the layers when ``layer`` is None (rows still sum to 1)."""
        if layer is None:
            return self.per_layer.mean(dim=0)
        if not -self.num_layers <= layer < self.num_layers:
            raise PMAccelError(f"layer must be in 0..{self.num_layers - 1}, got {layer}", field="layer")
        return self.per_layer[layer]


def token_groups(packed: PackedSample) -> tuple[torch.Tensor, list[int]]:
    """The group index of every token ([N], main = 0 when present) and the branch id of every group."""
    group_ids = sorted(set(packed.branch.tolist()))
    index = {b: g for g, b in enumerate(group_ids)}
    return torch.tensor([index[b] for b in packed.branch.tolist()], dtype=torch.long), group_ids


def sample_mask(packed: PackedSample, mask: str) -> torch.Tensor:
    """Which tokens each token may attend to, [N, N] bool (query rows, key columns), in packed order."""
    meta = _meta(packed)
    n = packed.num_tokens
    return allowed(meta, meta, torch.arange(n)[None], mask)[0]


def group_attention(
    model: Any,
    packed: PackedSample,
    *,
    mask: str | None = None,
    rope_2d: bool | None = None,
) -> GroupAttention:
    """Measure the attention mass between main and the branches of one sample (one forward, no cache).

    The model runs with eager attention for this call (sdpa and flash kernels do not return
    probabilities); its attention implementation is restored afterwards.

    Args:
        model: a causal LM from ``pmaccel.load_model`` (patched for 2D RoPE or not).
        packed: the final packed sequence, ``append_outputs(pack_sample(ts, ...), output_ids)``
            (the prompt alone works too).
        mask: ``"columnar"`` or ``"isolated"``; default columnar with 2D RoPE, isolated without.
        rope_2d: positions as (pos1d, bpos, time); default: whether the model was patched.

    Returns:
        A ``GroupAttention``; ``.matrix(layer)`` is the [G, G] heatmap, rows summing to 1.

    Example:
        >>> ts = tokenize_sample({"main": "Q:", "branches": ["a", "b"]}, tokenizer)  # doctest: +SKIP
        >>> packed = append_outputs(pack_sample(ts), result["output_ids"])  # doctest: +SKIP
        >>> group_attention(model, packed, mask="columnar").matrix()  # doctest: +SKIP
        tensor([[1.0000, 0.0000, 0.0000], [0.7000, 0.2600, 0.0400], [0.6800, 0.0300, 0.2900]])
    """
    rope_2d = is_rope_2d(model) if rope_2d is None else rope_2d
    mask = mask or ("columnar" if rope_2d else "isolated")
    if mask not in MASKS:
        raise PMAccelError(f"unknown mask {mask!r}; use one of {', '.join(MASKS)}", field="mask")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    n = packed.num_tokens
    meta = _meta(packed)
    attn_mask = additive_mask(allowed(meta, meta, torch.arange(n)[None], mask), dtype)  # [1, 1, N, N]
    positions = stack_positions(packed.pos1d, packed.bpos, packed.time, rope_2d)[None]  # [1, N(, 3)]

    with _eager_attention(model), torch.inference_mode():
        out = model(
            input_ids=packed.input_ids[None].to(device),
            attention_mask=attn_mask.to(device),
            position_ids=positions.to(device),
            output_attentions=True,
            use_cache=False,
            logits_to_keep=1,  # the logits are not needed
        )
    if not out.attentions or any(a is None for a in out.attentions):
        raise PMAccelError(f"{type(model).__name__} returned no attention probabilities", field="model")

    groups, branch_ids = token_groups(packed)
    onehot = torch.nn.functional.one_hot(groups, len(branch_ids)).float()  # [N, G]
    counts = onehot.sum(dim=0)  # [G]
    per_layer = []
    for probs in out.attentions:  # [1, H, N, N] per layer
        p = probs[0].float().mean(dim=0).cpu()  # [N, N]
        onto = p @ onehot  # [N, G]: each query's mass on each group
        per_layer.append((onehot.T @ onto) / counts[:, None])  # [G, G]
    has_main = bool(packed.is_main.any())
    labels = ["main" if has_main and g == 0 else f"branch {g + (0 if has_main else 1)}" for g in range(len(branch_ids))]
    return GroupAttention(torch.stack(per_layer), branch_ids, labels, has_main, mask)


def _meta(packed: PackedSample) -> TokenMeta:  # [1, N] each
    return TokenMeta(time=packed.time[None], branch=packed.branch[None], is_main=packed.is_main[None],
                     valid=torch.ones(1, packed.num_tokens, dtype=torch.bool))


@contextlib.contextmanager
def _eager_attention(model: Any) -> Iterator[None]:
    """Switch the model to eager attention for the block, then back (PEFT wrappers are looked through)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = getattr(base.config, "_attn_implementation", None)
    if before in (None, "eager"):
        yield
        return
    try:
        base.set_attn_implementation("eager")
    except (ValueError, AttributeError) as e:
        raise PMAccelError(f"cannot switch {type(base).__name__} to eager attention ({e}); load the model "
                           "with attn_implementation='eager'", field="attn_implementation") from None
    try:
        yield
    finally:
        base.set_attn_implementation(before)
