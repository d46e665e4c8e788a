"""pmaccel.measure: ``infer(compare=True)`` against HF ``generate`` on each branch alone, and the
branch x branch attention mass (``group_attention``, ``infer(leakage=True)``) against a hand
computation: the reference builds the mask token by token from SPEC §3, runs the model itself (eager
attention, ``output_attentions=True``) and sums the probabilities with Python loops.
"""

from __future__ import annotations

import copy
import json
import pickle

import helpers_infer
import pytest
import torch
from conftest import ids_sample, tiny_model
from helpers_infer import MIXED_ROWS, read_jsonl, write_jsonl

import pmaccel
import pmaccel.model
from pmaccel.cli import main
from pmaccel.errors import PMAccelError
from pmaccel.inference import infer
from pmaccel.layout import append_outputs, pack_sample
from pmaccel.measure import first_divergence, group_attention, rope_2d_off, sample_mask
from pmaccel.rope import is_rope_2d, patch_rope
from pmaccel.rows import example_path
from pmaccel.samples import TokenizedSample, tokenize_sample


@pytest.fixture(scope="module")
def parallel(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "parallel.jsonl", MIXED_ROWS[:4])


def divergence_by_hand(a: list[int], b: list[int]) -> int | None:
    i = 0
    while i < len(a) and i < len(b) and a[i] == b[i]:
        i += 1
    return None if i == len(a) == len(b) else i


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2 and first_divergence([], [4]) == 0


def test_rope_2d_off_is_the_models_own_rope_and_is_undone():
    plain = tiny_model("llama", seed=5)
    patched = tiny_model("llama", seed=5)
    patch_rope(patched, 0.5)
    x = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad(), rope_2d_off(patched):
        assert not is_rope_2d(patched)
        assert torch.equal(patched(x).logits, plain(x).logits)
    assert is_rope_2d(patched)


# ----------------------------------------------------------------------------- compare, tiny model


def test_compare_adds_per_branch_fields_and_keeps_the_outputs(tiny, mixed, tmp_path):
    common = dict(base_model=str(tiny), data_path=str(mixed), branches_per_sample=2, max_new_tokens=8)
    plain = infer(out_path=str(tmp_path / "plain.jsonl"), **common)
    records = infer(out_path=str(tmp_path / "cmp.jsonl"), compare=True, mask="isolated", **common)
    assert json.loads((tmp_path / "plain.jsonl.summary.json").read_text())["totals"] == {}
    for p, r, row in zip(plain, records, MIXED_ROWS):
        assert {k: r[k] for k in p} == p  # the same outputs, then the comparison
        if "branches" in row:
            assert list(r)[len(p):] == ["agree", "first_divergence", "reference_outputs"]
            assert r["agree"] == [True] * len(row["branches"]) and r["reference_outputs"] == r["outputs"]
        else:
            assert list(r)[len(p):] == ["agree", "first_divergence", "reference_output"]
            assert r["agree"] is True and r["first_divergence"] is None and r["reference_output"] == r["output"]
    summary = json.loads((tmp_path / "cmp.jsonl.summary.json").read_text())
    assert summary["totals"]["compare"] == {"branches": 15, "agree": 15, "agreement": 1.0, "diverged": 0,
                                            "mean_first_divergence": None}


def test_compare_with_2d_rope_against_the_plain_model(tiny, parallel, tmp_path):
    """Columnar + 2D RoPE vs independent branches: the reference is what the unpatched model gives alone."""
    common = dict(base_model=str(tiny), data_path=str(parallel), max_new_tokens=8)
    records = infer(out_path=str(tmp_path / "cmp.jsonl"), compare=True, patch_rope=True, **common)
    isolated = infer(out_path=str(tmp_path / "iso.jsonl"), patch_rope=False, mask="isolated", **common)
    model, tok = pmaccel.load_model(str(tiny), device="cpu", patch_rope=True)
    for r, iso in zip(records, isolated):
        assert r["reference_outputs"] == iso["outputs"]
        mine = pmaccel.generate(model, tok, [{"main": r["main"], "branches": r["branches"]}], max_new_tokens=8)[0]
        assert r["outputs"] == mine["outputs"]
    assert records.summary.totals["compare"]["branches"] == 9


