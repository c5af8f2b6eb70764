"""Model heads: built from ModelConfig.heads, called with the towers' context and their batch fields, outputs
merged into the model's output, saved and loaded with the model; the text tower's hidden states and prefix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fvlm.model import OUTPUT_KEYS, create_model, load_pretrained, save_pretrained, train_wordpiece
from fvlm.model.heads import Head, HeadContext, create_head, data_extras_for, list_heads, register_head

B, A, L = 2, 15, 10


class ProbeHead(Head):
    """Test head: a learnable gain on the pooled features; reads an optional batch field ``probe_scale``."""

    batch_keys = ("probe_scale",)
    data_extras = ("probe_extra",)

    def __init__(self, config, gain: float = 1.0, key: str = "probe") -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(float(gain)))
        self.key = key
        self.seen: HeadContext | None = None

    @classmethod
    def extras_for(cls, options):
        return cls.data_extras if options.get("gain", 1.0) != 0 else ()

    def forward(self, model, ctx: HeadContext, probe_scale=None, **batch):
        self.seen = ctx
        out = self.gain * ctx.pooled.sum(-1)  # (B, A)
        if probe_scale is not None:
            out = out * probe_scale[:, None]
        return {self.key: out}


register_head("test_probe", ProbeHead, overwrite=True)


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (B, A, L), generator=g)
    ids[..., 0] = 2
    return {"image": torch.rand(B, 1, 32, 64, 64, generator=g),
            "anatomy": torch.randint(0, A + 1, (B, 32, 64, 64), generator=g),
            "input_ids": ids, "attention_mask": torch.ones(B, A, L, dtype=torch.long)}


def test_a_head_sees_the_context_reads_its_batch_fields_and_adds_outputs() -> None:
    torch.manual_seed(0)
    model = create_model("tiny", text={"vocab_size": 100}, heads={"test_probe": {"gain": 2.0}})
    assert "test_probe" in list_heads() and model.batch_keys == ("probe_scale",)
    assert model.data_extras == ("probe_extra",) == data_extras_for(model.config)
    x = _batch()
    out = model(**x)
    assert tuple(out)[: len(OUTPUT_KEYS)] == OUTPUT_KEYS and tuple(out)[len(OUTPUT_KEYS):] == ("probe",)
    ctx = model.heads["test_probe"].seen
    n = 4 * 4 * 4
    assert ctx.tokens.shape == (B, n, 64) and ctx.touch.shape == (B, A, n) and ctx.pooled.shape == (B, A, 64)
    assert ctx.text_hidden.shape == (B, A, L, 64) and ctx.grid == (4, 4, 4)
    assert torch.equal(ctx.image_emb, out["image_emb"]) and torch.equal(ctx.text_emb, out["text_emb"])
    assert torch.all(ctx.pooled[~out["anatomy_mask"]] == 0)  # masked anatomies: zero rows, like image_emb
    scaled = model(**x, probe_scale=torch.tensor([1.0, 3.0]), unrelated=torch.zeros(1))
    assert torch.allclose(scaled["probe"][1], 3 * out["probe"][1]) and torch.allclose(scaled["probe"][0], out["probe"][0])
    out["probe"].sum().backward()
    assert model.heads["test_probe"].gain.grad is not None
    assert model.pooling.query.grad is not None  # the head's loss reaches the towers through the context


def test_head_outputs_may_not_shadow_model_outputs_and_bad_configs_are_named() -> None:
    model = create_model("tiny", text={"vocab_size": 100}, heads={"test_probe": {"key": "image_emb"}})
    with pytest.raises(RuntimeError, match="'test_probe' returned 'image_emb'"):
        model(**_batch())
    with pytest.raises(ValueError, match="unknown head 'nope'.*registered heads"):
        create_model("tiny", heads={"nope": {}})
    with pytest.raises(ValueError, match=r"model.heads.test_probe: unknown option\(s\) gian; its options: gain, key"):
        create_head("test_probe", None, {"gian": 1})
    assert data_extras_for(create_model("tiny", heads={"test_probe": {"gain": 0.0}}).config) == ()


def test_heads_save_and_load_with_the_model(tmp_path) -> None:
    tok = train_wordpiece(["mild cardiomegaly", "no effusion"], vocab_size=120, min_frequency=1, max_length=16)
    torch.manual_seed(0)
    model = create_model("tiny", text={"vocab_size": len(tok)}, heads={"test_probe": {"gain": 0.5}}).eval()
    with torch.no_grad():
        model.heads["test_probe"].gain.fill_(1.75)  # a "trained" value, not the init
    loaded, _ = load_pretrained(save_pretrained(model, tok, tmp_path / "export"))
    assert loaded.config.heads == {"test_probe": {"gain": 0.5}}
    assert float(loaded.heads["test_probe"].gain.detach()) == 1.75


def test_text_tower_hidden_states_and_prefix() -> None:
    torch.manual_seed(0)
    model = create_model("tiny", text={"vocab_size": 100}).eval()
    ids = torch.randint(5, 100, (3, L))
    ids[:, 0] = 2
    mask = torch.ones(3, L, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        emb = model.encode_text(ids, mask)
        emb2, hidden = model.encode_text(ids, mask, return_hidden=True)
        assert torch.equal(emb, emb2) and hidden.shape == (3, L, 64)
        prefix = torch.randn(4, 64)
        with_ctx, h_ctx = model.encode_text(ids, mask, return_hidden=True, prefix=prefix)
        assert with_ctx.shape == (3, 32) and h_ctx.shape == (3, L, 64)
        assert not torch.allclose(with_ctx, emb)  # the context changes the embedding
        # an all-zero-length prefix is the plain encoder
        assert torch.allclose(model.encode_text(ids, mask, prefix=torch.zeros(0, 64)), emb, atol=1e-6)
        per_seq = model.encode_text(ids, mask, prefix=prefix.expand(3, 4, 64))
        assert torch.allclose(per_seq, with_ctx, atol=1e-6)
    p = torch.zeros(4, 64, requires_grad=True)
    model.encode_text(ids, mask, prefix=p).sum().backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"prefix must be \(P, 64\)"):
        model.encode_text(ids, mask, prefix=torch.zeros(4, 8))
    with pytest.raises(ValueError, match="exceed the text encoder's max_position_embeddings=128"):
        model.encode_text(ids, mask, prefix=torch.zeros(200, 64))
