"""Scoring (``pmaccel.score`` / ``pmaccel score``): teacher-forced log-likelihood under the packed layout,
checked against independent references (the model on ``main + prompt + target`` alone; a full forward
with a columnar mask built here), exact dataset perplexity over 1, 2 and 3 processes, resume, the CLI,
and multiple choice with the embedded SmolLM2 on the shipped easy set."""

from __future__ import annotations

import json
import math
import pickle
import random

import helpers_infer
import pytest
import torch
from conftest import IdsTokenizer, tiny_model
from helpers_infer import read_jsonl, save_tiny_model, write_jsonl

import pmaccel
import pmaccel.model
import pmaccel.scoring
from pmaccel.cli import main
from pmaccel.errors import PMAccelError
from pmaccel.rope import patch_rope
from pmaccel.scoring import ExactSum, mc_path, score, score_samples

STRIDE = 128


def ids(main, *branches):
    """A sample of token ids: ``branches`` are ``(prompt, target)`` pairs."""
    return {"main": {"input_ids": list(main)} if main else "",
            "branches": [{"input_ids": list(p), "target": list(t)} for p, t in branches]}


SAMPLES = [  # prompts of several lengths, an empty prompt (scored from main's last token), no main
    ids([5, 6, 7], ([8], [9, 10, 11]), ([], [12, 13]), ([14, 15, 16], [17])),
    ids([20, 21], ([22, 23], [24, 25, 26, 27])),
    ids([], ([30, 31], [32, 33]), ([34], [35, 36, 37])),
]


def reference_logprob(model, context: list[int], target: list[int]) -> float:
    """The model's own logits on ``context + target`` alone: sum of log p(target_j | everything before)."""
    x = torch.tensor([context + target])
    with torch.no_grad():
        lp = torch.log_softmax(model(x).logits[0].float(), dim=-1)  # [L, V]
    return sum(float(lp[len(context) - 1 + j, t]) for j, t in enumerate(target))


# ----------------------------------------------------------------------------- 1. against independent references


@pytest.mark.parametrize("batch_size", [1, 3])
def test_isolated_without_2d_rope_is_each_branch_alone(batch_size):
    model = tiny_model("llama")
    results = score_samples(model, IdsTokenizer(), SAMPLES, mask="isolated", batch_size=batch_size)
    for sample, result in zip(SAMPLES, results):
        main_ids = sample["main"]["input_ids"] if sample["main"] else []
        for k, b in enumerate(sample["branches"]):
            expected = reference_logprob(model, main_ids + b["input_ids"], b["target"])
            assert result["logprobs"][k] == pytest.approx(expected, abs=1e-4)
            assert result["num_target_tokens"][k] == len(b["target"])
            assert result["nlls"][k] == pytest.approx(-expected / len(b["target"]), abs=1e-4)


def hand_layout(main, branches):
    """Tokens of main then each branch (prompt + target) with (branch, time), sorted by (time, branch), and
    for every target token the packed index of the token before it in its branch (main's last for the first
    target token of a branch with no prompt)."""
    first = 1 if main else 0
    tokens = [(t, 0, i) for i, t in enumerate(main)]  # (id, branch, time)
    for k, (p, tg) in enumerate(branches):
        tokens += [(t, first + k, len(main) + j) for j, t in enumerate(p + tg)]
    order = sorted(range(len(tokens)), key=lambda i: (tokens[i][2], tokens[i][1]))
    packed = [tokens[i] for i in order]
    index = {(b, time): i for i, (_, b, time) in enumerate(packed)}
    scored = []
    for k, (p, tg) in enumerate(branches):
        b = first + k
        scored.append([(index[(b, len(main) + len(p) + j - 1)] if len(p) + j > 0 else index[(0, len(main) - 1)], t)
                       for j, t in enumerate(tg)])
    return packed, scored


