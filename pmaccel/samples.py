"""Samples → token ids: the text of ``main`` and each branch, tokenized separately (SPEC §1).

A *sample* is ``{"main": str, "branches": [str | {"text": str} | {"input_ids": [int]}, ...]}``.
Tokenization never joins texts: main's ids and each branch's ids are produced on their own and
packed side by side later (see ``pmaccel.layout``).

    tokenize_sample       a sample to decode -> ``TokenizedSample`` (main, branches)
    tokenize_for_scoring  a sample to score -> ``ScoreTokens`` (main, each branch's prompt and target;
                          ``split_branch`` reads ``target`` / ``answer_offset``)
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


def _all_ints(ids: Sequence) -> bool:
    """Every item an ``int`` and none a ``bool`` (the types are gathered in C first: the usual all-int list
    costs no Python per item)."""
    return set(map(type, ids)) <= {int} or all(isinstance(t, int) and not isinstance(t, bool) for t in ids)


def _branch_text_or_ids(branch: Any, field: str) -> str | list[int]:
    if isinstance(branch, str):
        return branch
    if isinstance(branch, Mapping):
        if "input_ids" in branch and branch["input_ids"] is not None:
            ids = branch["input_ids"]
            if not isinstance(ids, Sequence) or isinstance(ids, str) or not _all_ints(ids):
                raise PMAccelError("input_ids must be a list of integers", field=f"{field}.input_ids")
            return list(ids)
        if isinstance(branch.get("text"), str):
            return branch["text"]
    what = "main" if field == "main" else "branch"
    raise PMAccelError(
        f"{what} must be a string, {{'text': str}} or {{'input_ids': [int]}}, got {type(branch).__name__}",
        field=field,
    )


def _main_text_or_ids(main: Any) -> str | list[int]:
    if main is None:
        return ""
    if isinstance(main, str):
        return main
    if isinstance(main, Mapping) and "input_ids" in main:
        return _branch_text_or_ids(main, "main")
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
    items = [_branch_text_or_ids(b, f"branches[{k}]") for k, b in enumerate(branches)]

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


# ----------------------------------------------------------------------------- samples to score


@dataclass(frozen=True)
class ScoreTokens:
    """Token ids of one sample to score: main, and each branch's prompt and target."""

    main: list[int]
    prompts: list[list[int]]
    targets: list[list[int]]

    @property
    def num_tokens(self) -> int:
        return len(self.main) + sum(len(p) + len(t) for p, t in zip(self.prompts, self.targets))


def split_branch(branch: Any, k: int) -> tuple[str | list[int], str | list[int]]:
    """A branch's (prompt, target), each text or ids (SPEC §1 branch forms plus ``target`` /
    ``answer_offset``; see the module docstring).

    Raises:
        PMAccelError: both ``target`` and ``answer_offset``, an ``answer_offset`` on ids or past the text.
    """
    name = f"branches[{k}]"
    if isinstance(branch, str):
        return "", branch
    if not isinstance(branch, Mapping):
        raise PMAccelError(f"a branch to score must be a string or an object, got {type(branch).__name__}",
                           field=name)
    prompt = branch["input_ids"] if branch.get("input_ids") is not None else branch.get("text") or ""
    target, offset = branch.get("target"), branch.get("answer_offset")
    if target is not None and offset is not None:
        raise PMAccelError("give a target or an answer_offset, not both", field=name)
    if target is not None:
        if not (isinstance(target, str) or is_token_ids(target)):
            raise PMAccelError(f"target must be a string or a list of token ids, got {type(target).__name__}",
                               field=f"{name}.target")
        return prompt, target
    if offset is not None:
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise PMAccelError(f"answer_offset must be a character offset (an integer >= 0), got {offset!r}",
                               field=f"{name}.answer_offset")
        if not isinstance(prompt, str):
            raise PMAccelError("answer_offset is a character offset into text; give text, not input_ids",
                               field=f"{name}.answer_offset")
        if not 0 <= offset < len(prompt):
            raise PMAccelError(f"answer_offset {offset} leaves no answer in a text of {len(prompt)} characters",
                               field=f"{name}.answer_offset")
        return prompt[:offset], prompt[offset:]
    return "", prompt  # no target: the whole branch is scored, given main


def tokenize_for_scoring(sample: Mapping[str, Any], tokenizer: Any, *, chat_template: bool = False) -> ScoreTokens:
    """Main, prompts and targets of one sample, each tokenized on its own (no special tokens).

    With ``chat_template`` the prompts are wrapped like ``generate`` wraps branches (``main`` and the
    prompt in one user turn, generation prompt added; main becomes the common prefix) and the target
    follows as the start of the assistant's reply.

    Raises:
        PMAccelError: an empty target, or a branch whose first target token has nothing before it.

    Example:
        >>> st = tokenize_for_scoring({"main": "Q:", "branches": [" yes", " no"]}, tokenizer)  # doctest: +SKIP
        >>> st.prompts, len(st.targets)  # doctest: +SKIP
        ([[], []], 2)
    """
    branches = sample.get("branches")
    if not isinstance(branches, Sequence) or isinstance(branches, str | bytes) or not branches:
        raise PMAccelError("branches must be a non-empty list", field="branches")
    main = sample.get("main") or ""
    if isinstance(main, Mapping) and main.get("input_ids") is not None:
        main = list(main["input_ids"])
    if not isinstance(main, str | list):
        raise PMAccelError(f"main must be a string, got {type(main).__name__}", field="main")
    pairs = [split_branch(b, k) for k, b in enumerate(branches)]
    if chat_template:
        if not isinstance(main, str) or not all(isinstance(p, str) for p, _ in pairs):
            raise PMAccelError("chat_template needs text, not input_ids, in main and branches", field="branches")
        ts = tokenize_sample({"main": main, "branches": [p for p, _ in pairs]}, tokenizer, chat_template=True)
        main_ids, prompts = ts.main, ts.branches
    else:
        main_ids = _encode(tokenizer, main) if isinstance(main, str) else main
        prompts = [_encode(tokenizer, p) if isinstance(p, str) else list(p) for p, _ in pairs]
    targets = [_encode(tokenizer, t) if isinstance(t, str) else list(t) for _, t in pairs]
    for k, (prompt, target) in enumerate(zip(prompts, targets)):
        if not target:
            raise PMAccelError("the target is empty after tokenization; give it some text", field=f"branches[{k}]")
        if not prompt and not main_ids:
            raise PMAccelError("nothing comes before the target, so its first token cannot be scored; give the "
                               "branch a prompt (text + target) or the row a main", field=f"branches[{k}]")
    return ScoreTokens(main=main_ids, prompts=prompts, targets=targets)


def is_token_ids(value: Any) -> bool:
    """Whether ``value`` is a list of token ids (ints, not bools), as rows and targets may carry."""
    return isinstance(value, Sequence) and not isinstance(value, str | bytes) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)