# ----------------------------------------------------------------------------- compare, embedded SmolLM2

NEW_TOKENS = 10


@pytest.fixture(scope="module")
def alone(smollm2):
    """Each branch of the example file continued alone by HF ``model.generate`` on main + branch (greedy)."""
    model, tok = smollm2
    return helpers_infer.hf_alone(model, tok, read_jsonl(example_path()), max_new_tokens=NEW_TOKENS)


@pytest.mark.slow
@pytest.mark.parametrize("mask", ["isolated", "columnar"])
def test_compare_on_the_embedded_model(mask, smollm2, alone, tmp_path, monkeypatch):
    model, tok = smollm2
    monkeypatch.setattr(pmaccel.model, "load_model", lambda *a, **k: (model, tok))
    records = infer(out_path=str(tmp_path / "cmp.jsonl"), compare=True, mask=mask, max_new_tokens=NEW_TOKENS)
    rows = read_jsonl(example_path())
    direct = pmaccel.generate(model, tok, rows, mask=mask, max_new_tokens=NEW_TOKENS)
    expected = [[divergence_by_hand(a, b) for a, b in zip(d["output_ids"], ref)] for d, ref in zip(direct, alone)]
    assert [r["first_divergence"] for r in records] == expected
    assert [r["agree"] for r in records] == [[w is None for w in e] for e in expected]
    assert [r["reference_outputs"] for r in records] == [[tok.decode(x, skip_special_tokens=True) for x in ref]
                                                          for ref in alone]
    c = records.summary.totals["compare"]
    flat = [w for e in expected for w in e]
    print(f"{mask} vs isolated: {c['agree']}/{c['branches']} agree; first divergence per branch: {expected}")
    if mask == "isolated":
        assert c["agreement"] == 1.0 and c["agree"] == c["branches"] == 13
    else:
        diverged = [w for w in flat if w is not None]
        assert diverged, "columnar changes what the branches see, so some branch must diverge"
        assert c["diverged"] == len(diverged) and c["mean_first_divergence"] == pytest.approx(
            sum(diverged) / len(diverged))


# ----------------------------------------------------------------------------- leakage


def test_leakage_is_exactly_zero_under_the_isolated_mask(tiny, mixed, tmp_path):
    records = infer(base_model=str(tiny), data_path=str(mixed), out_path=str(tmp_path / "l.jsonl"),
                    branches_per_sample=2, max_new_tokens=6, leakage=True, mask="isolated", patch_rope=True)
    for r in records:
        per_branch = r["leakage"] if "outputs" in r else [r["leakage"]]
        assert all(len(layers) == 2 and all(x == 0.0 for x in layers) for layers in per_branch)
        tokens = r["leakage_tokens"] if "outputs" in r else [r["leakage_tokens"]]
        assert all(n > 0 for n in tokens)
    totals = records.summary.totals["leakage"]
    assert totals["per_layer"] == [0.0, 0.0] and totals["mean"] == 0.0


def hand_leakage(model, packed) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[int, int]]:
    """Attention probabilities of one forward over ``packed`` with a columnar mask built here; per branch:
    the summed, over its tokens, per-layer mass (mean over heads) on tokens of other branches (not main)."""
    n = packed.num_tokens
    time, branch, is_main = packed.time, packed.branch, packed.is_main
    mask = (time[None, :] < time[:, None]) | torch.eye(n, dtype=torch.bool)
    positions = torch.stack([torch.arange(n), packed.bpos, time], dim=-1)[None]  # (pos1d, bpos, time)
    with torch.no_grad():
        out = model(input_ids=packed.input_ids[None], attention_mask=torch.where(mask, 0.0, -1e30)[None, None],
                    position_ids=positions, output_attentions=True)
    sums, counts = {}, {}
    for b in sorted(set(branch[~is_main].tolist())):
        queries = (branch == b) & ~is_main
        others = (branch != b) & ~is_main
        per_layer = [float(p[0].float().mean(dim=0)[queries][:, others].sum()) for p in out.attentions]
        sums[b], counts[b] = torch.tensor(per_layer, dtype=torch.float64), int(queries.sum())
    return out, sums, counts