def test_columnar_with_2d_rope_equals_a_full_forward_with_a_hand_built_mask():
    model = tiny_model("llama", seed=3)
    patch_rope(model, 0.5)
    results = score_samples(model, IdsTokenizer(), SAMPLES, mask="columnar", batch_size=3)
    for sample, result in zip(SAMPLES, results):
        main_ids = sample["main"]["input_ids"] if sample["main"] else []
        pairs = [(b["input_ids"], b["target"]) for b in sample["branches"]]
        packed, scored = hand_layout(main_ids, pairs)
        n = len(packed)
        time = torch.tensor([t for _, _, t in packed])
        mask = (time[None, :] < time[:, None]) | torch.eye(n, dtype=torch.bool)  # columnar: earlier columns, self
        additive = torch.where(mask, 0.0, torch.finfo(torch.float32).min)[None, None]
        positions = torch.tensor([[(i, b * STRIDE, t) for i, (_, b, t) in enumerate(packed)]])  # (pos1d, bpos, time)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[x for x, _, _ in packed]]), attention_mask=additive,
                           position_ids=positions).logits[0]
        lp = torch.log_softmax(logits.float(), dim=-1)
        for k, pairs_k in enumerate(scored):
            assert result["logprobs"][k] == pytest.approx(sum(float(lp[i, t]) for i, t in pairs_k), abs=1e-4)
    isolated = score_samples(model, IdsTokenizer(), SAMPLES, mask="isolated")
    assert isolated[0]["logprobs"] != pytest.approx(results[0]["logprobs"], abs=1e-4), "the mask matters"


def test_answer_offset_splits_the_text_and_tokenizes_both_parts_separately(tmp_path):
    model_dir = save_tiny_model(tmp_path / "tiny")
    model, tok = pmaccel.load_model(str(model_dir), device="cpu")
    text = "the capital of france is paris"
    cut = len("the capital of france is")
    by_offset = score_samples(model, tok, [{"main": "question", "branches": [{"text": text, "answer_offset": cut}]}])
    by_target = score_samples(model, tok, [{"main": "question", "branches": [{"text": text[:cut], "target": " paris"}]}])
    assert by_offset[0]["logprobs"] == by_target[0]["logprobs"] and by_offset[0]["num_target_tokens"] == [1]
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert by_offset[0]["logprobs"][0] == pytest.approx(
        reference_logprob(model, enc("question") + enc(text[:cut]), enc(" paris")), abs=1e-4)


@pytest.mark.parametrize("sample, message", [
    ({"main": "", "branches": [{"input_ids": [], "target": [3]}]}, "nothing comes before the target"),
    ({"main": "", "branches": ["the cat"]}, "nothing comes before the target"),
    ({"main": "a", "branches": [{"input_ids": [4], "target": []}]}, "the target is empty"),
    ({"main": "a", "branches": [{"text": "the cat", "answer_offset": 7}]}, "leaves no answer"),
    ({"main": "a", "branches": [{"text": "the cat", "target": "x", "answer_offset": 2}]}, "not both"),
    ({"main": "a", "branches": [{"input_ids": [4], "answer_offset": 1}]}, "give text, not input_ids"),
    ({"main": "a", "branches": [{"text": "the", "target": 5}]}, "target must be a string or a list of token ids"),
    ({"main": "a", "branches": [{"text": "the cat", "answer_offset": -1}]}, "must be a character offset"),
])
def test_bad_samples(sample, message, tmp_path):
    model = tiny_model("llama")
    from helpers_infer import make_tokenizer

    with pytest.raises(PMAccelError, match=message):
        score_samples(model, make_tokenizer(), [sample])


def test_infer_ignores_the_scoring_fields(tiny, tmp_path):
    """SPEC §1: ``answer_offset`` (and ``target``) are accepted and ignored by inference, whatever they hold."""
    rows = [{"text": "the cat", "answer_offset": "x"}, {"main": "a", "branches": [{"text": "dog", "target": 3}]}]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    records = pmaccel.infer(base_model=str(tiny), data_path=str(data), out_path=str(tmp_path / "o.jsonl"),
                            max_new_tokens=2)
    assert [r["answer_offset"] for r in records[:1]] == ["x"] and len(records[1]["outputs"]) == 1


# ----------------------------------------------------------------------------- 2. distribution: exact totals


ROWS = [  # 8 samples with branches_per_sample=2: parallel rows, an MC row, flat rows with targets
    {"id": "t0", "main": "once upon a time there lived", "branches": [
        {"text": "a cat", "target": "who was old"}, {"target": "a dog"}, {"text": "an old bird who is red", "answer_offset": 12}]},
    {"id": "t1", "main": "the capital of france is", "branches": [" paris", " rome", " berlin"], "label": 0},
    {"id": "t2", "main": "", "branches": [{"text": "the sky is", "target": "blue"}, {"text": "the sea", "target": "is green"}]},
    {"id": "t3", "main": "two tips to learn", "branches": [{"input_ids": [10, 11, 12], "target": [13, 14]}, "start to read"]},
    {"id": "f0", "text": "the sun and", "target": "the moon"},
    {"id": "f1", "prompt": "a big red", "target": "house"},
    {"id": "f2", "text": "the river is big", "answer_offset": 9},
    {"id": "f3", "text": "one two", "target": "three four five"},
    {"id": "f4", "input_ids": [20, 21, 22], "target": [23]},
    {"id": "f5", "text": "the city at", "target": "night"},
    {"id": "t4", "main": "what colour is the sky", "branches": [" blue", " red"], "label": 0},
]


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "score.jsonl", ROWS)


