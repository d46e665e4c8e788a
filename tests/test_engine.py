"""The decode engine (continuous batching over a pool of rows and lanes) against independent references:
transformers' ``generate`` per branch, and each sample decoded alone."""

import random

import numpy as np
import pytest
import torch
from conftest import SAMPLES, hf_generate, ids_sample, main_ids, tiny_model

from pmaccel import generate
from pmaccel.engine import (
    PREFILL_LANES,
    PREFILL_TOKENS,
    Engine,
    EngineConfig,
    _bucket_for,
    _buckets,
    _prefill_chunks,
    _regroup,
    prefill_bytes_per_token,
)
from pmaccel.rope import patch_rope

# more samples than the pool has rows, of different lengths and branch counts: rows free up at different
# steps and the next samples are prefilled into them while the others decode
MORE = SAMPLES + [
    ids_sample([60, 61], [62], [63, 64], [65, 66, 67], [68], [69, 70]),
    ids_sample(None, [71, 72]),
    ids_sample([80, 81, 82, 83, 84, 85, 86], [87]),
    ids_sample(None, [90], [91, 92, 93, 94, 95, 96, 97, 98, 99], [100]),
    ids_sample([110, 111], [112, 113], [114]),
]


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("columns", [None, 1], ids=["sample-rows", "lane-rows"])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "phi3"])
def test_continuous_batching_equals_hf_generate_isolated(arch, columns, ids_tokenizer):
    model = tiny_model(arch)
    engine = Engine(model, EngineConfig(max_rows=3, columns=columns))
    results = generate(model, ids_tokenizer, MORE, max_new_tokens=9, engine=engine)
    for s, r in zip(MORE, results, strict=True):
        for b, got in zip(s["branches"], r["output_ids"], strict=True):
            assert got == hf_generate(model, main_ids(s) + b["input_ids"], 9)


def _with_stops(model, tokenizer):
    """Make a token the model produces early an EOS, so branches and samples end at different steps."""
    free = generate(model, tokenizer, MORE, max_new_tokens=4)
    model.generation_config.eos_token_id = free[0]["output_ids"][0][1]


@pytest.mark.parametrize("mask, align", [("columnar", "right"), ("columnar", "left"), ("isolated", "left")])
@pytest.mark.parametrize("sampled", [False, True])
def test_a_sample_decodes_the_same_alone_and_in_any_pool(mask, align, sampled, ids_tokenizer):
    model = tiny_model("qwen2")
    patch_rope(model, 0.5)
    _with_stops(model, ids_tokenizer)
    kw = dict(max_new_tokens=20, mask=mask, align=align, seed=5, temperature=0.9 if sampled else 0.0,
              top_k=40, top_p=0.9, branch_stride=32)
    alone = [generate(model, ids_tokenizer, [s], indices=[i], **kw)[0] for i, s in enumerate(MORE)]
    assert any("stop" in r["finish_reasons"] for r in alone) and any("length" in r["finish_reasons"] for r in alone)
    for batch_size in (1, 2, 3, 16):  # 16: every sample at once; 1-3: samples enter as others finish
        got = generate(model, ids_tokenizer, MORE, batch_size=batch_size, **kw)
        assert [r["output_ids"] for r in got] == [r["output_ids"] for r in alone]
        assert [r["finish_reasons"] for r in got] == [r["finish_reasons"] for r in alone]
    shuffled = list(reversed(range(len(MORE))))
    got = generate(model, ids_tokenizer, [MORE[i] for i in shuffled], indices=shuffled, batch_size=4, **kw)
    assert [r["output_ids"] for r in got] == [alone[i]["output_ids"] for i in shuffled]
    by_branches = generate(model, ids_tokenizer, MORE, batch_size=7, batch_by_samples=False, **kw)
    assert [r["output_ids"] for r in by_branches] == [r["output_ids"] for r in alone]
    for lanes in (9, 64):  # a lane per batch row (as on a GPU): ended branches free their lanes for others
        engine = Engine(model, EngineConfig(max_lanes=lanes, columns=1))
        got = generate(model, ids_tokenizer, MORE, engine=engine, **kw)
        assert [r["output_ids"] for r in got] == [r["output_ids"] for r in alone]
        assert [r["finish_reasons"] for r in got] == [r["finish_reasons"] for r in alone]


def test_samples_are_packed_as_they_are_admitted(ids_tokenizer, monkeypatch):
    """A run packs a sample when the engine admits it (the next few while the device runs the steps before it),
    not every sample before its first step; each is packed once, with its own index's time offsets, and
    decodes as it does alone."""
    import pmaccel.decode as decode

    model = tiny_model("qwen2")
    patch_rope(model, 0.5)
    samples = [MORE[i % len(MORE)] for i in range(24)]
    kw = dict(max_new_tokens=6, random_time_offset=True, seed=3, temperature=0.8)
    packed = []
    real = decode.pack_sample
    monkeypatch.setattr(decode, "pack_sample", lambda ts, **k: packed.append(k["time_offset_rng"]) or real(ts, **k))
    stream = decode.decode_stream(model, ids_tokenizer, samples, engine=Engine(model, EngineConfig(max_lanes=6, columns=1)),
                                  **kw)
    got = [next(stream)]
    assert 0 < len(packed) < len(samples)
    got += list(stream)
    assert len(packed) == len(samples)
    monkeypatch.setattr(decode, "pack_sample", real)
    alone = [generate(model, ids_tokenizer, [s], indices=[i], **kw)[0] for i, s in enumerate(samples)]
    assert sorted(pos for pos, _ in got) == list(range(len(samples)))
    for pos, r in got:
        assert r["output_ids"] == alone[pos]["output_ids"]
        assert r["num_prompt_tokens"] == alone[pos]["num_prompt_tokens"]


