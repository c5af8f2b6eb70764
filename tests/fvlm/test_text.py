"""Text tower: WordPiece training, local pretrained encoder offline, temperature."""

from __future__ import annotations

import math

import pytest
import torch

from fvlm.model import TextConfig, create_model, load_tokenizer, train_wordpiece
from fvlm.model.text import LogitScale, TextTower

CORPUS = [
    "The lungs are clear without focal consolidation.",
    "No pleural effusion or pneumothorax.",
    "Mild cardiomegaly. No pericardial effusion.",
    "Small hiatal hernia of the esophagus.",
    "Calcification of the thoracic aorta.",
    "A 5 mm nodule in the right upper lobe.",
] * 3

TINY_BERT = dict(vocab_size=200, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                 max_position_embeddings=64, max_length=32, dropout=0.0)


def test_wordpiece_round_trip(tmp_path) -> None:
    tok = train_wordpiece(CORPUS, vocab_size=200, min_frequency=1, max_length=32)
    assert len(tok) <= 200
    enc = tok("Mild cardiomegaly in the right upper lobe.")
    assert enc["input_ids"][0] == tok.cls_token_id and enc["input_ids"][-1] == tok.sep_token_id
    assert tok.decode(enc["input_ids"], skip_special_tokens=True) == "mild cardiomegaly in the right upper lobe."
    assert tok.unk_token_id in tok("zebra")["input_ids"]
    batch = tok(["no effusion", "a 5 mm nodule in the right upper lobe"], padding="max_length", truncation=True,
                max_length=8, return_tensors="pt")
    assert batch["input_ids"].shape == (2, 8) and batch["attention_mask"][0, -1] == 0
    tok.save_pretrained(str(tmp_path / "tok"))
    again = load_tokenizer(tmp_path / "tok")
    assert again("small hiatal hernia")["input_ids"] == tok("small hiatal hernia")["input_ids"]
    assert again.model_max_length == 32 and again.pad_token == "[PAD]"


def test_wordpiece_vocabulary_is_deterministic_and_spells_unseen_words() -> None:
    """Same corpus -> same token ids (tokenizers' own trainer breaks ties in hash-map order); frequent words
    are whole tokens; an unseen word is spelled from character pieces, never [UNK]."""
    corpus = ["No pleural effusion.", "Small pleural effusion on the right.", "The liver is normal.",
              "Liver, spleen and pancreas are normal.", "A 5 mm nodule in the right upper lobe."] * 3
    vocabs = [train_wordpiece(corpus, vocab_size=200).get_vocab() for _ in range(3)]
    assert vocabs[0] == vocabs[1] == vocabs[2]
    tok = train_wordpiece(corpus, vocab_size=200)
    pieces = tok.convert_ids_to_tokens(tok("pleural effusion of the spleen")["input_ids"])
    assert "pleural" in pieces and "effusion" in pieces
    unseen = tok.convert_ids_to_tokens(tok("unilateral")["input_ids"])  # letters of the corpus
    assert "[UNK]" not in unseen and unseen[1] == "u" and all(p.startswith("##") for p in unseen[2:-1])
    assert len(train_wordpiece(corpus, vocab_size=40)) == 40


def test_wordpiece_rejects_empty_corpus() -> None:
    with pytest.raises(ValueError, match="no non-empty text"):
        train_wordpiece(["", "  "], vocab_size=100)


def test_local_pretrained_bert_offline(tmp_path, monkeypatch) -> None:
    from transformers import BertConfig, BertModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=96, max_position_embeddings=40)
    BertModel(cfg).save_pretrained(str(tmp_path / "bert"))
    saved = BertModel.from_pretrained(str(tmp_path / "bert"), local_files_only=True)
    tower = TextTower(TextConfig(pretrained=str(tmp_path / "bert"), max_length=32), embed_dim=16)
    torch.testing.assert_close(tower.encoder.embeddings.word_embeddings.weight, saved.embeddings.word_embeddings.weight)
    assert tower.cfg.pretrained is None and tower.cfg.hidden_size == 48 and tower.cfg.vocab_size == 120
    assert tower.cfg.hf_config["num_hidden_layers"] == 2
    ids = torch.randint(0, 120, (2, 3, 10))
    emb = tower(ids, torch.ones_like(ids))
    assert emb.shape == (2, 3, 16)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2, 3))
    model = create_model("tiny", text={"pretrained": str(tmp_path / "bert"), "max_length": 32})
    assert model.config.text.hidden_size == 48 and model.config.text.pretrained is None


