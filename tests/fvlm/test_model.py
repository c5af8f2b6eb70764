"""FVLM: output contract, gradients to every part, masked anatomies without NaN, configs and registry."""

from __future__ import annotations


import pytest
import torch

from fvlm.model import (
    FVLM,
    OUTPUT_KEYS,
    ModelConfig,
    ModelConfigError,
    create_model,
    list_models,
    list_text_encoders,
    list_vision_encoders,
    load_model_config,
)

B, A, L = 2, 15, 12


def batch(seed: int = 0, absent: tuple[int, ...] = (3,)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    anatomy = torch.randint(0, A + 1, (B, 32, 64, 64), generator=g)
    for label in absent:
        anatomy[anatomy == label] = 0
    ids = torch.randint(5, 1000, (B, A, L), generator=g)
    ids[..., 0] = 2
    return {
        "image": torch.rand(B, 1, 32, 64, 64, generator=g),
        "anatomy": anatomy,
        "input_ids": ids,
        "attention_mask": torch.ones(B, A, L, dtype=torch.long),
    }


@pytest.fixture(scope="module")
def tiny() -> FVLM:
    torch.manual_seed(0)
    return create_model("tiny")


def test_presets_are_listed_and_load() -> None:
    assert {"tiny", "base"} <= set(list_models())
    for name in list_models():
        cfg = load_model_config(name)
        assert cfg.name == name and isinstance(cfg, ModelConfig)
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert list_vision_encoders() == ["vit3d"] and "bert" in list_text_encoders()


def test_base_preset_is_the_reference_geometry() -> None:
    cfg = load_model_config("base")
    assert (cfg.vision.width, cfg.vision.depth, cfg.vision.heads, cfg.embed_dim) == (768, 12, 12, 256)
    assert (cfg.text.hidden_size, cfg.text.num_layers, cfg.text.num_heads) == (768, 12, 12)
    assert abs(cfg.init_temperature - 0.07) < 1e-9


def test_output_contract(tiny: FVLM) -> None:
    tiny.eval()
    with torch.no_grad():
        out = tiny(**batch())
    assert tuple(out) == OUTPUT_KEYS
    d = tiny.config.embed_dim
    assert out["image_emb"].shape == (B, A, d) and out["text_emb"].shape == (B, A, d)
    assert out["anatomy_mask"].shape == (B, A) and out["anatomy_mask"].dtype == torch.bool
    assert out["global_image_emb"].shape == (B, d) and out["global_text_emb"].shape == (B, d)
    assert out["logit_scale"].shape == () and abs(out["logit_scale"].item() - 1 / 0.07) < 1e-3
    m = out["anatomy_mask"]
    assert not m[:, 2].any() and m[:, [0, 1, 3]].all()  # label 3 removed from the map
    ones = torch.ones(B, A)
    torch.testing.assert_close(out["image_emb"].norm(dim=-1), torch.where(m, ones, 0 * ones))
    torch.testing.assert_close(out["text_emb"].norm(dim=-1), ones)
    assert all(torch.isfinite(v).all() for v in out.values() if v.is_floating_point())


def test_gradients_reach_every_part_and_stay_finite(tiny: FVLM) -> None:
    tiny.train()
    tiny.zero_grad()
    out = tiny(**batch(absent=(3, 7)))
    m = out["anatomy_mask"]
    sim = (out["image_emb"] * out["text_emb"]).sum(-1) * out["logit_scale"]  # (B, A)
    loss = -(sim * m).sum() - (out["global_image_emb"] * out["global_text_emb"]).sum() * out["logit_scale"]
    loss.backward()
    named = dict(tiny.named_parameters())
    for name in ("vision.patch_embed.weight", "vision.pos_embed", "vision.blocks.0.attn.qkv.weight",
                 "pooling.query", "pooling.proj_weight", "pooling.k_proj.weight", "global_pooling.proj.weight",
                 "text.proj.weight", "text.encoder.embeddings.word_embeddings.weight", "logit_scale.log_scale"):
        g = named[name].grad
        assert g is not None and g.abs().sum() > 0, f"no gradient reaches {name}"
    for name, p in named.items():
        assert p.grad is None or torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"
    assert named["pooling.query"].grad[2].abs().sum() == 0  # the absent anatomy's query gets none


def test_cut_and_report_inputs(tiny: FVLM) -> None:
    tiny.eval()
    x = batch()
    cut = torch.zeros(B, A, dtype=torch.bool)
    cut[0, 0] = True
    with torch.no_grad():
        out = tiny(**x, cut=cut)
        assert not out["anatomy_mask"][0, 0] and out["anatomy_mask"][1, 0]
        assert torch.equal(out["image_emb"][0, 0], torch.zeros(tiny.config.embed_dim))
        report = tiny(**x, report_input_ids=x["input_ids"][:, 0], report_attention_mask=x["attention_mask"][:, 0])
        torch.testing.assert_close(report["global_text_emb"], out["text_emb"][:, 0])
        mean = torch.nn.functional.normalize(out["text_emb"].mean(1), dim=-1)
        torch.testing.assert_close(out["global_text_emb"], mean)
        prompts = tiny.encode_text(x["input_ids"][0], x["attention_mask"][0])  # (A, L) -> (A, D)
        torch.testing.assert_close(prompts, out["text_emb"][0], rtol=1e-4, atol=1e-5)


def test_bad_inputs_are_explained(tiny: FVLM) -> None:
    x = batch()
    with pytest.raises(ValueError, match="does not match image"):
        tiny(**{**x, "anatomy": x["anatomy"][:, :16]})
    with pytest.raises(ValueError, match=r"input_ids must be \(B, A, L\)"):
        tiny(**{**x, "input_ids": x["input_ids"][:, :3], "attention_mask": x["attention_mask"][:, :3]})
    with pytest.raises(ValueError, match="vocab_size"):
        tiny(**{**x, "input_ids": x["input_ids"] + 5000})


def test_overrides_and_config_errors() -> None:
    cfg = load_model_config("tiny", text={"vocab_size": 321}, num_anatomies=4)
    assert cfg.text.vocab_size == 321 and cfg.text.hidden_size == 64 and cfg.num_anatomies == 4
    with pytest.raises(ModelConfigError, match="unknown field.*widht"):
        load_model_config("tiny", vision={"widht": 8})
    with pytest.raises(ModelConfigError, match="pooling: heads=5 does not divide"):
        load_model_config("tiny", pooling={"heads": 5})
    with pytest.raises(ModelConfigError, match="anatomy_names has 2 names"):
        load_model_config("tiny", anatomy_names=["lung", "heart"])
    with pytest.raises(FileNotFoundError, match="unknown model preset"):
        load_model_config("huge")


def test_input_windows_set_the_channels_and_round_trip() -> None:
    """``vision.input_windows_hu``: one input channel per HU window, kept by ``config.json``; a model built
    from it takes (B, C, Z, Y, X) and refuses one channel."""
    wins = [[-1150, 350], [-160, 240], [-300, 1200]]
    cfg = load_model_config("tiny", vision={"input_windows_hu": wins})
    assert cfg.vision.in_channels == 3 and cfg.vision.input_windows_hu == tuple((float(a), float(b)) for a, b in wins)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert load_model_config("tiny").vision.input_windows_hu is None  # the reference: the preprocess window
    with pytest.raises(ModelConfigError, match="in_channels=2 but input_windows_hu gives 3"):
        load_model_config("tiny", vision={"input_windows_hu": wins, "in_channels": 2})
    with pytest.raises(ModelConfigError, match="lo < hi"):
        load_model_config("tiny", vision={"input_windows_hu": [[240, -160]]})
    with pytest.raises(ModelConfigError, match=r"list of \[lo, hi\] HU windows"):
        load_model_config("tiny", vision={"input_windows_hu": [-160, 240]})
    torch.manual_seed(0)
    model = create_model("tiny", vision={"input_windows_hu": wins})
    x = batch()
    out = model.encode_image(torch.rand(B, 3, 32, 64, 64), x["anatomy"])
    assert out["image_emb"].shape[:2] == (B, A) and torch.isfinite(out["image_emb"]).all()
    with pytest.raises(ValueError, match=r"\(B, 3, Z, Y, X\)"):
        model.encode_image(x["image"], x["anatomy"])
