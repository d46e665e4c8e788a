"""KV memory of the engine: a fixed number of key slots per row, written where the step says, and
the attention over it without copying K/V once per query head.

A row of the pool holds one sample::

    slot  0 .. n-1                       the packed prompt (pos1d order)
          n + k*G .. n + k*G + G-1       branch k's generated tokens (G = max_new_tokens)
          S-1                            scratch: lanes that do not go on write here (never valid)

so where a token lives depends only on its own sample, never on the other rows or on the lane that
runs the branch.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from pmaccel.invariant import slot_write
from pmaccel.model import text_config

GROUPED_SDPA = "pmaccel_grouped_sdpa"
# Folded attention kernel: two GEMMs and a softmax ("matmul") beat torch's fused kernels ("sdpa") on
# small decode steps and lose on large ones (H200, Qwen2.5-0.5B shape: docs/PERFORMANCE.md).
MATMUL_ROWS = 2048  # matmul up to this many folded query rows (B * H * Q)


def grouped_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """SDPA with a packed mask, without repeating K/V for every query head.

    transformers' sdpa path copies K/V once per query head when a mask is given (GQA with a mask falls
    back to the math kernel). Here the G query heads that share a KV head are folded into the query
    length instead: query [B, H, Q, D] -> [B, H_kv, G*Q, D]; mask [B, 1, Q, S] -> [B, 1, G*Q, S].
    """
    b, h, q_len, d = query.shape
    h_kv = key.shape[1]
    g = h // h_kv
    if g == 1 or attention_mask is None or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    q = query.reshape(b, h_kv, g * q_len, d)
    # folded once per forward by the caller (``fold_mask``), else here for every layer
    mask = attention_mask if attention_mask.shape[2] == g * q_len else fold_mask(attention_mask, g)
    if b * h * q_len > MATMUL_ROWS:
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)  # [B, H_kv, G*Q, Dv]
    else:
        scale = d**-0.5 if scaling is None else scaling
        scores = torch.matmul(q, key.transpose(-1, -2)) * scale + mask  # [B, H_kv, G*Q, S]
        out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype), value)
    return out.reshape(b, h, q_len, -1).transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_SDPA, grouped_sdpa)


def fold_mask(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, 1, Q, S] -> [B, 1, G*Q, S]: the mask of the folded queries (``grouped_sdpa``)."""
    b, _, q_len, s = mask.shape
    return mask[:, :, None].expand(b, 1, groups, q_len, s).reshape(b, 1, groups * q_len, s)


def mask_groups(model: Any) -> int:
    """How many query heads share a KV head when ``model`` runs ``grouped_sdpa`` (the mask can then be
    folded once per forward); 1 otherwise."""
    cfg = text_config(model)
    if cfg._attn_implementation != GROUPED_SDPA or getattr(cfg, "attn_logit_softcapping", None) is not None:
        return 1
    return cfg.num_attention_heads // (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)


@contextlib.contextmanager
def grouped_attention(model: Any):
    """Run ``model`` with ``grouped_sdpa`` where it uses sdpa (the same attention, computed leaner)."""
    before = model.config._attn_implementation
    if before != "sdpa":
        yield
        return
    model.set_attn_implementation(GROUPED_SDPA)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def kv_bytes_per_slot(model: Any) -> int:
    """Bytes of K and V for one token over all layers (from the config; sizes the pool)."""
    cfg = text_config(model)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    itemsize = next(model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * itemsize


class SlotCache:
    """K/V of R rows x S slots per layer, for transformers' attention layers.

    Duck-types the part of transformers' ``Cache`` that attention layers use (``update``). Before a
    forward the caller says where its tokens go:

    - ``decode(rows, slots)``: the step's batch row j (its lanes, [n, C]) belongs to the sample of
      KV row ``rows[j]``, its queries go to ``slots`` [n, C]; attention runs over that row's S slots (the
      mask decides what is seen). ``in_place=True``: the attention reads the rows in the KV memory itself
      (``invariant.ROWS_KWARG``), so the whole memory is returned; ``rows`` 0..n-1 in order
      (``in_order=True``): a view of them; else a copy of the n rows;
    - ``prefill(rows, length)``: the prompts of ``rows`` [B] go to slots ``0..length-1``; a prompt
      attends only to itself, so attention runs over the new keys alone.
    """

    def __init__(self, rows: int, max_slots: int):
        self.rows, self.max_slots = rows, max_slots
        self.keys: list[torch.Tensor] = []  # per layer [R, H_kv, S, D]
        self.values: list[torch.Tensor] = []
        self._target: tuple[str, torch.Tensor, torch.Tensor] | None = None
        self._read: torch.Tensor | None = None  # the KV rows a decode step's attention reads (None: all, in place)

    def decode(self, rows: torch.Tensor, slots: torch.Tensor, in_place: bool = False, in_order: bool = False) -> None:
        self._target = ("decode", rows[:, None].expand_as(slots), slots)
        self._read = None if in_place else slice(0, len(rows)) if in_order else rows

    def prefill(self, rows: torch.Tensor, length: int) -> None:
        slots = torch.arange(length, device=rows.device)[None, :].expand(rows.shape[0], length)  # [B, N]
        self._target = ("prefill", rows[:, None].expand_as(slots), slots)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key_states: [B, H_kv, Q, D]
        if layer_idx == len(self.keys):  # allocated on first use
            _, h, _, d = key_states.shape
            self.keys.append(key_states.new_zeros(self.rows, h, self.max_slots, d))
            self.values.append(value_states.new_zeros(self.rows, h, self.max_slots, value_states.shape[-1]))
        assert self._target is not None, "SlotCache: decode() or prefill() before the forward"
        kind, rows, slots = self._target
        # on CUDA one kernel writes both; else advanced indices on dims 0 and 2 (the indexed view is [B, Q, H_kv, D])
        if not (key_states.is_cuda and slot_write(key_states, value_states, self.keys[layer_idx],
                                                  self.values[layer_idx], rows, slots)):
            self.keys[layer_idx][rows, :, slots] = key_states.transpose(1, 2)
            self.values[layer_idx][rows, :, slots] = value_states.transpose(1, 2)
        if kind == "prefill":
            return key_states, value_states
        if self._read is None:
            return self.keys[layer_idx], self.values[layer_idx]
        return self.keys[layer_idx][self._read], self.values[layer_idx][self._read]

    def move_rows(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Rows ``src`` to rows ``dst`` (any order: the sources are read first)."""
        for t in (*self.keys, *self.values):
            t.index_copy_(0, dst, t.index_select(0, src))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always given explicitly

    def __len__(self) -> int:
        return len(self.keys)
