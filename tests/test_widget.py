"""pmaccel.inspect driven as a user drives it: pick a sample, search, toggle the mask, change the
settings, click Run and Save — and check what every view shows against an independent reference
(the tokenizer on each text alone, SPEC §3 token by token, ``pmaccel.generate``, the saved file).

A tiny random Llama with the embedded SmolLM2 tokenizer keeps it fast; the real model runs in
test_notebooks.py and test_browser.py.
"""

import html
import json
import subprocess
import sys

import datasets
import numpy as np
import pytest
from conftest import tiny_model

import pmaccel
from pmaccel.errors import PMAccelError
from pmaccel.measure import group_attention
from pmaccel.rope import patch_rope
from pmaccel.samples import tokenize_sample

RECORDS = [
    {"id": "capitals", "main": "Facts about capitals.\n", "branches": ["France:", "Italy:"],
     "outputs": [" Paris.", " Rome."], "finish_reasons": ["stop", "stop"], "num_generated_tokens": [2, 2]},
    {"id": "sums", "main": "", "branches": ["Two plus two is", "Three plus one is"],
     "outputs": [" four", " four"], "finish_reasons": ["length", "length"], "num_generated_tokens": [1, 1]},
    {"id": "story", "main": "Once upon a time", "branches": [" a fox", " a crow", " a cat"],
     "outputs": [" ran.", " sang.", " slept."], "finish_reasons": ["stop"] * 3, "num_generated_tokens": [2, 2, 2]},
    {"id": "colours", "main": "Name a colour.\nAnswer:", "branches": [" Red is", " The sky is", " Grass"],
     "outputs": [" warm & bright", " blue <always>", " is green\nand soft"], "finish_reasons": ["length"] * 3,
     "num_generated_tokens": [3, 3, 4]},
    {"id": "last", "main": "Hi", "branches": ["there"], "outputs": ["!"], "finish_reasons": ["stop"],
     "num_generated_tokens": [1]},
]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from pmaccel.embedded import embedded_model_dir

    return AutoTokenizer.from_pretrained(embedded_model_dir())


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model("llama", vocab_size=len(tok))


@pytest.fixture
def app(model, tok, tmp_path):
    return pmaccel.inspect(RECORDS, model, tok, save_path=tmp_path / "saved.jsonl", max_new_tokens=5)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"] if text else []


def _spec_allowed(time, branch, is_main, mode):  # SPEC §3, pair by pair
    n = len(time)
    out = np.zeros((n, n), dtype=bool)
    for i in range(n):
        for j in range(n):
            earlier = time[j] < time[i]
            out[i, j] = i == j or (earlier if mode == "columnar" else earlier and (branch[j] == branch[i] or is_main[j]))
    return out


@pytest.mark.slow
def test_picker_shows_the_sample_and_its_branches(app):
    assert app.picker.min == 0 and app.picker.max == len(RECORDS) - 1
    app.picker.value = 3
    rec = RECORDS[3]
    assert app.sample.index == 3 and app.sample.label == "id colours"
    assert html.escape(rec["main"]) in app.header.value
    assert app.branch_outputs() == rec["outputs"]
    assert len(app.output_widgets) == len(rec["branches"]) == len(app.branches_box.children)
    for k, out in enumerate(rec["outputs"]):
        shown = app.output_widgets[k].value
        assert html.escape(out) in shown
        assert f"finish: {rec['finish_reasons'][k]}" in shown
        assert f"generated {rec['num_generated_tokens'][k]} tokens" in shown
    for k, branch in enumerate(rec["branches"]):
        card = app.branches_box.children[k].children[0].value
        assert html.escape(branch) in card and f"prompt {len(_ids(app.tokenizer, branch))} tokens" in card


@pytest.mark.slow
def test_search_by_id_and_by_text(app):
    app.search.value = "story"
    assert app.picker.value == 2
    app.search.value = "SKY IS"
    assert app.picker.value == 3 and "found: sample 3" in app.search_status.value
    app.search.value = "no such thing"
    assert app.picker.value == 3 and "no sample matches" in app.search_status.value


@pytest.mark.slow
def test_grid_cells_are_the_tokens_by_time_and_branch(app, tok):
    app.picker.value = 3
    rec = RECORDS[3]
    main = _ids(tok, rec["main"])
    prompts = [_ids(tok, b) for b in rec["branches"]]
    outs = [_ids(tok, o) for o in rec["outputs"]]  # the records carry text only: re-tokenized
    width = len(main) + max(len(p) + len(o) for p, o in zip(prompts, outs))
    expected = [[tok.decode([t]) for t in main] + [""] * (width - len(main))]
    for p, o in zip(prompts, outs):
        row = [""] * len(main) + [tok.decode([t]) for t in p + o]
        expected.append(row + [""] * (width - len(row)))
    assert app.grid_times() == list(range(width))
    assert app.grid_cells() == expected
    assert app.group_labels == ["main", "branch 1", "branch 2", "branch 3"]
    assert app.retokenized and "re-tokenized" in app.grid_html.value
    assert app.grid_html.value.count("font-weight:bold") == sum(map(len, outs))  # generated cells stand out
    app.picker.value = 1  # no main: the branches start at time 0
    assert app.group_labels == ["branch 1", "branch 2"]
    assert app.grid_cells()[0][0] == tok.decode([_ids(tok, RECORDS[1]["branches"][0])[0]])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["isolated", "columnar"])