def single_loop_reference(model, tok, rows):
    """Perplexity by the book: every target branch alone through the model, summed over the dataset in one
    loop (multiple-choice rows are no targets: their wrong choices would count)."""
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"] if isinstance(s, str) else list(s)  # noqa: E731
    total, count = 0.0, 0
    for row in rows:
        if "label" in row:
            continue
        if "branches" in row:
            main_ids, branches = enc(row.get("main", "")), row["branches"]
        else:
            key = next(k for k in ("text", "prompt", "input_ids") if k in row)
            main_ids, branches = [], [{"text" if key != "input_ids" else "input_ids": row[key],
                                       **{k: row[k] for k in ("target", "answer_offset") if k in row}}]
        for b in branches:
            if isinstance(b, str):
                prompt, target = [], enc(b)
            elif "answer_offset" in b:
                prompt, target = enc(b["text"][:b["answer_offset"]]), enc(b["text"][b["answer_offset"]:])
            else:
                prompt, target = enc(b.get("input_ids", b.get("text", ""))), enc(b["target"])
            total += reference_logprob(model, main_ids + prompt, target)
            count += len(target)
    return math.exp(-total / count), count


def launch_score(num_processes, **kwargs):
    return helpers_infer.launch(score, num_processes, **kwargs)


def test_perplexity_is_the_same_on_1_2_and_3_processes_and_equals_a_single_loop(tiny, rows_file, tmp_path):
    common = dict(base_model=str(tiny), data_path=str(rows_file), branches_per_sample=2, batch_size=2)
    totals, files = {}, {}
    for n in (1, 2, 3):
        out = tmp_path / f"out{n}.jsonl"
        launch_score(n, out_path=str(out), **common)
        totals[n] = json.loads((tmp_path / f"out{n}.jsonl.summary.json").read_text())["totals"]
        files[n] = read_jsonl(out)
    model, tok = pmaccel.load_model(str(tiny), device="cpu")
    expected, tokens = single_loop_reference(model, tok, ROWS)
    for n in (1, 2, 3):
        assert totals[n]["tokens"] == tokens == 26  # 31 scored tokens, less the 5 of the multiple-choice rows
        assert totals[n]["perplexity"] == pytest.approx(expected, rel=1e-6)
        assert totals[n]["perplexity"] == pytest.approx(totals[1]["perplexity"], rel=1e-6)
        assert totals[n]["multiple_choice"]["rows"] == 2
        assert [r["id"] for r in files[n]] == [r["id"] for r in ROWS]
        for a, b in zip(files[n], files[1]):
            assert a.keys() == b.keys()
            assert a.get("logprobs", a.get("logprob")) == pytest.approx(b.get("logprobs", b.get("logprob")), abs=1e-5)
    print(f"perplexity {expected:.6f} over {tokens} tokens; 1/2/3 processes:",
          [totals[n]["perplexity"] for n in (1, 2, 3)])


