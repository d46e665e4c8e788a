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


def _reference_pack(ts, stride, align, interleave, rng):
    # SPEC §2 token by token: (id, time, branch) per token, then sorted by (time, branch) or (branch, time)
    first = 1 if ts.main else 0
    lmax = max(len(b) for b in ts.branches)
    tokens = [(t, i, 0) for i, t in enumerate(ts.main)]
    last = []
    for k, b in enumerate(ts.branches):
        start = len(ts.main) + (0 if align == "left" else lmax - len(b))
        if rng is not None:
            start += rng.randint(0, len(b))
        tokens += [(t, start + i, first + k) for i, t in enumerate(b)]
        last.append((start + len(b) - 1, first + k))
    tokens.sort(key=(lambda x: (x[1], x[2])) if interleave else (lambda x: (x[2], x[1])))
    where = {(time, branch): i for i, (_, time, branch) in enumerate(tokens)}
    return tokens, [where[key] for key in last], [t for t, _ in last]


def test_packing_matches_a_token_by_token_reference():
    rng = random.Random(0)
    for case in range(400):
        ts = TokenizedSample([rng.randrange(50) for _ in range(rng.choice([0, 0, 1, 4, 9]))],
                             [[rng.randrange(50) for _ in range(rng.randint(1, 7))] for _ in range(rng.randint(1, 6))])
        stride, align, interleave = rng.choice([1, 7, 128]), rng.choice(["left", "right"]), rng.random() < 0.7
        offsets = case % 3 == 0
        p = pack_sample(ts, branch_stride=stride, align=align, interleave_branches=interleave,
                        time_offset_rng=random.Random(case) if offsets else None)
        tokens, last_index, last_time = _reference_pack(ts, stride, align, interleave,
                                                        random.Random(case) if offsets else None)
        assert p.input_ids.tolist() == [t for t, _, _ in tokens]
        assert p.time.tolist() == [time for _, time, _ in tokens]
        assert p.branch.tolist() == [b for _, _, b in tokens]
        assert p.bpos.tolist() == [b * stride for _, _, b in tokens]
        assert p.is_main.tolist() == [bool(ts.main) and b == 0 for _, _, b in tokens]
        assert p.pos1d.tolist() == list(range(len(tokens)))
        assert all(t.dtype == torch.long for t in (p.input_ids, p.pos1d, p.bpos, p.time, p.branch))
        assert p.branch_ids == [(1 if ts.main else 0) + k for k in range(len(ts.branches))]
        assert (p.last_index, p.last_time) == (last_index, last_time)


def test_collate_right_pads_each_sample_as_it_is():
    rng = random.Random(1)
    ids = iter(range(10, 1000))  # every token of every sample its own id: a token in the wrong row or place shows
    packs = [pack_sample(TokenizedSample([next(ids) for _ in range(rng.randint(0, 3))],
                                         [[next(ids) for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(1, 3))]),
                         branch_stride=5)
             for _ in range(5)]
    batch = collate(packs, pad_id=9)
    n = max(p.num_tokens for p in packs)
    assert batch.input_ids.dtype == torch.long and batch.meta.is_main.dtype == torch.bool
    for b, p in enumerate(packs):
        pad = n - p.num_tokens
        assert batch.input_ids[b].tolist() == p.input_ids.tolist() + [9] * pad
        assert batch.pos1d[b].tolist() == p.pos1d.tolist() + [0] * pad
        assert batch.bpos[b].tolist() == p.bpos.tolist() + [0] * pad
        assert batch.meta.time[b].tolist() == p.time.tolist() + [0] * pad
        assert batch.meta.branch[b].tolist() == p.branch.tolist() + [-1] * pad
        assert batch.meta.is_main[b].tolist() == p.is_main.tolist() + [False] * pad
        assert batch.meta.valid[b].tolist() == [True] * p.num_tokens + [False] * pad


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
