"""pmaccel.request: one front end from a sample (and a run's settings) to the packed request."""

from __future__ import annotations

import inspect
import random

import pytest
import torch
from helpers_infer import make_tokenizer

from pmaccel.decode import generate
from pmaccel.errors import PMAccelError
from pmaccel.layout import pack_sample
from pmaccel.request import Layout, generate_kwargs, pack_request, sample_seed, score_kwargs
from pmaccel.samples import tokenize_sample
from pmaccel.scoring import score_samples
from pmaccel.settings import Settings, default


def test_layout_defaults_are_the_settings_defaults():
    s = Settings()
    assert Layout() == Layout.of(s)
    assert Layout().branch_stride == s.branch_stride == default("branch_stride")
    assert Layout.of({"align": "right", "seed": 3}) == Layout(align="right", seed=3)
    with pytest.raises(PMAccelError, match="align must be one of left, right"):
        Layout(align="middle")


def test_pack_request_is_tokenize_then_pack_with_the_seeded_offsets():
    tok = make_tokenizer()
    sample = {"main": "once upon a time", "branches": ["a cat who", "the dog"]}
    layout = Layout(random_time_offset=True, seed=5, align="right", branch_stride=16)
    ts, packed = pack_request(sample, tok, layout, index=7)
    assert ts == tokenize_sample(sample, tok)
    again = pack_sample(ts, branch_stride=16, align="right", interleave_branches=True,
                        time_offset_rng=random.Random(sample_seed(5, 7)))
    assert torch.equal(packed.input_ids, again.input_ids) and torch.equal(packed.time, again.time)
    other = pack_request(sample, tok, layout, index=8)[1]  # another index: other offsets (this seed, these ids)
    assert not torch.equal(other.time, packed.time)
    with pytest.raises(PMAccelError, match="sample 4: .*branches"):
        pack_request({"main": "x", "branches": []}, tok, layout, index=4)


def test_settings_map_onto_generate_and_score_once():
    s = Settings(max_new_tokens=9, align="right", seed=2, deterministic=False)
    g, sc = generate_kwargs(s), score_kwargs(s)
    assert set(g) <= set(inspect.signature(generate).parameters)
    assert set(sc) <= set(inspect.signature(score_samples).parameters)
    assert g["max_new_tokens"] == 9 and g["align"] == sc["align"] == "right" and g["seed"] == sc["seed"] == 2
    for name, parameter in inspect.signature(generate).parameters.items():  # generate's defaults are Settings'
        if name in g:
            assert parameter.default == default(name), name