def test_records_and_summary(tiny, rows_file, tmp_path):
    records = score(base_model=str(tiny), data_path=str(rows_file), out_path=str(tmp_path / "s.jsonl"),
                    branches_per_sample=2)
    assert records == read_jsonl(tmp_path / "s.jsonl")
    for row, rec in zip(ROWS, records):
        assert {k: rec[k] for k in row} == row  # the row's own fields, unchanged, first
        if "branches" in row:
            added = ["logprobs", "num_target_tokens", "nlls"] + (["prediction", "correct"] if "label" in row else [])
            assert list(rec)[len(row):] == added and len(rec["logprobs"]) == len(row["branches"])
            assert all(lp < 0 and nll == pytest.approx(-lp / n)
                       for lp, n, nll in zip(rec["logprobs"], rec["num_target_tokens"], rec["nlls"]))
            if "label" in row:
                assert rec["prediction"] == max(range(len(rec["logprobs"])), key=rec["logprobs"].__getitem__)
                assert rec["correct"] == (rec["prediction"] == row["label"])
        else:
            assert list(rec)[len(row):] == ["logprob", "num_target_tokens", "nll"]
    t = records.summary.totals
    lps = [x for row, r in zip(ROWS, records) if "label" not in row
           for x in (r["logprobs"] if "logprobs" in r else [r["logprob"]])]
    assert t["logprob"] == math.fsum(lps) and t["perplexity"] == pytest.approx(math.exp(-sum(lps) / t["tokens"]))
    assert t["multiple_choice"]["chance"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert "perplexity" in str(records.summary) and records.summary.job == "pmaccel score"
    summary = json.loads((tmp_path / "s.jsonl.summary.json").read_text())
    scored = sum(sum(n) if isinstance(n, list) else n for n in (r["num_target_tokens"] for r in records))
    assert summary["tokens"] == scored and summary["tokens_per_s"] > 0


def test_exact_sum_is_fsum_taken_a_value_at_a_time():
    rng = random.Random(0)
    for _ in range(500):
        xs = [rng.choice([-rng.expovariate(0.05), rng.uniform(-1, 1) * 10.0 ** rng.randint(-320, 300),
                          1e16, -1e16, 0.1, -0.1, 5e-324, -0.0]) for _ in range(rng.randint(0, 40))]
        total = ExactSum()
        for x in xs:
            total.add(x)
        assert total.value() == math.fsum(xs), xs
    total = ExactSum()
    for x in (-1.5, -math.inf, 2.0):
        total.add(x)
    assert total.value() == -math.inf


def test_score_totals_hold_running_sums_not_the_results():
    """The main process takes the totals as it writes the output: what they hold does not grow with the rows."""
    from pmaccel.grouping import Sample
    from pmaccel.rows import Row

    def totals_after(n):
        totals = pmaccel.scoring.ScoreTotals()
        for i in range(n):
            labelled = i % 3 == 0
            row = Row(number=i + 1, fields={"label": 1} if labelled else {}, flat=False, main="m", branches=["a", "b"])
            sample = Sample(index=i, rows=(i,), flat=False, main="m", branches=["a", "b"])
            totals.add(sample, {i: row}, {"logprobs": [-0.5 * (i % 7) - 0.2, -2.5], "num_target_tokens": [3, 2]})
        return totals

    small, large = totals_after(30), totals_after(3000)
    assert len(pickle.dumps(large)) - len(pickle.dumps(small)) < 16
    sums, _ = large.summary()
    targets = [i for i in range(3000) if i % 3]
    assert sums["tokens"] == 5 * len(targets) and sums["branches"] == 2 * len(targets)
    assert sums["logprob"] == math.fsum(x for i in targets for x in (-0.5 * (i % 7) - 0.2, -2.5))
    assert sums["multiple_choice"]["rows"] == 1000 and sums["multiple_choice"]["chance"] == pytest.approx(0.5)
    assert sums["multiple_choice"]["correct"] == sum(1 for i in range(0, 3000, 3) if -0.5 * (i % 7) - 0.2 < -2.5) > 0


def test_multiple_choice_alone_reports_accuracy_and_no_perplexity(tiny, tmp_path):
    rows = [row for row in ROWS if "label" in row]
    records = score(base_model=str(tiny), data_path=str(write_jsonl(tmp_path / "mc.jsonl", rows)),
                    out_path=str(tmp_path / "mc_out.jsonl"))
    totals = records.summary.totals
    assert "perplexity" not in totals and totals["tokens"] == 0 and totals["multiple_choice"]["rows"] == 2
    assert "perplexity" not in str(records.summary) and "accuracy" in str(records.summary)


def test_length_normalize_picks_by_mean_log_prob(tiny, tmp_path):
    rows = [{"main": "the", "branches": [" cat", " big red old house"], "label": 1}]
    data = write_jsonl(tmp_path / "mc.jsonl", rows)
    by_sum = score(base_model=str(tiny), data_path=str(data), out_path=str(tmp_path / "a.jsonl"))[0]
    by_mean = score(base_model=str(tiny), data_path=str(data), out_path=str(tmp_path / "b.jsonl"),
                    length_normalize=True)[0]
    assert by_mean["logprobs"] == by_sum["logprobs"]
    means = [lp / n for lp, n in zip(by_sum["logprobs"], by_sum["num_target_tokens"])]
    assert by_sum["prediction"] == max(range(2), key=by_sum["logprobs"].__getitem__)
    assert by_mean["prediction"] == max(range(2), key=means.__getitem__)


def test_resume_after_a_crash_and_no_reuse_of_infer_results(tiny, rows_file, tmp_path, monkeypatch):
    common = dict(base_model=str(tiny), data_path=str(rows_file), out_path=str(tmp_path / "s.jsonl"),
                  branches_per_sample=2, batch_size=2)
    reference = (tmp_path / "ref.jsonl")
    score(**{**common, "out_path": str(reference)})
    real, calls = pmaccel.scoring.score_samples, {"n": 0, "samples": 0}

    def failing(model, tokenizer, samples, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected fault")
        calls["samples"] += len(samples)
        return real(model, tokenizer, samples, **kwargs)

    monkeypatch.setattr(pmaccel.scoring, "score_samples", failing)
    with pytest.raises(RuntimeError, match="injected fault"):
        score(**common)
    assert calls["samples"] == 4
    calls["samples"] = 0
    records = score(**common)
    assert records.summary.samples_resumed == 4 and calls["samples"] == 4
    assert (tmp_path / "s.jsonl").read_bytes() == reference.read_bytes()

    keys = pmaccel.output.sample_keys
    from pmaccel.grouping import Sample
    from pmaccel.settings import Settings

    s = [Sample(index=0, rows=(0,), flat=False, main="a", branches=["b"])]
    assert keys(s, Settings(), kind="score") != keys(s, Settings()), "infer results are never taken for scores"
    assert keys(s, Settings(), kind="score", ignore=pmaccel.scoring.DECODING_SETTINGS) == keys(
        s, Settings(temperature=0.7), kind="score", ignore=pmaccel.scoring.DECODING_SETTINGS)


# ----------------------------------------------------------------------------- CLI


def test_cli_score_subcommand(tiny, rows_file, tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    assert main(["score", "--base_model", str(tiny), "--data_path", str(rows_file), "--out_path", str(out),
                 "--branches_per_sample", "2"]) == 0
    assert "pmaccel score: 11 rows" in capsys.readouterr().out
    assert len(read_jsonl(out)) == len(ROWS) and (tmp_path / "cli.jsonl.summary.json").exists()
    assert main(["score", "--base_model", str(tiny), "--data_path", str(rows_file), "--out_path", str(out),
                 "--compare"]) == 2
    assert "compare: --compare belongs to pmaccel (inference), not to pmaccel score" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"main": "the", "branches": [" cat", " dog"], "label": 2}])
    assert main(["score", "--base_model", str(tiny), "--data_path", str(bad), "--out_path", str(out)]) == 2
    assert f"{bad}:1: label: label must be the index of the right choice, 0..1, got 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    help_text = capsys.readouterr().out
    assert "usage: pmaccel score" in help_text and "--length_normalize" in help_text and "--data_path" in help_text


