"""Samples → token ids: the text of ``main`` and each branch, tokenized separately (SPEC §1).

A *sample* is ``{"main": str, "branches": [str | {"text": str} | {"input_ids": [int]}, ...]}``.
Tokenization never joins texts: main's ids and each branch's ids are produced on their own and
packed side by side later (see ``pmaccel.layout``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pmaccel.errors import PMAccelError


@dataclass(frozen=True)
class TokenizedSample:
    """Token ids of one sample: the shared ``main`` (may be empty) and one list per branch."""

    main: list[int]
    branches: list[list[int]]

    @property
    def num_tokens(self) -> int:
        return len(self.main) + sum(len(b) for b in self.branches)


def _branch_text_or_ids(branch: Any, k: int) -> str | list[int]:
    if isinstance(branch, str):
        return branch
    if isinstance(branch, Mapping):
        if "input_ids" in branch and branch["input_ids"] is not None:
            ids = branch["input_ids"]
            if not isinstance(ids, Sequence) or isinstance(ids, str) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in ids
            ):
                raise PMAccelError("input_ids must be a list of integers", field=f"branches[{k}].input_ids")
            return list(ids)
        if isinstance(branch.get("text"), str):
            return branch["text"]
    raise PMAccelError(
        f"branch must be a string, {{'text': str}} or {{'input_ids': [int]}}, got {type(branch).__name__}",
        field=f"branches[{k}]",
    )


def _main_text_or_ids(main: Any) -> str | list[int]:
    if main is None:
        return ""
    if isinstance(main, str):
        return main
    if isinstance(main, Mapping) and "input_ids" in main:
        return _branch_text_or_ids(main, 0)
    raise PMAccelError(f"main must be a string, got {type(main).__name__}", field="main")


def _encode(tokenizer: Any, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _common_prefix_len(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = seqs[0][i]
        if any(s[i] != t for s in seqs[1:]):
            return i
    return n


def tokenize_sample(sample: Mapping[str, Any], tokenizer: Any, *, chat_template: bool = False) -> TokenizedSample:
    """Turn one sample into token ids (SPEC §1).

    Args:
        sample: ``{"main": str (optional), "branches": [...]}``.
        tokenizer: a Hugging Face tokenizer.
        chat_template: wrap each branch ``main + "\\n\\n" + branch`` in the tokenizer's chat template
            (one user turn, generation prompt added); main becomes the longest common token prefix of
            the branches (every branch keeps at least one token of its own).

    Returns:
        The sample's ``TokenizedSample``.

    Raises:
        PMAccelError: no branches, a malformed branch, or a branch with no tokens.

    Example:
        >>> ts = tokenize_sample({"main": "Q:", "branches": ["a", "b"]}, tokenizer)  # doctest: +SKIP
    """
    if not isinstance(sample, Mapping):
        raise PMAccelError(f"a sample must be a mapping with 'branches', got {type(sample).__name__}")
    branches = sample.get("branches")
    if not isinstance(branches, Sequence) or isinstance(branches, str | bytes):
        raise PMAccelError("branches must be a list", field="branches")
    if len(branches) == 0:
        raise PMAccelError("the branch list is empty; give at least one branch", field="branches")
    main = _main_text_or_ids(sample.get("main"))
    items = [_branch_text_or_ids(b, k) for k, b in enumerate(branches)]

    if chat_template:
        if not isinstance(main, str) or not all(isinstance(x, str) for x in items):
            raise PMAccelError("chat_template needs text, not input_ids, in main and branches", field="branches")
        if getattr(tokenizer, "chat_template", None) is None:
            raise PMAccelError("the tokenizer has no chat template; run without chat_template", field="chat_template")
        full = []
        for x in items:
            content = f"{main}\n\n{x}" if main else x
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
            if isinstance(ids, Mapping):  # some tokenizers return a BatchEncoding regardless
                ids = ids["input_ids"]
            full.append(list(ids))
        if len(full) == 1:
            main_ids, branch_ids = [], full
        else:
            # every branch keeps at least one token of its own
            n = min(_common_prefix_len(full), min(len(f) for f in full) - 1)
            main_ids, branch_ids = full[0][:n], [f[n:] for f in full]
    else:
        main_ids = _encode(tokenizer, main) if isinstance(main, str) else main
        branch_ids = [_encode(tokenizer, x) if isinstance(x, str) else x for x in items]

    for k, ids in enumerate(branch_ids):
        if len(ids) == 0:
            raise PMAccelError("branch is empty after tokenization; give it some text", field=f"branches[{k}]")
    return TokenizedSample(main=list(main_ids), branches=[list(b) for b in branch_ids])
