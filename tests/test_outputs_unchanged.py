"""Output files do not change under refactoring: the shipped examples and generated rows, decoded by a
tiny random model (greedy, and sampled with every layout option), must give the bytes recorded in
``tests/data/golden/`` when those were written (``PMACCEL_UPDATE_GOLDEN=1`` rewrites them; do that only
for a change that means to change outputs, and say so in its commit)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from helpers_infer import MIXED_ROWS, WORDS, save_tiny_model, write_jsonl

import pmaccel
from pmaccel.rows import example_path

GOLDEN = Path(__file__).parent / "data" / "golden"
RUNS = {
    "greedy": dict(max_new_tokens=12, branches_per_sample=2),
    "sampled": dict(max_new_tokens=12, temperature=0.9, top_p=0.8, top_k=20, repetition_penalty=1.2, seed=7,
                    random_time_offset=True, align="right", interleave_branches=False, patch_rope=True,
                    branch_stride=16, max_branches_per_sample=3, min_branches_per_sample=1),
}


def _rows() -> list[dict]:
    rng = random.Random(11)
    words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    shipped = [json.loads(line) for line in example_path().read_text().splitlines() if line.strip()]
    made = [{"id": f"g{i}", "main": words(rng.randint(0, 9)), "branches": [words(rng.randint(1, 6))
                                                                            for _ in range(rng.randint(1, 4))]}
            for i in range(6)]
    return shipped + MIXED_ROWS + made


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    return save_tiny_model(root / "model"), write_jsonl(root / "rows.jsonl", _rows()), root


@pytest.mark.parametrize("name", sorted(RUNS))
def test_output_bytes_are_unchanged(setup, name):
    model, rows, root = setup
    out = root / f"{name}.jsonl"
    pmaccel.infer(base_model=str(model), data_path=str(rows), out_path=str(out), **RUNS[name])
    golden = GOLDEN / f"{name}.jsonl"
    if os.environ.get("PMACCEL_UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_bytes(out.read_bytes())
    assert out.read_bytes() == golden.read_bytes(), f"{name}: the output file changed"
