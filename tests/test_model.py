"""pmaccel.model: dtype and device names, model paths checked before anything loads, and a saved model
loaded ready for decoding (eval, no gradients, a pad token, 2D RoPE when asked)."""

from __future__ import annotations

import pytest
import torch
from helpers_infer import save_tiny_model

from pmaccel.errors import PMAccelError
from pmaccel.model import check_model_path, load_model, resolve_device, resolve_dtype
from pmaccel.rope import is_rope_2d


def test_dtype_and_device_names():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype(torch.float16) == torch.float16
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(PMAccelError, match="dtype: unknown dtype 'fp8'"):
        resolve_dtype("fp8")
    with pytest.raises(PMAccelError, match="device: unknown device 'gpu0'"):
        resolve_device("gpu0")


def test_missing_local_paths_fail_before_loading(tmp_path):
    with pytest.raises(PMAccelError, match="base_model: GGUF file .* not found"):
        check_model_path(tmp_path / "m.gguf")
    with pytest.raises(PMAccelError, match="model directory ./nowhere/model not found"):
        check_model_path("./nowhere/model")
    assert check_model_path("org/name") == check_model_path("org/name")  # a hub id passes the check


def test_a_saved_model_loads_ready_for_decoding(tmp_path):
    path = save_tiny_model(tmp_path / "m")
    model, tok = load_model(str(path), dtype="fp32", device="cpu")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert tok.pad_token_id is not None and not is_rope_2d(model)
    assert next(model.parameters()).dtype == torch.float32
    patched, _ = load_model(str(path), device="cpu", patch_rope=True)
    assert is_rope_2d(patched)
