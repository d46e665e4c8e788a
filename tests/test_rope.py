import math

import pytest
import torch
import transformers
from conftest import tiny_model

from pmaccel.errors import PMAccelError
from pmaccel.rope import Rope2D, is_rope_2d, patch_rope


def _formula_cos_sin(inv_freq, pos1d, bpos, time, ratio, scaling=1.0):
    """SPEC §4 written out pair by pair, independent of pmaccel.rope; float32 angles as the model's module."""
    F = len(inv_freq)
    n = min(max(round(F * ratio), 1), F)
    T = len(pos1d)
    angles = torch.zeros(T, F, dtype=torch.float32)
    for t in range(T):
        for j in range(F):
            if j >= F - n:
                m = j - (F - n)
                p = bpos[t] if m % 2 == 0 else time[t]
            else:
                p = pos1d[t]
            angles[t, j] = torch.tensor(inv_freq[j], dtype=torch.float32) * p
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


@pytest.mark.parametrize("arch", ["llama", "phi3-partial"])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 1.0])
def test_cos_sin_follow_the_formula(arch, ratio):
    model = tiny_model(arch)
    patch_rope(model, ratio)
    rope = model.model.rotary_emb
    assert isinstance(rope, Rope2D)
    inv = rope.rotary.inv_freq
    if arch == "phi3-partial":  # partial rotary: only half of head_dim rotates
        assert 2 * inv.numel() == model.config.hidden_size // model.config.num_attention_heads // 2
    pos1d, bpos, time = [0, 1, 2, 3, 4, 5, 6], [0, 0, 128, 256, 128, 256, 384], [0, 1, 2, 2, 3, 3, 900]
    pos = torch.tensor([pos1d, bpos, time]).T[None]  # [1, T, 3]
    cos, sin = rope(torch.zeros(1, dtype=torch.float32), pos)
    ref_cos, ref_sin = _formula_cos_sin(inv.tolist(), pos1d, bpos, time, ratio, rope.rotary.attention_scaling)
    assert cos.shape == (1, 7, 2 * inv.numel())
    torch.testing.assert_close(cos[0], ref_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[0], ref_sin, atol=1e-6, rtol=0)


def test_selected_pairs_count():
    # F = 8 pairs (head_dim 16): ratio 0.25 -> 2 pairs (6: bpos, 7: time)
    model = tiny_model("llama", head_dim=16)
    patch_rope(model, 0.25)
    assert model.model.rotary_emb.sources.tolist() == [0, 0, 0, 0, 0, 0, 1, 2]
    model = tiny_model("llama", head_dim=16)
    patch_rope(model, 0.01)  # rounds to 0, clamped to 1
    assert model.model.rotary_emb.sources.tolist() == [0] * 7 + [1]


def _logits(model, ids, positions):
    mask = torch.full((1, 1, ids.shape[1], ids.shape[1]), torch.finfo(torch.float32).min).triu(1)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3"])
def test_patched_model_equals_unpatched_when_every_position_is_pos1d(arch):
    model = tiny_model(arch)
    ids = torch.randint(1, 200, (1, 12))
    pos1d = torch.arange(12)[None]
    ref = _logits(model, ids, pos1d)
    patch_rope(model, 0.5)
    got = _logits(model, ids, torch.stack([pos1d, pos1d, pos1d], dim=-1))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    # plain [B, T] positions still go to the model's own RoPE
    torch.testing.assert_close(_logits(model, ids, pos1d), ref, atol=0, rtol=0)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 1.0])
def test_branch_zero_and_time_pos1d_equals_model_with_those_pairs_frozen(ratio):
    """bpos = 0 and time = pos1d: the bpos pairs do not turn, every other pair turns with pos1d.

    The reference is the unpatched model with inv_freq zeroed on the bpos pairs.
    """
    model = tiny_model("llama")
    ref_model = tiny_model("llama")
    inv = ref_model.model.rotary_emb.inv_freq
    F = inv.numel()
    n = min(max(round(F * ratio), 1), F)
    frozen = [F - n + m for m in range(0, n, 2)]
    inv[frozen] = 0.0
    ids = torch.randint(1, 200, (1, 10))
    pos1d = torch.arange(10)[None] * 300  # far apart, so that even the slowest pairs turn visibly
    ref = _logits(ref_model, ids, pos1d)
    patch_rope(model, ratio)
    got = _logits(model, ids, torch.stack([pos1d, torch.zeros_like(pos1d), pos1d], dim=-1))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(_logits(model, ids, pos1d), ref, atol=1e-3)  # the frozen pairs matter


def test_no_state_leaks_between_calls():
    model = tiny_model("llama")
    patch_rope(model, 0.5)
    ids = torch.randint(1, 200, (1, 6))
    a = torch.stack([torch.arange(6), torch.full((6,), 128), torch.arange(6)], -1)[None]
    b = torch.stack([torch.arange(6), torch.full((6,), 512), torch.arange(6) + 3], -1)[None]
    first = _logits(model, ids, a)
    _logits(model, ids, b)
    torch.testing.assert_close(_logits(model, ids, a), first, atol=0, rtol=0)


def test_model_without_rotary_is_a_clear_error():
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    model = transformers.GPT2LMHeadModel(cfg)
    with pytest.raises(PMAccelError, match="no rotary position embedding.*--no_patch_rope"):
        patch_rope(model, 0.5)


def test_patch_twice_and_bad_ratio():
    model = tiny_model("llama")
    with pytest.raises(PMAccelError, match="rope_2d_ratio"):
        patch_rope(model, 1.5)
    assert not is_rope_2d(model)
    patch_rope(model, 0.5)
    with pytest.raises(PMAccelError, match="already"):
        patch_rope(model, 0.5)


def test_rope_scaling_is_already_in_inv_freq():
    # llama3-style scaling changes inv_freq; the patch must use the scaled one
    model = tiny_model("llama", rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    inv = model.model.rotary_emb.inv_freq.clone()
    patch_rope(model, 0.25)  # 8 pairs: 0-5 pos1d, 6 bpos, 7 time
    pos = torch.tensor([[[3, 0, 5]]])
    cos, _ = model.model.rotary_emb(torch.zeros(1), pos)
    assert math.isclose(float(cos[0, 0, 0]), math.cos(float(inv[0]) * 3), abs_tol=1e-6)
    assert math.isclose(float(cos[0, 0, inv.numel() - 1]), math.cos(float(inv[-1]) * 5), abs_tol=1e-6)
