"""The fast path (static KV slots, fixed-shape steps, CUDA graphs on GPU) against the references."""

import pytest
import torch
from conftest import ids_sample, tiny_model
from test_decode import SAMPLES, hf_generate, main_ids

from pmaccel import generate
from pmaccel.errors import PMAccelError
from pmaccel.rope import patch_rope

MORE = SAMPLES + [ids_sample([60, 61], [62], [63, 64], [65, 66, 67], [68], [69, 70]), ids_sample(None, [71, 72])]


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "phi3"])
def test_fast_equals_hf_generate_isolated(arch, ids_tokenizer):
    model = tiny_model(arch)
    results = generate(model, ids_tokenizer, MORE, max_new_tokens=9, batch_size=4, fast=True)
    for s, r in zip(MORE, results, strict=True):
        for b, got in zip(s["branches"], r["output_ids"], strict=True):
            assert got == hf_generate(model, main_ids(s) + b["input_ids"], 9)


@pytest.mark.parametrize("mask, align", [("columnar", "right"), ("columnar", "left"), ("isolated", "left")])
@pytest.mark.parametrize("sampled", [False, True])
def test_fast_equals_reference_path(mask, align, sampled, ids_tokenizer):
    model = tiny_model("qwen2")
    patch_rope(model, 0.5)
    free = generate(model, ids_tokenizer, MORE, max_new_tokens=4)
    model.generation_config.eos_token_id = free[0]["output_ids"][0][1]  # some branches stop early
    kw = dict(max_new_tokens=20, mask=mask, align=align, seed=5, temperature=0.9 if sampled else 0.0,
              top_k=40, top_p=0.9, branch_stride=32)
    ref = generate(model, ids_tokenizer, MORE, batch_size=3, fast=False, **kw)
    for batch_size in (4, 5, 8):  # 8: two padding rows beyond the 6 samples; 4 and 5: two batches each
        got = generate(model, ids_tokenizer, MORE, batch_size=batch_size, fast=True, **kw)
        assert [r["output_ids"] for r in got] == [r["output_ids"] for r in ref]
        assert [r["finish_reasons"] for r in got] == [r["finish_reasons"] for r in ref]
    assert any("stop" in r["finish_reasons"] for r in ref)


def test_fast_path_refuses_what_it_cannot_do(ids_tokenizer):
    model = tiny_model("llama")
    with pytest.raises(PMAccelError, match="fast path"):
        generate(model, ids_tokenizer, SAMPLES, repetition_penalty=1.2, fast=True)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_cuda_graph_path_equals_references_fp32(arch, ids_tokenizer):
    model = tiny_model(arch).cuda()
    patch_rope(model, 0.5)
    kw = dict(max_new_tokens=24, branch_stride=16)
    for mask in ("columnar", "isolated"):
        ref = generate(model, ids_tokenizer, MORE, mask=mask, fast=False, **kw)
        for _ in range(2):  # the second run replays the captured graph
            got = generate(model, ids_tokenizer, MORE, mask=mask, fast=True, batch_size=4, **kw)
            assert [r["output_ids"] for r in got] == [r["output_ids"] for r in ref]
    plain = tiny_model(arch).cuda()
    results = generate(plain, ids_tokenizer, MORE, max_new_tokens=12, fast=True)
    for s, r in zip(MORE, results, strict=True):
        for b, got in zip(s["branches"], r["output_ids"], strict=True):
            assert got == hf_generate(plain, main_ids(s) + b["input_ids"], 12)


@pytest.mark.gpu
def test_compiled_cuda_graph_path_equals_reference_fp32(ids_tokenizer, monkeypatch):
    from pmaccel import fast

    monkeypatch.setattr(fast, "COMPILE", True)
    model = tiny_model("qwen2").cuda()
    patch_rope(model, 0.5)
    kw = dict(max_new_tokens=16, branch_stride=16, mask="columnar")
    ref = generate(model, ids_tokenizer, MORE, fast=False, **kw)
    got = generate(model, ids_tokenizer, MORE, fast=True, batch_size=8, **kw)
    assert [r["output_ids"] for r in got] == [r["output_ids"] for r in ref]
