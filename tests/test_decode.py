"""The decoding invariants of SPEC §5, each against an independent reference."""

import pytest
import torch
from conftest import SAMPLES, hf_generate, ids_sample, main_ids, tiny_model

import pmaccel.engine
from pmaccel import generate
from pmaccel.engine import Engine, EngineConfig
from pmaccel.errors import PMAccelError
from pmaccel.rope import patch_rope

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3"]

@pytest.mark.parametrize("arch", ARCHS)
def test_isolated_plain_rope_equals_hf_generate_per_branch(arch, ids_tokenizer):
    model = tiny_model(arch)
    results = generate(model, ids_tokenizer, SAMPLES, max_new_tokens=8, batch_size=3)
    for s, r in zip(SAMPLES, results, strict=True):
        assert r["finish_reasons"] == ["length"] * len(s["branches"])
        for b, got in zip(s["branches"], r["output_ids"], strict=True):
            assert got == hf_generate(model, main_ids(s) + b["input_ids"], 8)


def test_eos_stops_a_branch_like_hf_generate(ids_tokenizer):
    model = tiny_model("llama")
    free = generate(model, ids_tokenizer, SAMPLES, max_new_tokens=8)
    eos = free[0]["output_ids"][1][3]  # a token the model does produce
    model.generation_config.eos_token_id = eos
    results = generate(model, ids_tokenizer, SAMPLES, max_new_tokens=8, batch_size=2)
    stops = 0
    for s, r in zip(SAMPLES, results, strict=True):
        for b, got, why in zip(s["branches"], r["output_ids"], r["finish_reasons"], strict=True):
            ref = hf_generate(model, main_ids(s) + b["input_ids"], 8, eos=eos)
            if why == "stop":
                stops += 1
                assert ref == got + [eos]  # the stop token is the reason, not part of the output
            else:
                assert ref == got and len(got) == 8 and eos not in got
    assert stops >= 1


def test_extra_stop_ids(ids_tokenizer):
    model = tiny_model("llama")
    free = generate(model, ids_tokenizer, SAMPLES[:1], max_new_tokens=6)[0]
    stop = free["output_ids"][0][2]
    r = generate(model, ids_tokenizer, SAMPLES[:1], max_new_tokens=6, stop_token_ids=[stop])[0]
    assert r["output_ids"][0] == free["output_ids"][0][:2] and r["finish_reasons"][0] == "stop"
    assert r["num_generated_tokens"][0] == 2


def _record_step_logits(monkeypatch):
    """Capture, at every step, the logits each running lane's token was chosen from, keyed by
    (sample index, branch id, tokens generated so far)."""
    seen = []
    real = pmaccel.engine.choose_tokens

    def spy(opts, logits, history, index, branch, step, active):
        for e in torch.nonzero(active).flatten().tolist():
            seen.append((int(index[e]), int(branch[e]), int(step[e]), logits[e].float().clone()))
        return real(opts, logits, history, index, branch, step, active)

    monkeypatch.setattr(pmaccel.engine, "choose_tokens", spy)
    return seen


def _full_sequence(sample, out_ids, align, stride):
    """The final packed sequence in the order tokens were appended, built from SPEC §2/§5 by hand.

    Returns ids, pos [N, 3] (pos1d, bpos, time), time, and for (branch k, j-th new token) the index
    of the token whose logits predict it.
    """
    main = main_ids(sample)
    branches = [b["input_ids"] for b in sample["branches"]]
    M, first, lmax = len(main), 1 if main else 0, max(map(len, branches))
    toks = [(0, t, tok) for t, tok in enumerate(main)]  # (branch id, time, id)
    last_time = []
    for k, b in enumerate(branches):
        start = M if align == "left" else M + lmax - len(b)
        toks += [(first + k, start + i, tok) for i, tok in enumerate(b)]
        last_time.append(start + len(b) - 1)
    toks.sort(key=lambda x: (x[1], x[0]))
    predictor = {}
    for k in range(len(branches)):
        t = last_time[k]
        predictor[(k, 0)] = next(i for i, x in enumerate(toks) if x[0] == first + k and x[1] == t)
    for step in range(max(map(len, out_ids))):
        for k, out in enumerate(out_ids):  # branch order
            if step < len(out):
                toks.append((first + k, last_time[k] + 1 + step, out[step]))
                predictor[(k, step + 1)] = len(toks) - 1
    ids = torch.tensor([x[2] for x in toks])
    time = torch.tensor([x[1] for x in toks])
    pos = torch.stack([torch.arange(len(toks)), torch.tensor([x[0] for x in toks]) * stride, time], -1)
    return ids, pos, time, predictor