def test_mask_heatmap_follows_the_spec_rule(app, mode):
    app.picker.value = 3
    other = "columnar" if mode == "isolated" else "isolated"
    app.mask.value = other
    before = app.mask_image.value
    app.mask.value = mode
    p = app.packed
    spec = _spec_allowed(p.time.tolist(), p.branch.tolist(), p.is_main.tolist(), mode)
    assert np.array_equal(app.mask_matrix, spec)
    assert app.mask_image.value[:4] == b"\x89PNG" and app.mask_image.value != before


@pytest.mark.slow
def test_leakage_rows_sum_to_one_and_isolated_is_zero_off_branch(app, model):
    app.picker.value = 3
    app.mask.value = "isolated"
    m = app.leakage_matrix
    assert m.shape == (4, 4)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-5)
    off = m.copy()
    off[:, 0] = 0  # main may be attended
    np.fill_diagonal(off, 0)  # and the branch itself
    assert np.count_nonzero(off) == 0 and (m[1:, 0] > 0).all()
    app.mask.value = "columnar"
    m = app.leakage_matrix
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-5)
    assert (m[1:, 1:][~np.eye(3, dtype=bool)] > 0).all()  # branches look at each other
    app.layer.value = 1
    ref = group_attention(model, app.packed, mask="columnar").matrix(1).numpy()
    np.testing.assert_allclose(app.leakage_matrix, ref, atol=1e-6)
    assert app.leakage_image.value[:4] == b"\x89PNG"


