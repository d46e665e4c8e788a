"""pmaccel.samples: main and each branch tokenized on their own (never joined), clear errors for bad
samples, and a scored branch's prompt / target split (``target``, ``answer_offset``)."""

from __future__ import annotations

import pytest

from pmaccel.errors import PMAccelError
from pmaccel.samples import is_token_ids, split_branch, tokenize_for_scoring, tokenize_sample


class _WordTok:
    """A whitespace tokenizer over a fixed vocabulary."""

    def __init__(self):
        self.vocab = {}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab.setdefault(w, len(self.vocab) + 1) for w in text.split()]}


def test_tokenize_keeps_main_and_branches_separate():
    tok = _WordTok()
    ts = tokenize_sample({"main": "a b", "branches": ["c", {"text": "d e"}, {"input_ids": [42]}]}, tok)
    assert ts.main == [1, 2] and ts.branches == [[3], [4, 5], [42]]


@pytest.mark.parametrize(
    "sample, match",
    [
        ({"branches": []}, "branch list is empty"),
        ({"branches": "abc"}, "branches must be a list"),
        ({"main": "x"}, "branches must be a list"),
        ({"branches": ["ok", "   "]}, r"branches\[1\]: branch is empty after tokenization"),
        ({"branches": [3]}, r"branches\[0\]: branch must be a string"),
        ({"branches": [{"input_ids": ["a"]}]}, "input_ids must be a list of integers"),
        ({"branches": [{"input_ids": [1, True]}]}, "input_ids must be a list of integers"),
        ({"branches": [{"input_ids": [1, 2.0]}]}, "input_ids must be a list of integers"),
        ({"branches": ["x"], "main": {"input_ids": [1, None]}}, r"main\.input_ids: input_ids must be"),
        ({"main": 5, "branches": ["x"]}, "main must be a string"),
        ({"main": {"input_ids": None}, "branches": ["x"]}, r"^main: main must be a string, \{'text'"),
    ],
)
def test_bad_samples_raise_clear_errors(sample, match):
    with pytest.raises(PMAccelError, match=match):
        tokenize_sample(sample, _WordTok())


def test_split_branch_reads_target_and_answer_offset():
    assert split_branch("all of it", 0) == ("", "all of it")
    assert split_branch({"text": "Q: A", "answer_offset": 3}, 0) == ("Q: ", "A")
    assert split_branch({"text": "p", "target": [7, 8]}, 1) == ("p", [7, 8])
    with pytest.raises(PMAccelError, match=r"branches\[2\]: give a target or an answer_offset, not both"):
        split_branch({"text": "ab", "target": "b", "answer_offset": 1}, 2)
    with pytest.raises(PMAccelError, match="leaves no answer"):
        split_branch({"text": "ab", "answer_offset": 2}, 0)


def test_tokenize_for_scoring_tokenizes_prompt_and_target_apart():
    tok = _WordTok()
    st = tokenize_for_scoring({"main": "q", "branches": [{"text": "p r", "target": "t"}, " u v"]}, tok)
    assert st.main == [1] and st.prompts == [[2, 3], []] and st.targets == [[4], [5, 6]]
    assert st.num_tokens == 6
    with pytest.raises(PMAccelError, match="nothing comes before the target"):
        tokenize_for_scoring({"branches": ["x"]}, tok)


def test_is_token_ids():
    assert is_token_ids([1, 2]) and is_token_ids((3,)) and is_token_ids([])
    assert not is_token_ids("12") and not is_token_ids([1, True]) and not is_token_ids([1.0])