@pytest.mark.parametrize(
    "arch, align, samples",
    [
        ("llama", "right", SAMPLES),  # unequal branches, right-aligned: every step shares one time
        ("qwen2", "left", [ids_sample([1, 2, 3], [4, 5], [6, 7], [8, 9]), ids_sample(None, [10, 11, 12], [13, 14, 15])]),
        ("gemma2", "right", SAMPLES[:2]),
    ],
)
@pytest.mark.parametrize("stopped", [(0, 4), (1, 0)], ids=["first-branch-stops", "middle-branch-stops"])
@pytest.mark.parametrize("columns", [None, 1], ids=["sample-rows", "lane-rows"])
def test_full_forward_reproduces_every_generated_token(arch, align, samples, stopped, columns, ids_tokenizer,
                                                       monkeypatch):
    model = tiny_model(arch)
    patch_rope(model, 0.5)
    seen = _record_step_logits(monkeypatch)
    stride = 16
    eos = generate(model, ids_tokenizer, samples, max_new_tokens=8, align=align, branch_stride=stride)[0]
    # some branches stop early: the first one of a sample, or (in the first case) one between two that go on,
    # whose lanes then have an ended one among them
    branch, at = stopped
    model.generation_config.eos_token_id = eos["output_ids"][branch][at]
    seen.clear()
    engine = Engine(model, EngineConfig(max_rows=2, columns=columns, sync_every=1))  # lanes freed at every step
    results = generate(model, ids_tokenizer, samples, max_new_tokens=8, align=align, branch_stride=stride,
                       engine=engine)
    assert any("stop" in r["finish_reasons"] for r in results)
    checked = 0
    for i, (s, r) in enumerate(zip(samples, results, strict=True)):
        ids, pos, time, predictor = _full_sequence(s, r["output_ids"], align, stride)
        allowed = (time[None, :] < time[:, None]) | torch.eye(len(time), dtype=torch.bool)  # columnar
        mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]
        with torch.no_grad():
            full = model(input_ids=ids[None], attention_mask=mask, position_ids=pos[None]).logits[0]
        incremental = {(bid, n): lg for idx, bid, n, lg in seen if idx == i}
        first = 1 if main_ids(s) else 0
        for k, out in enumerate(r["output_ids"]):
            for j, tok in enumerate(out):
                row = full[predictor[(k, j)]]
                assert int(row.argmax()) == tok
                torch.testing.assert_close(row, incremental[(first + k, j)], atol=1e-4, rtol=0)
                checked += 1
    assert checked > (20 if stopped == (0, 4) else 5)


def test_full_forward_isolated_left_unequal(ids_tokenizer, monkeypatch):
    model = tiny_model("llama")
    patch_rope(model, 0.5)
    s = SAMPLES[0]
    r = generate(model, ids_tokenizer, [s], max_new_tokens=6, mask="isolated", branch_stride=8)[0]
    ids, pos, time, predictor = _full_sequence(s, r["output_ids"], "left", 8)
    branch = pos[:, 1] // 8
    is_main = torch.tensor([i < 4 for i in range(len(ids))])  # main's 4 tokens come first
    allowed = ((time[None, :] < time[:, None]) & ((branch[None, :] == branch[:, None]) | is_main[None, :])) | (
        torch.eye(len(ids), dtype=torch.bool)
    )
    mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]
    with torch.no_grad():
        full = model(input_ids=ids[None], attention_mask=mask, position_ids=pos[None]).logits[0]
    for k, out in enumerate(r["output_ids"]):
        for j, tok in enumerate(out):
            assert int(full[predictor[(k, j)]].argmax()) == tok


