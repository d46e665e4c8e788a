"""The real embedded SmolLM2-135M-Instruct: the engine against transformers' generate, and a known answer."""

import pytest
import torch

from pmaccel import generate
from pmaccel.samples import tokenize_sample

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Name a primary colour.",
    "What is 2 + 2?",
    "Write one word that rhymes with cat.",
]


def _chat_ids(tokenizer, content):
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)


@pytest.mark.parametrize("main", ["", "Answer in one short sentence."])
def test_chat_template_branches_equal_hf_generate(smollm2, main):
    model, tok = smollm2
    sample = {"main": main, "branches": QUESTIONS}
    ts = tokenize_sample(sample, tok, chat_template=True)
    assert len(ts.main) > 5  # the shared system/user prefix became main
    r = generate(model, tok, [sample], max_new_tokens=16, chat_template=True)[0]
    for q, got, why in zip(QUESTIONS, r["output_ids"], r["finish_reasons"], strict=True):
        x = torch.tensor([_chat_ids(tok, f"{main}\n\n{q}" if main else q)])
        ref = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False)
        ref = ref[0, x.shape[1]:].tolist()
        if why == "stop":
            assert ref == got + [tok.eos_token_id]
        else:
            assert ref == got


def test_capital_of_france_is_paris(smollm2):
    model, tok = smollm2
    r = generate(model, tok, [{"branches": QUESTIONS}], max_new_tokens=20, chat_template=True)[0]
    assert "Paris" in r["outputs"][0]
    assert r["finish_reasons"][0] == "stop"
