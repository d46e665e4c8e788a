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


def test_slot_cache_writes_the_given_slots_and_reads_the_given_rows():
    cache = SlotCache(rows=3, max_slots=6)
    cache.prefill(torch.tensor([1]), 2)
    key = torch.arange(1 * 2 * 2 * 4, dtype=torch.float32).view(1, 2, 2, 4)  # [B, H_kv, Q, D]
    k, _ = cache.update(key, -key, layer_idx=0)
    assert torch.equal(k, key) and torch.equal(cache.keys[0][1, :, :2], key[0])
    # batch row j's query belongs to KV row rows[j] and goes to slot slots[j]
    cache.decode(torch.tensor([2, 1, 0]), torch.tensor([[5], [3], [0]]))
    step = torch.arange(3 * 2 * 1 * 4, dtype=torch.float32).view(3, 2, 1, 4)
    k, v = cache.update(step, step * 2, layer_idx=0)
    assert k.shape == (3, 2, 6, 4)  # a copy of the rows read, in batch order
    assert torch.equal(k[0, :, 5], step[0, :, 0]) and torch.equal(cache.keys[0][2, :, 5], step[0, :, 0])
    assert torch.equal(v[1, :, 3], 2 * step[1, :, 0]) and torch.equal(k[1, :, :2], key[0])  # row 1 kept its prompt
    cache.decode(torch.tensor([1]), torch.tensor([[4]]), in_place=True)
    k, v = cache.update(step[:1], step[:1], layer_idx=0)
    assert k is cache.keys[0] and v is cache.values[0]  # the whole memory: the attention reads row 1 in place
    assert torch.equal(cache.keys[0][1, :, 4], step[0, :, 0])
    cache.decode(torch.tensor([0, 1]), torch.tensor([[1], [2]]), in_order=True)
    k, _ = cache.update(step[:2], step[:2], layer_idx=0)
    assert k.shape == (2, 2, 6, 4) and k.data_ptr() == cache.keys[0].data_ptr()  # rows 0..n-1 as they lie
    before = cache.keys[0].clone()
    cache.move_rows(torch.tensor([2, 0]), torch.tensor([0, 2]))  # a swap: the sources are read first
    assert torch.equal(cache.keys[0][0], before[2]) and torch.equal(cache.keys[0][2], before[0])
