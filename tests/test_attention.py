"""pmaccel.attention: the branch x branch attention mass, against a hand computation.

The reference builds the mask token by token from SPEC §3, runs the model itself (eager attention,
``output_attentions=True``) and sums the probabilities with Python loops.
"""

import copy

import pytest
import torch
from conftest import ids_sample, tiny_model

import pmaccel
from pmaccel.attention import group_attention, sample_mask
from pmaccel.errors import PMAccelError
from pmaccel.layout import append_outputs, pack_sample
from pmaccel.rope import patch_rope
from pmaccel.samples import TokenizedSample


def _spec_mask(time, branch, is_main, mode):  # SPEC §3, one pair at a time -> additive [1, 1, N, N]
    n = len(time)
    m = torch.full((n, n), torch.finfo(torch.float32).min)
    for i in range(n):
        for j in range(n):
            earlier = time[j] < time[i]
            ok = i == j or (earlier if mode == "columnar" else earlier and (branch[j] == branch[i] or is_main[j]))
            if ok:
                m[i, j] = 0.0
    return m[None, None]


def _reference(model, packed, mode, rope_2d):
    time, branch, is_main = packed.time.tolist(), packed.branch.tolist(), packed.is_main.tolist()
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    pos = torch.stack([packed.pos1d, packed.bpos, packed.time], -1)[None] if rope_2d else packed.time[None]
    with torch.no_grad():
        out = eager(input_ids=packed.input_ids[None], attention_mask=_spec_mask(time, branch, is_main, mode),
                    position_ids=pos, output_attentions=True)
    groups = sorted(set(branch))
    ref = torch.zeros(len(out.attentions), len(groups), len(groups), dtype=torch.float64)
    for layer, probs in enumerate(out.attentions):
        p = probs[0].double().mean(0)  # heads averaged
        for g, bg in enumerate(groups):
            queries = [i for i in range(len(time)) if branch[i] == bg]
            for h, bh in enumerate(groups):
                keys = [j for j in range(len(time)) if branch[j] == bh]
                ref[layer, g, h] = sum(float(p[i, keys].sum()) for i in queries) / len(queries)
    return ref


def _final(model, tok, main, branches, mask, max_new_tokens=5):
    sample = ids_sample(main, *branches)
    result = pmaccel.generate(model, tok, [sample], max_new_tokens=max_new_tokens, mask=mask)[0]
    packed = pack_sample(TokenizedSample(list(main or []), [list(b) for b in branches]))
    return append_outputs(packed, result["output_ids"])


@pytest.mark.parametrize("rope_2d", [False, True])
@pytest.mark.parametrize("mode", ["columnar", "isolated"])
@pytest.mark.parametrize("main", [[5, 6, 7], None])
def test_matches_hand_computation(mode, rope_2d, main, ids_tokenizer):
    model = tiny_model("llama")
    if rope_2d:
        patch_rope(model, 0.5)
    packed = _final(model, ids_tokenizer, main, [[10, 11], [20, 21, 22], [30]], mode)
    ga = group_attention(model, packed, mask=mode)
    ref = _reference(model, packed, mode, rope_2d)
    assert ga.per_layer.shape == ref.shape
    torch.testing.assert_close(ga.per_layer.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ga.matrix(), ref.mean(0).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ga.matrix(1), ref[1].float(), atol=1e-5, rtol=1e-5)
    # every row is a distribution over the groups
    torch.testing.assert_close(ga.per_layer.sum(-1), torch.ones(ga.per_layer.shape[:2]))
    assert ga.labels == (["main"] if main else []) + ["branch 1", "branch 2", "branch 3"]
    assert ga.has_main == bool(main)
    assert model.config._attn_implementation == "sdpa"  # switched back after the forward


def test_isolated_is_exactly_zero_off_branch(ids_tokenizer):
    model = tiny_model("qwen2")
    packed = _final(model, ids_tokenizer, [1, 2], [[10, 11, 12], [20], [30, 31]], "isolated")
    ga = group_attention(model, packed, mask="isolated")
    off = ga.per_layer.clone()
    off[:, :, 0] = 0  # main may be attended
    off[:, range(4), range(4)] = 0  # and the branch itself
    assert torch.count_nonzero(off) == 0
    assert (ga.per_layer[:, 1:, 0] > 0).all() and (ga.per_layer[:, 1:, 1:].diagonal(dim1=1, dim2=2) > 0).all()
    assert torch.equal(ga.per_layer[:, 0], torch.tensor([1.0, 0, 0, 0]).expand(ga.num_layers, 4))


def test_columnar_leaks_across_branches(ids_tokenizer):
    model = tiny_model("llama")
    packed = _final(model, ids_tokenizer, [1, 2], [[10, 11, 12], [20, 21]], "columnar")
    ga = group_attention(model, packed, mask="columnar")
    assert (ga.per_layer[:, 1, 2] > 0).all() and (ga.per_layer[:, 2, 1] > 0).all()


def test_sample_mask_is_the_spec_rule():
    packed = append_outputs(pack_sample(TokenizedSample([1, 2], [[3], [4, 5]]), align="right"), [[6, 7], [8]])
    args = (packed.time.tolist(), packed.branch.tolist(), packed.is_main.tolist())
    for mode in ("columnar", "isolated"):
        assert torch.equal(sample_mask(packed, mode), _spec_mask(*args, mode)[0, 0] == 0)


def test_eager_model_and_bad_arguments(ids_tokenizer):
    model = tiny_model("gemma2")  # loaded eager: nothing to switch
    packed = _final(model, ids_tokenizer, [1], [[10], [20]], "isolated", max_new_tokens=2)
    torch.testing.assert_close(group_attention(model, packed).per_layer.sum(-1), torch.ones(2, 3))
    assert model.config._attn_implementation == "eager"
    with pytest.raises(PMAccelError, match="unknown mask"):
        group_attention(model, packed, mask="causal")
    with pytest.raises(PMAccelError, match="layer must be in 0..1"):
        group_attention(model, packed).matrix(2)
