"""Helpers for the infer / rows / CLI tests: a tiny random Llama with a real word-level tokenizer,
saved like any Hugging Face model directory, and small input files."""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def repo_path(*more: str | os.PathLike[str]) -> str:
    """The ``PYTHONPATH`` of a test's subprocess: this checkout (then ``more``) ahead of the caller's own entries
    (where a developer's environment finds its packages)."""
    own = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    return os.pathsep.join([str(REPO), *map(str, more), *own])

WORDS = (
    "the a an of to and in is was it that for on with as by at from this be are or his her they we you "
    "i he she one two three four five six seven eight nine ten cat dog bird fish tree sea sky sun moon "
    "star red blue green big small old new good bad day night time year city river road house book "
    "question answer capital france paris germany berlin italy rome once upon there lived who what why "
    "how when where which story tips learn program start practice read write colour clear"
).split()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def make_tokenizer():
    """A word-level fast tokenizer over ``WORDS`` (unknown words -> ``<unk>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + list(dict.fromkeys(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def save_tiny_model(path: Path, seed: int = 0) -> Path:
    """Save a 2-layer random Llama (fp32) and its tokenizer to ``path``; EOS is ``</s>``."""
    import torch
    import transformers

    tokenizer = make_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # make EOS likely enough that some branches stop early
        model.lm_head.weight[2] *= 2
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


# 4 parallel rows + 6 flat rows; with branches_per_sample=2 that is 7 samples
MIXED_ROWS = [
    {"id": "p0", "main": "once upon a time there lived", "branches": ["a cat who", "a dog who", "an old bird"]},
    {"id": "p1", "main": "", "branches": ["the capital of france is", {"text": "the capital of italy is"}]},
    {"id": "p2", "main": "question what colour is the sky answer", "branches": ["the sky is", "it is"],
     "answer_offset": 3},
    {"id": "p3", "main": "two tips to learn", "branches": [{"input_ids": [10, 11, 12]}, "start to read"]},
    {"id": "f0", "text": "the sun and the moon"},
    {"id": "f1", "prompt": "a big red house"},
    {"id": "f2", "text": "the river is"},
    {"id": "f3", "input_ids": [20, 21, 22, 23]},
    {"id": "f4", "text": "one two three"},
    {"id": "f5", "text": "the city at night"},
]


def _call_in_rank(fn, kwargs):  # runs in each forked process
    fn(**kwargs)


def launch(fn, num_processes, **kwargs):
    """``fn(**kwargs)`` (``infer`` or ``score``) in one process, or in several forked CPU ranks with
    accelerate's ``debug_launcher`` (gloo)."""
    if num_processes == 1:
        return fn(**kwargs)
    import pytest
    import torch

    if torch.cuda.is_initialized():  # a GPU test ran before, in this process
        # a forked rank cannot use CUDA, and torch's gloo barrier (accelerate's wait_for_everyone) does
        pytest.skip("debug_launcher forks this process, which has started CUDA")
    from accelerate import debug_launcher
    from accelerate.state import AcceleratorState, PartialState

    # forked ranks must not inherit this process's (single-process) Accelerate state
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    try:
        debug_launcher(_call_in_rank, args=(fn, kwargs), num_processes=num_processes)
    finally:
        AcceleratorState._reset_state(True)
        PartialState._reset_state()


def hf_alone(model, tok, rows, max_new_tokens: int) -> list[list[list[int]]]:
    """Independent reference: each branch of each row continued alone by transformers' greedy
    ``model.generate`` on main + branch ids; the ids generated before the first EOS."""
    import torch

    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    out = []
    for row in rows:
        main_ids = tok(row.get("main", ""), add_special_tokens=False)["input_ids"]
        per_branch = []
        for branch in row["branches"]:
            ids = torch.tensor([main_ids + tok(branch, add_special_tokens=False)["input_ids"]])
            new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
            per_branch.append(new[:next((i for i, t in enumerate(new) if t in eos), len(new))])
        out.append(per_branch)
    return out


def rank() -> int:
    """This process's rank under a launcher (0 alone)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def log_collectives(monkeypatch, log):
    """Record, per rank, what each collective carries (forked ranks inherit the patches): ``gather_object``
    (to every rank) and ``distribute.gather_to_main`` (to the main process). Returns a reader of the log."""
    import os

    import accelerate.utils

    from pmaccel import distribute

    def note(kind, payload):
        with open(log, "a") as f:
            f.write(json.dumps({"rank": rank(), "kind": kind,
                                "payload": json.dumps(payload, default=str)}) + "\n")

    real_gather, real_to_main = accelerate.utils.gather_object, distribute.gather_to_main
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda obj: (note("gather_object", obj), real_gather(obj))[1])
    monkeypatch.setattr(distribute, "gather_to_main",
                        lambda acc, value: (note("to_main", value), real_to_main(acc, value))[1])
    return lambda: [json.loads(line) for line in open(log)] if os.path.exists(log) else []
