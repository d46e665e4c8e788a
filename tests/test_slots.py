"""pmaccel.slots: grouped attention (query heads folded onto their KV head) equals sdpa over K/V repeated
per head, on both of its kernels; the slot cache writes where it is told and moves rows whole."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pmaccel import slots
from pmaccel.slots import SlotCache, fold_mask, grouped_sdpa


@pytest.mark.parametrize("matmul_rows", [10**9, 0], ids=["matmul", "sdpa"])
def test_grouped_sdpa_equals_sdpa_with_repeated_kv(monkeypatch, matmul_rows):
    monkeypatch.setattr(slots, "MATMUL_ROWS", matmul_rows)
    g = torch.Generator().manual_seed(0)
    b, h, h_kv, q_len, s, d = 2, 6, 2, 3, 11, 8
    q = torch.randn(b, h, q_len, d, generator=g)
    k, v = torch.randn(b, h_kv, s, d, generator=g), torch.randn(b, h_kv, s, d, generator=g)
    allowed = torch.rand(b, 1, q_len, s, generator=g) < 0.6
    allowed[..., 0] = True
    mask = torch.zeros(b, 1, q_len, s).masked_fill(~allowed, torch.finfo(torch.float32).min)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(h // h_kv, 1), v.repeat_interleave(h // h_kv, 1),
                                         attn_mask=mask).transpose(1, 2)
    for m in (mask, fold_mask(mask, h // h_kv)):  # folded here or once per forward by the caller
        out, _ = grouped_sdpa(None, q, k, v, m)
        assert torch.allclose(out, ref, atol=1e-5)


def test_slot_cache_writes_the_given_slots_and_moves_rows():
    cache = SlotCache(rows=3, max_slots=6)
    cache.prefill(torch.tensor([1]), 2)
    key = torch.arange(1 * 2 * 2 * 4, dtype=torch.float32).view(1, 2, 2, 4)  # [B, H_kv, Q, D]
    k, _ = cache.update(key, -key, layer_idx=0)
    assert torch.equal(k, key) and torch.equal(cache.keys[0][1, :, :2], key[0])
    cache.decode(torch.tensor([[5], [3], [0]]))  # row r's query goes to slot slots[r]
    step = torch.ones(3, 2, 1, 4)
    k, v = cache.update(step, step * 2, layer_idx=0)
    assert k.shape == (3, 2, 6, 4) and torch.equal(k[0, :, 5], step[0, :, 0]) and torch.equal(v[1, :, 3], 2 * step[1, :, 0])
    cache.move_row(1, 2)
    assert torch.equal(cache.keys[0][2], cache.keys[0][1]) and torch.equal(cache.values[0][2], cache.values[0][1])
