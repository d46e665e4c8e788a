import random

import pytest
import torch

from pmaccel.errors import PMAccelError
from pmaccel.layout import TokenMeta, additive_mask, allowed, collate, pack_sample
from pmaccel.samples import TokenizedSample


def test_left_aligned_layout_by_hand():
    # main A B C (ids 1 2 3), branch x y (10 11), branch p q r (20 21 22), stride 100
    p = pack_sample(TokenizedSample([1, 2, 3], [[10, 11], [20, 21, 22]]), branch_stride=100)
    assert p.input_ids.tolist() == [1, 2, 3, 10, 20, 11, 21, 22]
    assert p.time.tolist() == [0, 1, 2, 3, 3, 4, 4, 5]
    assert p.branch.tolist() == [0, 0, 0, 1, 2, 1, 2, 2]
    assert p.bpos.tolist() == [0, 0, 0, 100, 200, 100, 200, 200]
    assert p.pos1d.tolist() == list(range(8))
    assert p.is_main.tolist() == [True] * 3 + [False] * 5
    assert p.branch_ids == [1, 2]
    assert p.last_index == [5, 7] and p.last_time == [4, 5]


def test_right_aligned_layout_by_hand():
    p = pack_sample(TokenizedSample([1, 2, 3], [[10, 11], [20, 21, 22]]), branch_stride=100, align="right")
    # branch 1 starts at M + (3 - 2) = 4, branch 2 at 3: both end at time 5
    assert p.input_ids.tolist() == [1, 2, 3, 20, 10, 21, 11, 22]
    assert p.time.tolist() == [0, 1, 2, 3, 4, 4, 5, 5]
    assert p.last_time == [5, 5] and p.last_index == [6, 7]


def test_no_main_branches_start_at_zero():
    p = pack_sample(TokenizedSample([], [[7, 8], [9]]), branch_stride=128)
    assert p.input_ids.tolist() == [7, 9, 8]
    assert p.branch.tolist() == [0, 1, 0]
    assert p.bpos.tolist() == [0, 128, 0]
    assert not p.is_main.any()
    assert p.branch_ids == [0, 1] and p.last_index == [2, 1]


def test_not_interleaved_keeps_branches_contiguous():
    p = pack_sample(TokenizedSample([1], [[10, 11], [20]]), interleave_branches=False)
    assert p.input_ids.tolist() == [1, 10, 11, 20]
    assert p.time.tolist() == [0, 1, 2, 1]


def test_random_time_offset_is_seeded_and_in_range():
    ts = TokenizedSample([1, 2], [[3, 4, 5], [6], [7, 8]])
    a = pack_sample(ts, time_offset_rng=random.Random(5))
    b = pack_sample(ts, time_offset_rng=random.Random(5))
    assert a.time.tolist() == b.time.tolist()
    plain = pack_sample(ts)
    for k, L in enumerate([3, 1, 2]):
        shift = a.last_time[k] - plain.last_time[k]
        assert 0 <= shift <= L
    assert a.time[a.is_main].tolist() == [0, 1]  # main never moves


def _reference_allowed(time, branch, is_main, mode):
    # SPEC §3 written out token by token
    n = len(time)
    out = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            if i == j:
                out[i, j] = True
            elif mode == "columnar":
                out[i, j] = time[j] < time[i]
            else:
                out[i, j] = time[j] < time[i] and (branch[j] == branch[i] or is_main[j])
    return out


@pytest.mark.parametrize("mode", ["columnar", "isolated"])
@pytest.mark.parametrize("main", [[], [1, 2]])
def test_masks_follow_the_spec_rule_with_padding(mode, main):
    packs = [
        pack_sample(TokenizedSample(main, [[3, 4, 5], [6], [7, 8]])),
        pack_sample(TokenizedSample([9], [[10]]), align="right"),
    ]
    batch = collate(packs)
    n = batch.input_ids.shape[1]
    got = allowed(batch.meta, batch.meta, torch.arange(n).expand(2, n), mode)
    for b, p in enumerate(packs):
        ref = _reference_allowed(p.time.tolist(), p.branch.tolist(), p.is_main.tolist(), mode)
        m = p.num_tokens
        assert torch.equal(got[b, :m, :m], ref)
        assert not got[b, :m, m:].any()  # nothing attends padding
        pads = torch.arange(m, n)
        assert torch.equal(got[b, pads][:, :m], torch.zeros(n - m, m, dtype=torch.bool))
    add = additive_mask(got, torch.float32)
    assert add.shape == (2, 1, n, n) and (add[got[:, None]] == 0).all()


def test_step_queries_see_same_step_tokens_by_time():
    # keys: two earlier tokens and two new queries at different times (left-aligned, unequal branches)
    keys = TokenMeta(
        time=torch.tensor([[0, 1, 2, 4]]),
        branch=torch.tensor([[0, 1, 1, 2]]),
        is_main=torch.tensor([[True, False, False, False]]),
        valid=torch.ones(1, 4, dtype=torch.bool),
    )
    query = TokenMeta(*(t[:, 2:] for t in keys.astuple()))
    col = allowed(query, keys, torch.tensor([[2, 3]]), "columnar")
    assert col.tolist() == [[[True, True, True, False], [True, True, True, True]]]
    iso = allowed(query, keys, torch.tensor([[2, 3]]), "isolated")
    assert iso.tolist() == [[[True, True, True, False], [True, False, False, True]]]


def test_unknown_mask_is_an_error():
    meta = TokenMeta(*(torch.zeros(1, 1, dtype=d) for d in (torch.long, torch.long, torch.bool, torch.bool)))
    with pytest.raises(PMAccelError, match="unknown mask 'causal'"):
        allowed(meta, meta, torch.zeros(1, 1, dtype=torch.long), "causal")


def test_append_outputs_in_decoding_order_by_hand():
    from pmaccel.layout import append_outputs

    p = pack_sample(TokenizedSample([1], [[2], [3, 4]]), branch_stride=10)
    f = append_outputs(p, [[5, 6], [7]])
    assert f.input_ids.tolist() == [1, 2, 3, 4, 5, 7, 6]
    assert f.time.tolist() == [0, 1, 1, 2, 2, 3, 3]
    assert f.branch.tolist() == [0, 1, 2, 2, 1, 2, 1]
    assert f.bpos.tolist() == [0, 10, 20, 20, 10, 20, 10]
    assert f.pos1d.tolist() == list(range(7))
    assert f.last_index == [6, 5] and f.last_time == [3, 3]