@pytest.mark.parametrize("columns", [None, 1], ids=["sample-rows", "lane-rows"])
def test_repetition_penalty_in_a_pool_matches_hf(columns, ids_tokenizer):
    model = tiny_model("llama")
    engine = Engine(model, EngineConfig(max_rows=3, columns=columns))
    results = generate(model, ids_tokenizer, MORE, max_new_tokens=8, repetition_penalty=1.8, engine=engine)
    for s, r in zip(MORE, results, strict=True):
        for b, got in zip(s["branches"], r["output_ids"], strict=True):
            assert got == hf_generate(model, main_ids(s) + b["input_ids"], 8, repetition_penalty=1.8)


@pytest.mark.parametrize("columns", [None, 1, 3], ids=["sample-rows", "lane-rows", "3-lane-rows"])
def test_ended_branches_free_their_lanes_and_results_stay(columns, ids_tokenizer):
    model = tiny_model("llama")
    free = generate(model, ids_tokenizer, MORE, max_new_tokens=12)
    # a stop id that ends some branches early: the lanes of the branches still running move down over
    # theirs, and the next samples take the room while the others' branches run on; with a sample's
    # branches in one batch row (columns = K) the samples move down into freed rows instead
    moves = "row_moves" if columns is None else "lane_moves"
    for stop in dict.fromkeys(ids[0] for r in free for ids in r["output_ids"]):
        kw = dict(max_new_tokens=12, stop_token_ids=[stop])
        engine = Engine(model, EngineConfig(max_lanes=16 if columns is None else 8, columns=columns, sync_every=1))
        got = generate(model, ids_tokenizer, MORE, engine=engine, **kw)
        if engine.stats[moves]:
            break
    assert engine.stats[moves] > 0 and engine.stats["lanes"] <= 16
    alone = [generate(model, ids_tokenizer, [s], indices=[i], **kw)[0] for i, s in enumerate(MORE)]
    assert [r["output_ids"] for r in got] == [r["output_ids"] for r in alone]
    assert [r["finish_reasons"] for r in got] == [r["finish_reasons"] for r in alone]


def test_an_engine_is_reused_across_calls_and_released(ids_tokenizer):
    import pmaccel

    assert pmaccel.Engine is Engine and pmaccel.EngineConfig is EngineConfig  # public, for generate(engine=...)
    model = tiny_model("qwen2")
    engine = Engine(model)
    first = generate(model, ids_tokenizer, MORE, max_new_tokens=6, engine=engine)
    runner = engine.runner
    again = generate(model, ids_tokenizer, MORE[:3], max_new_tokens=6, engine=engine)
    assert engine.runner is runner, "same options and shapes that fit: the buffers (and graphs) are kept"
    assert [r["output_ids"] for r in again] == [r["output_ids"] for r in first[:3]]
    stopped = engine.run([], [], None)  # nothing to do
    assert list(stopped) == []
    partial = generate_stream_first(model, ids_tokenizer, MORE, engine)  # a caller that stops early
    assert partial is not None
    after = generate(model, ids_tokenizer, MORE, max_new_tokens=6, engine=engine)
    assert [r["output_ids"] for r in after] == [r["output_ids"] for r in first]
    engine.release()
    assert engine.runner is None
    assert not any(hasattr(model, name) for name in ("_pmaccel_runners", "_pmaccel_stats")), "no state on the model"


def generate_stream_first(model, tokenizer, samples, engine):
    """Take the first finished sample and stop: the engine's pool is left with live rows."""
    from pmaccel.decode import decode_stream

    stream = decode_stream(model, tokenizer, samples, max_new_tokens=6, engine=engine)
    first = next(stream)
    stream.close()
    return first


def test_prefill_chunks_bound_tokens_padding_and_lanes():
    """Every sample in one chunk, longest first; a chunk of more than one sample holds at most ``budget`` padded
    tokens, of which at most a quarter padding, and at most PREFILL_LANES branches."""
    rng = random.Random(0)
    tokens = [rng.choice([1, 7, 30, 31, 200, 900]) for _ in range(400)]
    branches = [rng.randint(1, 8) for _ in range(400)]
    for budget in (1, 64, 1000, 8192, 10**6):
        take = [(row, pos) for row, pos in zip(range(1000, 1400), rng.sample(range(400), 400))]
        chunks = list(_prefill_chunks(take, tokens, branches, budget))
        assert sorted(rp for c in chunks for rp in c) == sorted(take)
        lengths = [tokens[pos] for c in chunks for _, pos in c]
        assert lengths == sorted(lengths, reverse=True)
        for c in chunks:
            n = [tokens[pos] for _, pos in c]
            if len(c) > 1:
                assert len(n) * n[0] <= budget and 4 * (len(n) * n[0] - sum(n)) <= budget
            assert sum(branches[pos] for _, pos in c) <= PREFILL_LANES
    few = [100, 100, 100, 90, 10, 10]
    assert [[pos for _, pos in c] for c in _prefill_chunks(list(enumerate(range(6))), few, [1] * 6, 400)] == [
        [0, 1, 2, 3], [4, 5]]  # 100 x 4 = 400 tokens with 10 padding; a fifth row would pass the budget