@pytest.mark.slow
def test_run_streams_what_generate_returns_and_save_appends_it(app, model, tok, tmp_path):
    app.picker.value = 3
    app.mask.value = "columnar"
    app.temperature.value = 0.7
    app.top_p.value = 0.9
    app.seed.value = 5
    app.max_new_tokens.value = 6
    app.run_button.click()
    sample = {"main": RECORDS[3]["main"], "branches": RECORDS[3]["branches"]}
    ref = pmaccel.generate(model, tok, [sample], max_new_tokens=6, temperature=0.7, top_p=0.9, seed=5,
                           mask="columnar", indices=[3])[0]
    assert app.branch_outputs() == ref["outputs"]
    # streamed step by step: one snapshot per step, the last one what generate returned
    assert [s for s, _ in app.stream] == list(range(1, max(ref["num_generated_tokens"]) + 1))
    assert app.stream[-1][1] == ref["outputs"]
    assert all(html.escape(o) in w.value for o, w in zip(ref["outputs"], app.output_widgets))
    assert "done:" in app.status.value and not app.run_button.disabled
    # the grid now holds the exact generated ids
    assert not app.retokenized
    for k, ids in enumerate(ref["output_ids"]):
        row = [c for c in app.grid_cells()[k + 1] if c]
        assert row[len(row) - len(ids):] == [tok.decode([t]) for t in ids]
    # a different temperature gives what generate gives for it
    app.temperature.value = 0.0
    app.run_button.click()
    greedy = pmaccel.generate(model, tok, [sample], max_new_tokens=6, mask="columnar", indices=[3])[0]
    assert app.branch_outputs() == greedy["outputs"]

    app.save_button.click()
    app.save_button.click()
    lines = [json.loads(x) for x in (tmp_path / "saved.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and lines[0] == lines[1] == app.last_saved
    assert lines[0] == {
        "sample": 3, "id": "colours", "main": RECORDS[3]["main"], "branches": RECORDS[3]["branches"],
        "outputs": greedy["outputs"], "finish_reasons": greedy["finish_reasons"],
        "num_generated_tokens": greedy["num_generated_tokens"],
        "generation": {"max_new_tokens": 6, "temperature": 0.0, "top_p": 0.9, "seed": 5, "mask": "columnar"},
    }
    assert "saved sample 3" in app.status.value


@pytest.mark.slow
def test_settings_reach_the_layout_and_run(tok, tmp_path):
    model = tiny_model("llama", vocab_size=len(tok), seed=1)
    patch_rope(model, 0.5)
    records = [{k: v for k, v in r.items() if k in ("id", "main", "branches")} for r in RECORDS]
    app = pmaccel.inspect(records, model, tok, chat_template=True, branch_stride=64, align="right",
                          max_new_tokens=4, save_path=tmp_path / "s.jsonl")
    assert app.mask.value == "columnar"  # the default with 2D RoPE
    app.picker.value = 2
    ts = tokenize_sample(records[2], tok, chat_template=True)
    n = ts.num_tokens
    assert sorted(app.packed.input_ids[:n].tolist()) == sorted(ts.main + [t for b in ts.branches for t in b])
    assert set(app.packed.bpos[app.packed.branch == 2].tolist()) == {128}
    assert app.branch_outputs() == ["", "", ""] and "click Run" in app.output_widgets[0].value
    result = app.run()
    ref = pmaccel.generate(model, tok, [records[2]], max_new_tokens=4, chat_template=True, branch_stride=64,
                           align="right", indices=[2])[0]
    assert result["output_ids"] == ref["output_ids"] and app.branch_outputs() == ref["outputs"]


@pytest.mark.slow
def test_read_only_without_a_model_then_attach(model, tok):
    default = pmaccel.inspect(RECORDS)  # no tokenizer either: the embedded model's, and it says so
    assert "embedded SmolLM2-135M-Instruct tokenizer" in default.notice.value
    assert default.grid_cells() == pmaccel.inspect(RECORDS, tokenizer=tok).grid_cells()
    app = pmaccel.inspect(RECORDS, tokenizer=tok)
    assert "Read-only" in app.notice.value and "app.attach(model, tokenizer)" in app.notice.value
    assert app.run_button.disabled and app.temperature.disabled
    assert app.leakage_matrix is None and app.run() is None
    app.picker.value = 4
    assert app.grid_cells()[0][0] == tok.decode([_ids(tok, "Hi")[0]])  # the layout needs no model
    assert app.mask_matrix.shape == (app.packed.num_tokens,) * 2
    app.attach(model, tok)
    assert not app.run_button.disabled and "Read-only" not in app.notice.value
    np.testing.assert_allclose(app.leakage_matrix.sum(1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_sources_file_dataset_and_infer_output(model, tok, tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    from_file = pmaccel.inspect(path, tokenizer=tok)
    assert [s.branches for s in from_file.samples] == [r["branches"] for r in RECORDS]
    assert from_file.save_path.value == str(tmp_path / "results.inspected.jsonl")
    rows = datasets.Dataset.from_list([{"main": r["main"], "branches": r["branches"]} for r in RECORDS])
    from_rows = pmaccel.inspect(rows, tokenizer=tok)
    assert from_rows.sample.outputs is None and from_rows.branch_outputs() == ["", ""]

    # flat rows written by infer: grouped into samples exactly as infer grouped them
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    flat = tmp_path / "flat.jsonl"
    flat.write_text("".join(json.dumps({"id": i, "text": f"Line {i} says"}) + "\n" for i in range(5)))
    out = tmp_path / "flat_out.jsonl"
    records = pmaccel.infer(base_model=str(model_dir), data_path=str(flat), out_path=str(out), max_new_tokens=3,
                            branches_per_sample=2)
    app = pmaccel.inspect(out, model, tok, branches_per_sample=2)
    assert [len(s.branches) for s in app.samples] == [2, 2, 1]
    app.picker.value = 1
    assert app.sample.label == "id 2, 3"
    assert app.branch_outputs() == [records[2]["output"], records[3]["output"]]
    greedy = pmaccel.generate(model, tok, [{"branches": ["Line 2 says", "Line 3 says"]}], max_new_tokens=3,
                              indices=[1])[0]
    assert greedy["outputs"] == app.branch_outputs()  # infer's sample 1 is the picker's sample 1


@pytest.mark.slow
def test_bad_sources_and_missing_extras(tok, monkeypatch):
    with pytest.raises(PMAccelError, match="records:2: the row has neither"):
        pmaccel.inspect([RECORDS[0], {"foo": 1}], tokenizer=tok)
    with pytest.raises(PMAccelError, match="source must be"):
        pmaccel.inspect(42, tokenizer=tok)
    with pytest.raises(PMAccelError, match="give the model's tokenizer too"):
        pmaccel.inspect(RECORDS, model=object())
    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    with pytest.raises(PMAccelError, match=r'pip install "pmaccel\[notebook\]"'):
        pmaccel.inspect(RECORDS, tokenizer=tok)


def test_import_pmaccel_stays_light():
    code = ("import sys, pmaccel; heavy = [m for m in ('ipywidgets', 'matplotlib', 'torch', 'transformers') "
            "if m in sys.modules]; print(heavy)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    assert callable(pmaccel.inspect)


@pytest.mark.slow
def test_group_attention_is_used_for_the_shown_outputs(app, model):
    app.picker.value = 0
    app.mask.value = "isolated"
    expected = group_attention(model, app.packed, mask="isolated").matrix().numpy()
    np.testing.assert_allclose(app.leakage_matrix, expected, atol=1e-6)
    # the final sequence is the prompt followed by the (re-tokenized) outputs
    n_out = sum(len(tok_ids) for tok_ids in (_ids(app.tokenizer, o) for o in RECORDS[0]["outputs"]))
    assert app.packed.num_tokens == tokenize_sample(RECORDS[0], app.tokenizer).num_tokens + n_out
