"""fvlm.heatmap: the token similarity math on hand-built tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fvlm.heatmap import token_embeddings, token_similarity, upsample_to_input
from fvlm.model.pooling import AnatomyPooling


def test_similarity_modes_by_hand() -> None:
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    p, q = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    cos = token_similarity(e, p, q, "cosine")
    t = (p - q) / (2 ** 0.5)
    assert torch.allclose(cos, e @ t)
    prob = token_similarity(e, p, q, "probability", logit_scale=10.0)
    ref = torch.softmax(torch.stack([10 * (e @ q), 10 * (e @ p)], -1), -1)[:, 1]
    assert torch.allclose(prob, ref) and prob[0] > 0.99 and prob[1] < 0.01


def test_token_embeddings_match_pooling_on_a_single_token() -> None:
    torch.manual_seed(0)
    pool = AnatomyPooling(3, 8, 4, heads=2).eval()
    tokens = torch.randn(1, 5, 8)
    touch = torch.zeros(1, 3, 5, dtype=torch.bool)
    touch[0, 1, 2] = True  # anatomy 1 touches only token 2: its pooled embedding is that token's
    emb, mask = pool([tokens], touch)
    per_token = token_embeddings(tokens, pool, 1)
    assert mask[0, 1] and torch.allclose(per_token[0, 2], emb[0, 1], atol=1e-6)
    assert torch.allclose(per_token.norm(dim=-1), torch.ones(1, 5), atol=1e-6)


def test_upsample_constant_and_shape() -> None:
    m = torch.full((1, 2, 3, 4), 0.25)
    up = upsample_to_input(m, (8, 12, 16))
    assert up.shape == (1, 8, 12, 16) and torch.allclose(up, torch.full_like(up, 0.25))
    assert F.normalize(torch.ones(3), dim=0).norm() > 0.99
