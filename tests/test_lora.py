"""pmaccel.lora: ParallelMind LoRA files and PEFT adapter dirs, checked against independent references."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from pmaccel.errors import PMAccelError
from pmaccel.lora import LoRALinear, apply_lora, load_lora_state, lora_rank_of

# hidden 64, kv heads 2 of 4: q_proj/o_proj are [64, 64] (square); k/v [32, 64], MLP, lm_head [128, 64] not.
SQUARE = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "o_proj")]
HIDDEN = 64


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return AutoModelForCausalLM.from_config(cfg).float().eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def make_state(r=4, seed=0):
    """Random (non-zero) adapters for every square Linear: A [r, 64], B [64, r]."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name in SQUARE:
        state[f"{name}.lora.A.weight"] = 0.3 * torch.randn(r, HIDDEN, generator=g)
        state[f"{name}.lora.B.weight"] = 0.3 * torch.randn(HIDDEN, r, generator=g)
    return state


def merged_by_hand(model, state):
    """Reference: a copy of ``model`` with W + B @ A written into each square Linear."""
    ref = copy.deepcopy(model)
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for name in SQUARE:
            w = mods[name].weight
            w += state[f"{name}.lora.B.weight"] @ state[f"{name}.lora.A.weight"]
    return ref


def write(tmp_path, state, name="lora.pth"):
    p = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(state, str(p))
    else:
        torch.save(state, p)
    return p


def test_square_linears_of_tiny_config(base):
    square = [
        n
        for n, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and m.in_features == m.out_features
    ]
    assert square == SQUARE


@pytest.mark.parametrize("fname", ["lora.pth", "lora.safetensors"])
def test_unmerged_matches_hand_merge(base, ids, tmp_path, fname):
    state = make_state()
    path = write(tmp_path, state, fname)
    want = logits(merged_by_hand(base, state), ids)
    model = apply_lora(copy.deepcopy(base), path, merge=False)
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in SQUARE)
    got = logits(model, ids)
    assert (want - logits(base, ids)).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fname", ["lora.pth", "lora.safetensors"])
def test_merged_matches_unmerged_and_hand_merge(base, ids, tmp_path, fname):
    state = make_state(seed=3)
    path = write(tmp_path, state, fname)
    merged = apply_lora(copy.deepcopy(base), path, merge=True)
    unmerged = apply_lora(copy.deepcopy(base), path, merge=False)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, ids), logits(unmerged, ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        logits(merged, ids), logits(merged_by_hand(base, state), ids), atol=1e-5, rtol=0
    )


def test_peft_dir_matches_peft(base, ids, tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(2)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(copy.deepcopy(base), cfg).save_pretrained(tmp_path)
    want = logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval(), ids)
    assert (want - logits(base, ids)).abs().max() > 1e-2
    merged = apply_lora(copy.deepcopy(base), tmp_path, merge=True)
    assert not isinstance(merged, peft.PeftModel)
    torch.testing.assert_close(logits(merged, ids), want, atol=1e-5, rtol=0)
    unmerged = apply_lora(copy.deepcopy(base), tmp_path, lora_rank=4, merge=False)
    assert isinstance(unmerged, peft.PeftModel)
    torch.testing.assert_close(logits(unmerged, ids), want, atol=1e-5, rtol=0)
    assert lora_rank_of(tmp_path) == 4
    with pytest.raises(PMAccelError, match="lora_rank=8.*r=4"):
        apply_lora(copy.deepcopy(base), tmp_path, lora_rank=8)


def test_rank_read_from_file(base, ids, tmp_path):
    state = make_state(r=3)
    path = write(tmp_path, state)
    assert lora_rank_of(path) == 3
    model = apply_lora(copy.deepcopy(base), path)
    assert model.get_submodule(SQUARE[0]).weight.shape == (HIDDEN, HIDDEN)
    torch.testing.assert_close(
        logits(model, ids), logits(merged_by_hand(base, state), ids), atol=1e-5, rtol=0
    )
    apply_lora(copy.deepcopy(base), path, lora_rank=3)
    with pytest.raises(PMAccelError) as e:
        apply_lora(copy.deepcopy(base), path, lora_rank=5)
    assert "5" in str(e.value) and "3" in str(e.value)


def test_missing_key_names_module(base, tmp_path):
    state = make_state()
    del state["model.layers.1.self_attn.o_proj.lora.B.weight"]
    with pytest.raises(PMAccelError, match=r"model\.layers\.1\.self_attn\.o_proj") as e:
        apply_lora(copy.deepcopy(base), write(tmp_path, state))
    assert "1 of 8" in str(e.value) and "lora.pth" in str(e.value)


def test_extra_key_names_it(base, tmp_path):
    state = make_state()
    state["model.layers.0.mlp.up_proj.lora.A.weight"] = torch.randn(4, HIDDEN)
    with pytest.raises(PMAccelError, match=r"model\.layers\.0\.mlp\.up_proj\.lora\.A\.weight"):
        apply_lora(copy.deepcopy(base), write(tmp_path, state))


def test_wrong_shape_names_module_and_shapes(base, tmp_path):
    state = make_state(r=4)
    state["model.layers.0.self_attn.q_proj.lora.B.weight"] = torch.randn(HIDDEN, 5)
    with pytest.raises(PMAccelError) as e:
        apply_lora(copy.deepcopy(base), write(tmp_path, state))
    msg = str(e.value)
    assert "model.layers.0.self_attn.q_proj" in msg and "[64, 4]" in msg and "[64, 5]" in msg


def test_ranks_differ_between_modules(base, tmp_path):
    state = make_state(r=4)
    state["model.layers.1.self_attn.q_proj.lora.A.weight"] = torch.randn(2, HIDDEN)
    with pytest.raises(PMAccelError, match=r"ranks differ.*model\.layers\.1\.self_attn\.q_proj"):
        apply_lora(copy.deepcopy(base), write(tmp_path, state))


def test_bad_paths(base, tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(PMAccelError, match="not found.*nope.pth"):
        apply_lora(base, missing)
    other = tmp_path / "lora.npz"
    other.write_bytes(b"x")
    with pytest.raises(PMAccelError, match=r"\.npz"):
        apply_lora(base, other)
    with pytest.raises(PMAccelError, match="adapter_config.json"):
        apply_lora(base, tmp_path)


def test_ddp_prefix_and_nesting(base, ids, tmp_path):
    state = make_state(seed=5)
    want = logits(merged_by_hand(base, state), ids)
    prefixed = {f"module.{k}": v for k, v in state.items()}
    p1 = write(tmp_path, prefixed, "ddp.pth")
    assert set(load_lora_state(p1)) == set(state)
    torch.testing.assert_close(logits(apply_lora(copy.deepcopy(base), p1), ids), want, atol=1e-5, rtol=0)
    p2 = write(tmp_path, {"state_dict": prefixed, "step": 10}, "nested.pt")
    torch.testing.assert_close(logits(apply_lora(copy.deepcopy(base), p2), ids), want, atol=1e-5, rtol=0)


def test_import_does_not_import_peft():
    code = "import sys, pmaccel.lora; assert 'peft' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
