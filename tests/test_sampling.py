import torch

from pmaccel.sampling import draw, make_processors, uniforms


def test_uniforms_are_uniform_and_keyed():
    n = 200_000
    idx = torch.arange(n)
    u = uniforms(7, idx, torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long))
    assert 0.0 < float(u.min()) and float(u.max()) < 1.0
    hist = torch.histc(u.float(), bins=10, min=0, max=1) / n
    assert torch.allclose(hist, torch.full((10,), 0.1), atol=0.005)
    same = uniforms(7, idx[:5], torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long))
    assert torch.equal(same, u[:5])
    for seed, branch, step in [(8, 0, 0), (7, 1, 0), (7, 0, 1)]:  # every key part changes the draw
        other = uniforms(seed, idx[:5], torch.full((5,), branch), torch.full((5,), step))
        assert not torch.equal(other, u[:5])
    assert not torch.equal(uniforms(2**40 + 7, idx[:5], 0 * idx[:5], 0 * idx[:5]), u[:5])


def test_draw_follows_the_softmax():
    logits = torch.tensor([2.0, 0.5, -1.0, 1.0, 0.0])
    n = 100_000
    u = uniforms(0, torch.arange(n), torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long))
    tokens = draw(logits.expand(n, 5), u)
    freq = torch.bincount(tokens, minlength=5).double() / n
    assert torch.allclose(freq, torch.softmax(logits.double(), 0), atol=0.006)


def test_filtered_tokens_are_never_drawn():
    logits = torch.randn(1, 50).expand(20_000, 50)
    procs = make_processors(temperature=1.0, top_p=1.0, top_k=3, repetition_penalty=1.0, greedy=False)
    scores = procs(torch.zeros(20_000, 1, dtype=torch.long), logits.clone())
    u = uniforms(1, torch.arange(20_000), torch.zeros(20_000, dtype=torch.long), torch.zeros(20_000, dtype=torch.long))
    drawn = set(draw(scores, u).tolist())
    assert drawn == set(torch.topk(logits[0], 3).indices.tolist())
