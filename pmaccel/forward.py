"""One model call over packed tokens: positions and the packed mask go with every forward.

Used by the decode engine (``engine.py``), scoring and the attention views.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from pmaccel.invariant import KEYS_KWARG, ROWS_KWARG, is_invariant, key_lists, output_into
from pmaccel.layout import TokenMeta, additive_mask, allowed
from pmaccel.slots import fold_mask, mask_groups


def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the model


@functools.cache
def _cache_name(model_type: type) -> str:
    # transformers renamed `past_key_values` to `cache`; use whichever this version's forward takes
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"


@dataclass(frozen=True)
class ModelCall:
    """``model`` with the packed mask of one kind; resolved once, called every step."""

    model: Any
    mask: str  # "columnar" or "isolated"
    dtype: torch.dtype
    cache_name: str

    @classmethod
    def of(cls, model: Any, mask: str) -> ModelCall:
        dtype = next(model.parameters()).dtype
        return cls(model, mask, dtype, _cache_name(type(_base(model))))

    def __call__(self, input_ids, positions, query: TokenMeta, keys: TokenMeta, query_slot, cache, keep=None,
                 select=None, into=None, kv_rows=None):
        """input_ids: [B, Q]; positions: [B, Q] or [B, Q, 3]; query meta [B, Q]; key meta [B, S] (every
        slot the cache will hold after this call); query_slot: [B, Q]; ``cache=None``: no KV cache (one
        full forward). Returns logits [B, Q', V] (Q' = len(keep) when ``keep`` selects query columns),
        or [E, V] when ``select = (rows [E], columns [E])`` picks single tokens: the output layer then
        runs on those E hidden states only. ``into``: a tensor of the logits' shape and dtype that the
        output layer writes them into where it can (the invariant kernels); the logits returned are
        ``into`` itself then. ``kv_rows`` [B]: the cache's row each batch row reads, in place (the invariant
        attention; ``SlotCache.decode(..., in_place=True)``)."""
        seen = allowed(query, keys, query_slot, self.mask)  # [B, Q, S]
        mask = additive_mask(seen, self.dtype)  # [B, 1, Q, S]
        groups = mask_groups(self.model)
        if groups > 1:  # grouped attention folds the query heads into Q: fold the mask once, not per layer
            mask = fold_mask(mask, groups)  # [B, 1, G*Q, S]
        kwargs: dict[str, Any] = {} if cache is None else {self.cache_name: cache}
        if is_invariant(self.model):  # each query's key list, built once for every layer
            kwargs[KEYS_KWARG] = key_lists(seen)
            if kv_rows is not None:
                kwargs[ROWS_KWARG] = kv_rows
        if keep is not None:
            kwargs["logits_to_keep"] = keep
        hook = None
        if select is not None:
            rows, cols = select
            # hidden [B, Q, H] -> [1, E, H] before the output layer (any soft-capping after it still applies)
            hook = self.model.get_output_embeddings().register_forward_pre_hook(
                lambda _module, args: (args[0][rows, cols][None], *args[1:]))
        head = (output_into(self.model.get_output_embeddings().weight, into) if into is not None
                else contextlib.nullcontext())
        try:
            with head:
                out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                 use_cache=cache is not None, **kwargs)
        finally:
            if hook is not None:
                hook.remove()
        return out.logits[0] if select is not None else out.logits
