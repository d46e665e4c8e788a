"""pmaccel.forward: one model call over packed tokens; the output layer on chosen tokens only (``select``)
or chosen columns (``keep``) gives exactly the logits of the full forward there."""

from __future__ import annotations

import torch
from conftest import ids_sample, tiny_model

from pmaccel.forward import ModelCall
from pmaccel.layout import TokenMeta, collate, pack_sample
from pmaccel.samples import tokenize_sample


class _Ids:
    def __call__(self, text, add_special_tokens=False):
        raise AssertionError("ids only")


def test_select_and_keep_are_the_full_logits_at_those_tokens():
    model = tiny_model("llama")
    samples = [ids_sample([5, 6, 7], [8, 9], [10, 11, 12]), ids_sample(None, [20, 21, 22, 23])]
    packs = [pack_sample(tokenize_sample(s, _Ids())) for s in samples]
    batch = collate(packs, 0)
    n = batch.input_ids.shape[1]
    meta = TokenMeta(*batch.meta.astuple())
    slots = torch.arange(n).expand(len(packs), n)
    call = ModelCall.of(model, "columnar")
    with torch.no_grad():
        full = call(batch.input_ids, batch.positions(False), meta, meta, slots, None)  # [B, N, V]
        rows, cols = torch.tensor([0, 0, 1]), torch.tensor([1, 4, 3])
        picked = call(batch.input_ids, batch.positions(False), meta, meta, slots, None, select=(rows, cols))
        kept = call(batch.input_ids, batch.positions(False), meta, meta, slots, None, keep=torch.tensor([0, 2]))
    assert torch.allclose(picked, full[rows, cols], atol=1e-6)
    assert torch.allclose(kept, full[:, [0, 2]], atol=1e-6)