def test_leakage_matches_a_hand_computation_under_the_columnar_mask(tiny, parallel, tmp_path):
    records = infer(base_model=str(tiny), data_path=str(parallel), out_path=str(tmp_path / "l.jsonl"),
                    max_new_tokens=6, leakage=True, mask="columnar", patch_rope=True)
    model, tok = pmaccel.load_model(str(tiny), device="cpu", patch_rope=True)
    samples = [{"main": r["main"], "branches": r["branches"]} for r in records]
    generated = pmaccel.generate(model, tok, samples, mask="columnar", max_new_tokens=6)
    model.set_attn_implementation("eager")  # attention probabilities
    total, tokens = torch.zeros(2, dtype=torch.float64), 0
    for r, sample, result in zip(records, samples, generated):
        packed = append_outputs(pack_sample(tokenize_sample(sample, tok)), result["output_ids"])
        _, sums, counts = hand_leakage(model, packed)
        for k, b in enumerate(packed.branch_ids):
            assert r["leakage_tokens"][k] == counts[b]
            assert r["leakage"][k] == pytest.approx((sums[b] / counts[b]).tolist(), abs=1e-5)
            total += sums[b]
            tokens += counts[b]
    expected = (total / tokens).tolist()
    got = records.summary.totals["leakage"]
    print("columnar leakage per layer:", got["per_layer"], "by hand:", expected)
    assert got["per_layer"] == pytest.approx(expected, abs=1e-6) and got["tokens"] == tokens
    assert min(expected) > 0.01, "under columnar the branches do see each other"


def test_measure_totals_hold_running_sums_not_the_results():
    """The totals are taken as the output is written: what they hold does not grow with the rows, and they are the
    module's formulas over every branch (agreement, mean first divergence, token-weighted leakage per layer)."""
    from types import SimpleNamespace

    from pmaccel.measure import MeasureTotals

    def result(i):
        return {"agree": [i % 4 != 0, True], "first_divergence": [i % 9 if i % 4 == 0 else None, None],
                "leakage": [[0.01 * (i % 5), 0.5], [0.2, 0.001 * i]], "leakage_tokens": [i % 6 + 1, 3]}

    def totals_after(n):
        totals = MeasureTotals(SimpleNamespace(compare=True, leakage=True))
        for i in range(n):
            totals.add(None, {}, result(i))
        return totals

    assert len(pickle.dumps(totals_after(3000))) - len(pickle.dumps(totals_after(30))) < 16
    sums, notes = totals_after(3000).summary()
    results = [result(i) for i in range(3000)]
    where = [w for r in results for w in r["first_divergence"] if w is not None]
    assert sums["compare"] == {"branches": 6000, "agree": 6000 - 750, "agreement": 5250 / 6000, "diverged": 750,
                               "mean_first_divergence": sum(where) / 750}
    tokens = sum(n for r in results for n in r["leakage_tokens"])
    per_layer = [sum(x[layer] * n for r in results for x, n in zip(r["leakage"], r["leakage_tokens"])) / tokens
                 for layer in (0, 1)]
    assert sums["leakage"]["tokens"] == tokens and sums["leakage"]["per_layer"] == pytest.approx(per_layer, rel=1e-12)
    assert notes[0].startswith("compare: 5250/6000 branches agree")


def test_cli_compare_and_leakage(tiny, mixed, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert main(["--base_model", str(tiny), "--data_path", str(mixed), "--out_path", str(out), "--max_new_tokens", "4",
                 "--branches_per_sample", "2", "--compare", "--leakage"]) == 0
    printed = capsys.readouterr().out
    assert "compare: 15/15 branches agree" in printed and "leakage (attention mass" in printed
    records = read_jsonl(out)
    assert all({"agree", "first_divergence", "leakage", "leakage_tokens"} <= set(r) for r in records)
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert set(summary["totals"]) == {"compare", "leakage"} and summary["rows"] == len(MIXED_ROWS)


# ----------------------------------------------------------------------------- attention mass


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
