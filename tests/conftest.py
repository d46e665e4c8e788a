"""Shared fixtures: tiny random models of several architectures, an ids-only tokenizer, the real
embedded SmolLM2 model (loaded once per run), and the ``gpu`` marker's skip."""

from __future__ import annotations

import pytest
import torch
import transformers

VOCAB = 256


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_config(arch: str, **overrides) -> transformers.PretrainedConfig:
    """A 2-layer random model of a real architecture; EOS off unless overridden."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    extra = {
        "llama": {},
        "qwen2": {},
        "qwen3": {"head_dim": 16},
        "mistral": {"sliding_window": None},
        "gemma2": {"head_dim": 16, "sliding_window": 4096, "query_pre_attn_scalar": 16},
        "phi3": {},
        "phi3-partial": {"partial_rotary_factor": 0.5},
    }[arch]
    cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "mistral": transformers.MistralConfig,
        "gemma2": transformers.Gemma2Config,
        "phi3": transformers.Phi3Config,
        "phi3-partial": transformers.Phi3Config,
    }[arch]
    return cls(**{**common, **extra, **overrides})


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    attn = "eager" if arch == "gemma2" else "sdpa"  # gemma2's soft-capping needs eager attention
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), attn_implementation=attn)
    return model.float().eval()


class IdsTokenizer:
    """A tokenizer for pre-tokenized samples: text is never seen, decode spells the ids."""

    pad_token_id = 0
    eos_token_id = None
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        raise AssertionError("the tests give input_ids")

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


@pytest.fixture
def ids_tokenizer():
    return IdsTokenizer()


def ids_sample(main: list[int] | None, *branches: list[int]) -> dict:
    s = {"branches": [{"input_ids": list(b)} for b in branches]}
    if main:
        s["main"] = {"input_ids": list(main)}
    return s


# mixed samples: with and without main, unequal branch lengths, different branch counts
SAMPLES = [
    ids_sample([5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15], [16]),
    ids_sample(None, [20, 21, 22], [23]),
    ids_sample([30], [31, 32, 33, 34, 35, 36, 37], [38, 39], [40, 41, 42], [43]),
    ids_sample(None, [50, 51, 52, 53]),
]


def hf_generate(model, ids, n, eos=None, **kwargs):
    """transformers' own greedy generate on one unpadded row (``kwargs``: e.g. repetition_penalty)."""
    x = torch.tensor([ids], device=model.device)
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                         eos_token_id=eos, pad_token_id=0, **kwargs)
    return out[0, x.shape[1]:].tolist()


def main_ids(s):
    return s.get("main", {}).get("input_ids", [])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama and a word-level tokenizer saved as a model directory (tests/helpers_infer.py)."""
    from helpers_infer import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A JSONL file of parallel and flat rows (tests/helpers_infer.py's MIXED_ROWS)."""
    from helpers_infer import MIXED_ROWS, write_jsonl

    return write_jsonl(tmp_path_factory.mktemp("data") / "mixed.jsonl", MIXED_ROWS)


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded SmolLM2-135M-Instruct (fp32, CPU), loaded once for the whole run."""
    import pmaccel

    return pmaccel.load_model(dtype="float32", device="cpu")