def test_prefill_budget_from_the_setting_the_device_and_its_free_memory(monkeypatch):
    model = tiny_model("qwen2")
    assert Engine(model).prefill_budget(50) == PREFILL_TOKENS["cpu"]
    assert Engine(model, EngineConfig(prefill_tokens=12)).prefill_budget(50) == 12
    engine = Engine(model)
    engine.device = torch.device("cuda")  # the sizing only: nothing runs
    per_token = prefill_bytes_per_token(model, 300)
    assert per_token == (8 * 64 + 4 * 128) * 4 + 32 * 300  # the tiny fp32 model: hidden 64, MLP 128
    for free, want in ((10**12, PREFILL_TOKENS["cuda"]), (2 * 1000 * per_token, 1000), (0, 1)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 10**13))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 0)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 0)
        assert engine.prefill_budget(300) == want


def test_small_prefill_chunks_decode_the_same(ids_tokenizer):
    """Prompts admitted in many small prefill forwards (padding and all): isolated, each branch is transformers'
    ``generate`` on its own prompt; columnar with 2D RoPE, each sample decodes as decoded alone."""
    model = tiny_model("qwen2")
    engine = Engine(model, EngineConfig(prefill_tokens=12))
    got = generate(model, ids_tokenizer, MORE, max_new_tokens=6, mask="isolated", engine=engine)
    assert engine.stats["prefills"] > len(MORE) // 2 and engine.stats["prefill_tokens"] == 12
    for s, r in zip(MORE, got, strict=True):
        for b, ids in zip(s["branches"], r["output_ids"], strict=True):
            assert ids == hf_generate(model, main_ids(s) + b["input_ids"], 6)
    patch_rope(model, 0.5)
    kw = dict(max_new_tokens=6, mask="columnar", branch_stride=32)
    alone = [generate(model, ids_tokenizer, [s], indices=[i], **kw)[0] for i, s in enumerate(MORE)]
    engine = Engine(model, EngineConfig(prefill_tokens=12))
    assert generate(model, ids_tokenizer, MORE, engine=engine, **kw) == alone


def test_running_branches_regroup_by_sample_in_order():
    rows = np.array([4, 4, 4, 0, 7, 7, 7, 7, 7, 2])  # the rows of the running branches, in lane order
    for C in (1, 2, 3, 5):
        at, size = _regroup(rows, C)
        expected, group = [], 0
        for r in dict.fromkeys(rows.tolist()):  # each sample from a group of its own, its branches in order
            n = int((rows == r).sum())
            expected += [group * C + j for j in range(n)]
            group += -(-n // C)
        assert at.tolist() == expected and size == group * C
    assert _regroup(np.zeros(0, dtype=np.int64), 2)[1] == 0


def test_buckets_bound_the_number_of_step_shapes():
    assert _buckets(256) == [256, 128, 64, 32, 16, 8, 4, 2, 1]
    assert _buckets(37) == [37, 18, 9, 4, 2, 1]
    assert [_bucket_for(n, 37) for n in (1, 2, 3, 5, 9, 10, 19, 37)] == [1, 2, 4, 9, 9, 18, 37, 37]


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_cuda_graphs_equal_the_cpu_engine_fp32(arch, ids_tokenizer):
    model = tiny_model(arch)
    patch_rope(model, 0.5)
    _with_stops(model, ids_tokenizer)
    kw = dict(max_new_tokens=24, branch_stride=16, stop_token_ids=list(range(3, 256, 5)))  # many stop ids
    for mask in ("columnar", "isolated"):
        ref = generate(model, ids_tokenizer, MORE, mask=mask, **kw)
        cuda = model.cuda()
        engine = Engine(cuda, EngineConfig(max_rows=4))
        for _ in range(2):  # the second call replays the graphs captured by the first
            got = generate(cuda, ids_tokenizer, MORE, mask=mask, engine=engine, **kw)
            assert engine.stats["graphs"] >= 1
            assert [r["output_ids"] for r in got] == [r["output_ids"] for r in ref]
        engine.release()
        model = model.cpu()
    plain = tiny_model(arch).cuda()
    results = generate(plain, ids_tokenizer, MORE, max_new_tokens=12, batch_size=3)
    for s, r in zip(MORE, results, strict=True):
        for b, got in zip(s["branches"], r["output_ids"], strict=True):
            assert got == hf_generate(plain, main_ids(s) + b["input_ids"], 12)