def test_public_score_is_the_function():
    import importlib

    importlib.import_module("pmaccel.scoring")
    assert pmaccel.score is score and callable(pmaccel.score)


# ----------------------------------------------------------------------------- 3. multiple choice, SmolLM2


MARGIN = 0.35  # accuracy must beat chance by this much


@pytest.mark.slow
def test_multiple_choice_with_smollm2_beats_chance_and_computes_main_once(smollm2, tmp_path, monkeypatch):
    model, tok = smollm2
    monkeypatch.setattr(pmaccel.model, "load_model", lambda *a, **k: (model, tok))
    forwards = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: forwards.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        records = score(out_path=str(tmp_path / "mc.jsonl"), batch_size=1)  # no data_path: the shipped set
    finally:
        hook.remove()
    rows = read_jsonl(mc_path())
    mc = records.summary.totals["multiple_choice"]
    print(f"multiple choice on {mc_path().name}: accuracy {mc['accuracy']:.3f} ({mc['correct']}/{mc['rows']}), "
          f"chance {mc['chance']:.3f}")
    assert mc["rows"] == len(rows) >= 20 and mc["chance"] == pytest.approx(0.25)
    assert mc["accuracy"] >= mc["chance"] + MARGIN
    assert [r["correct"] for r in records] == [r["prediction"] == r["label"] for r in records]

    # one forward per row (batch_size=1), each of exactly main + every choice: the question is computed once
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    expected = sorted(len(enc(r["main"])) + sum(len(enc(c)) for c in r["branches"]) for r in rows)
    assert len(forwards) == len(rows)
    assert sorted(shape[1] for shape in forwards) == expected
    one_at_a_time = sum(len(enc(r["main"])) * len(r["branches"]) + sum(len(enc(c)) for c in r["branches"])
                        for r in rows)
    assert sum(expected) < one_at_a_time