def test_missing_pretrained_folder_is_not_fetched(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="never downloads"):
        TextTower(TextConfig(pretrained="bert-base-uncased", **{k: v for k, v in TINY_BERT.items()}), 8)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_tokenizer(tmp_path / "nope")


def test_logit_scale_init_and_clamp() -> None:
    scale = LogitScale(0.07, max_scale=100.0)
    assert math.isclose(scale().item(), 1 / 0.07, rel_tol=1e-5)
    assert math.isclose(scale.log_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    with torch.no_grad():
        scale.log_scale.fill_(10.0)
    assert scale().item() == 100.0


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_compact_encoding_equals_full_length_encoding(pooling: str) -> None:
    """Distinct rows encoded once, trailing padding dropped: the same embeddings and gradients as encoding every
    row at full length, including repeated texts and empty ones (all-padding rows keep their full length)."""
    torch.manual_seed(0)
    model = create_model("tiny", text={"pooling": pooling})
    b, a, length = 4, 6, 40
    mask = torch.zeros(b, a, length, dtype=torch.long)
    lens = torch.randint(1, 30, (b, a))
    for i in range(b):
        for j in range(a):
            mask[i, j, : lens[i, j]] = 1
    ids = torch.randint(5, 200, (b, a, length)) * mask
    ids[:, 2], mask[:, 2] = ids[0, 2], mask[0, 2]  # the same normal text in every case
    ids[:, 4], mask[:, 4] = 0, 0  # an absent anatomy: no text
    outs = []
    for compact in (False, True):
        model.text.compact = compact
        model.zero_grad()
        emb = model.encode_text(ids, mask)  # (B, A, D)
        (emb * torch.linspace(-1, 1, emb.shape[-1])).sum().backward()
        outs.append((emb.detach(), model.text.encoder.embeddings.word_embeddings.weight.grad.clone()))
    (e0, g0), (e1, g1) = outs
    assert e1.shape == e0.shape
    torch.testing.assert_close(e1, e0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g1, g0, atol=1e-4 * float(g0.abs().max()), rtol=1e-4)


def test_mean_pooling_keeps_texts_apart_at_initialisation() -> None:
    """From scratch, every text's CLS state is nearly the CLS token's own: embeddings of different texts agree
    to cosine ~1 (a saddle of the contrastive loss); the mean of the tokens keeps them apart. Mean pooling is
    the mean of the attended tokens only: padding never changes it."""
    torch.manual_seed(0)
    ids = torch.randint(5, 200, (12, 20))
    ids[:, 0], ids[:, -1] = 2, 3  # every text opens with the same [CLS] and ends with [SEP]
    mask = torch.ones_like(ids)
    spread = {}
    for pooling in ("cls", "mean"):
        torch.manual_seed(1)
        model = create_model("tiny", text={"pooling": pooling}).eval()
        with torch.no_grad():
            e = model.encode_text(ids, mask)  # (12, D)
        cos = e @ e.T
        spread[pooling] = float(1 - cos[~torch.eye(12, dtype=torch.bool)].mean())
    assert spread["mean"] > 10 * spread["cls"], spread
    padded = torch.cat([ids, torch.zeros(12, 8, dtype=ids.dtype)], 1)
    pmask = torch.cat([mask, torch.zeros(12, 8, dtype=mask.dtype)], 1)
    model.text.compact = False
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(padded, pmask), model.encode_text(ids, mask), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="pooling"):
        TextConfig(pooling="max")