@pytest.mark.parametrize("mask", ["columnar", "isolated"])
@pytest.mark.parametrize("sampled", [False, True])
def test_batch_invariance(mask, sampled, ids_tokenizer):
    model = tiny_model("qwen2")
    patch_rope(model, 0.5)
    kw = dict(max_new_tokens=7, mask=mask, seed=3, temperature=1.3 if sampled else 0.0, top_k=50, top_p=0.95)
    together = generate(model, ids_tokenizer, SAMPLES, batch_size=4, **kw)
    for i, s in enumerate(SAMPLES):
        alone = generate(model, ids_tokenizer, [s], indices=[i], batch_size=1, **kw)[0]
        assert alone["output_ids"] == together[i]["output_ids"]
    by_branches = generate(model, ids_tokenizer, SAMPLES, batch_size=5, batch_by_samples=False, **kw)
    assert [r["output_ids"] for r in by_branches] == [r["output_ids"] for r in together]


def test_sampling_depends_on_seed_and_index(ids_tokenizer):
    model = tiny_model("llama")
    kw = dict(max_new_tokens=10, temperature=1.5)
    a = generate(model, ids_tokenizer, SAMPLES[:1], seed=1, **kw)[0]["output_ids"]
    assert a == generate(model, ids_tokenizer, SAMPLES[:1], seed=1, **kw)[0]["output_ids"]
    assert a != generate(model, ids_tokenizer, SAMPLES[:1], seed=2, **kw)[0]["output_ids"]
    assert a != generate(model, ids_tokenizer, SAMPLES[:1], seed=1, indices=[7], **kw)[0]["output_ids"]
    greedy = generate(model, ids_tokenizer, SAMPLES[:1], max_new_tokens=10, seed=1)[0]["output_ids"]
    assert greedy == generate(model, ids_tokenizer, SAMPLES[:1], max_new_tokens=10, seed=2)[0]["output_ids"]


def test_repetition_penalty_matches_hf(ids_tokenizer):
    model = tiny_model("llama")
    s = SAMPLES[2]
    r = generate(model, ids_tokenizer, [s], max_new_tokens=8, repetition_penalty=1.8, mask="isolated")[0]
    for b, got in zip(s["branches"], r["output_ids"], strict=True):
        assert got == hf_generate(model, main_ids(s) + b["input_ids"], 8, repetition_penalty=1.8)


def test_on_step_streams_partial_outputs(ids_tokenizer):
    model = tiny_model("llama")
    steps = []
    r = generate(model, ids_tokenizer, SAMPLES[:2], max_new_tokens=5, on_step=lambda n, p: steps.append((n, p)))
    assert [n for n, _ in steps] == [1, 2, 3, 4, 5]
    last = {p["index"]: p for p in steps[-1][1]}
    assert last[0]["output_ids"] == r[0]["output_ids"] and last[1]["output_ids"] == r[1]["output_ids"]
    assert all(len(x) == 1 for x in steps[0][1][0]["output_ids"])


@pytest.mark.parametrize(
    "samples, kwargs, match",
    [
        ([{"branches": []}], {}, "sample 0: branches: the branch list is empty"),
        ([ids_sample(None, [1]), {"main": "", "branches": [{"input_ids": []}]}], {}, r"sample 1: branches\[0\]: .*empty"),
        ([ids_sample(None, [1])], {"mask": "causal"}, "unknown mask 'causal'"),
        ([ids_sample(None, [1])], {"align": "center"}, "align must be one of"),
        ([ids_sample(None, [1])], {"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
        ([ids_sample(None, [1]), ids_sample([2], [3, 256])], {}, r"sample 1: input_ids: token id 256 is outside"),
    ],
)
def test_bad_calls(samples, kwargs, match, ids_tokenizer):
    with pytest.raises(PMAccelError, match=match):
        generate(tiny_model("llama"), ids_tokenizer, samples, **kwargs)
