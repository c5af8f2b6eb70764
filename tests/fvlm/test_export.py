"""Export: save_pretrained / load_pretrained in safetensors gives the same model and tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from fvlm.model import create_model, load_pretrained, read_config, save_pretrained, train_wordpiece

TEXTS = ["no pleural effusion", "mild cardiomegaly", "small hiatal hernia", "calcified aorta", "lungs are clear"] * 2


def test_save_load_round_trip(tmp_path) -> None:
    tok = train_wordpiece(TEXTS, vocab_size=120, min_frequency=1, max_length=16)
    torch.manual_seed(0)
    model = create_model("tiny", text={"vocab_size": len(tok)}, anatomy_names=[f"a{i}" for i in range(15)]).eval()
    g = torch.Generator().manual_seed(1)
    enc = tok(["mild cardiomegaly"] * 15, padding="max_length", max_length=8, return_tensors="pt")
    x = {
        "image": torch.rand(1, 1, 32, 64, 64, generator=g),
        "anatomy": torch.randint(0, 16, (1, 32, 64, 64), generator=g),
        "input_ids": enc["input_ids"][None],
        "attention_mask": enc["attention_mask"][None],
    }
    out = save_pretrained(model, tok, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    assert json.loads((out / "config.json").read_text())["config"]["anatomy_names"][0] == "a0"
    assert read_config(out) == model.config
    loaded, tok2 = load_pretrained(out)
    assert not loaded.training
    assert tok2("mild cardiomegaly")["input_ids"] == tok("mild cardiomegaly")["input_ids"]
    with torch.no_grad():
        a, b = model(**x), loaded(**x)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pretrained(model, tok, out)
    save_pretrained(loaded, tok2, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_tokenizer_larger_than_vocab_is_refused(tmp_path) -> None:
    tok = train_wordpiece(TEXTS, vocab_size=120, min_frequency=1)
    model = create_model("tiny", text={"vocab_size": 10})
    with pytest.raises(ValueError, match="vocab_size"):
        save_pretrained(model, tok, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_not_an_export(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(tmp_path)


def _export(tmp_path):
    tok = train_wordpiece(TEXTS, vocab_size=120, min_frequency=1, max_length=16)
    model = create_model("tiny", text={"vocab_size": len(tok)}, anatomy_names=[f"a{i}" for i in range(15)])
    return save_pretrained(model, tok, tmp_path / "export")


def test_truncated_weights_name_the_file_and_tensor(tmp_path) -> None:
    out = _export(tmp_path)
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated: tensor \S+ ends at byte"):
        load_pretrained(out)
    weights.write_bytes(data[:5])
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated or not a safetensors file"):
        load_pretrained(out)


def test_removed_tensor_is_named(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    out = _export(tmp_path)
    weights = out / "model.safetensors"
    tensors = load_file(str(weights))
    gone = sorted(tensors)[0]
    del tensors[gone]
    save_file(tensors, str(weights))
    fit = r"model\.safetensors: weights do not fit the config: missing tensor\(s\) "
    with pytest.raises(ValueError, match=fit + gone):
        load_pretrained(out)
