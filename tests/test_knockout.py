"""The measurement's building blocks: distances and the batched -inf re-attention."""

import torch

from vl_masking.knockout import LastQuery, distances, head_outputs, last_query_logits


def test_distances_are_l2_and_one_minus_cosine():
    torch.manual_seed(0)
    base, masked = torch.randn(3, 16), torch.randn(3, 5, 16)
    l2, cos = distances(base, masked)
    b, m = base.double().unsqueeze(1), masked.double()
    assert torch.allclose(l2.double(), (m - b).norm(dim=-1), rtol=1e-6)
    assert torch.allclose(cos.double(), 1 - torch.nn.functional.cosine_similarity(m, b, dim=-1), atol=1e-6)


def test_a_zero_vector_has_cosine_distance_zero_to_itself_and_one_to_anything_else():
    base = torch.zeros(4)
    l2, cos = distances(base, torch.stack([torch.zeros(4), torch.ones(4)]))
    assert cos.tolist() == [0.0, 1.0] and l2.tolist() == [0.0, 2.0]
    _, cos = distances(torch.ones(4), torch.zeros(1, 4))
    assert cos.tolist() == [1.0]


def test_tiny_vectors_are_not_mistaken_for_zero():
    torch.manual_seed(1)
    base, masked = torch.randn(8), torch.randn(2, 8)
    _, expected = distances(base, masked)
    _, tiny = distances(base * 1e-20, masked * 1e-20)
    assert torch.allclose(tiny, expected, atol=1e-6)


def test_each_row_hides_its_own_keys_and_an_empty_row_hides_nothing():
    torch.manual_seed(2)
    heads, kv_heads, s, d = 4, 2, 6, 8
    lq = LastQuery(q=torch.randn(heads, d), k=torch.randn(kv_heads, s, d), v=torch.randn(kv_heads, s, d),
                   allowed=None, scaling=d ** -0.5, key_offset=0, length=s)
    logits = last_query_logits(lq)
    hide = torch.zeros(4, s, dtype=torch.bool)
    for row, key in enumerate([None, 0, 3, 5]):
        if key is not None:
            hide[row, key] = True
    out = head_outputs(lq, logits, hide)
    v = lq.v.repeat_interleave(heads // kv_heads, dim=0)
    for row, hidden in enumerate([None, 0, 3, 5]):
        row_logits = logits.clone()
        if hidden is not None:
            row_logits[:, hidden] = float("-inf")
        expected = torch.einsum("hs,hsd->hd", torch.softmax(row_logits, dim=-1), v)
        assert torch.allclose(out[:, row], expected, atol=1e-6)


def test_hiding_the_only_visible_key_gives_a_zero_output_not_nan():
    lq = LastQuery(q=torch.ones(2, 4), k=torch.ones(1, 1, 4), v=torch.ones(1, 1, 4), allowed=None,
                   scaling=0.5, key_offset=0, length=1)
    out = head_outputs(lq, last_query_logits(lq), torch.ones(1, 1, dtype=torch.bool))
    assert torch.equal(out, torch.zeros(2, 1, 4))
