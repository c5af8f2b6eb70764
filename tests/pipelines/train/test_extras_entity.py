"""Dataset extra ``entity_mlm``: word categories from finding words, the parser, modifiers and negations;
masks that follow them (over many draws), BERT 80/10/10 replacement, determinism, and the fields on a real
preprocessed cohort."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from fvlm.model.tokenizer import train_wordpiece
from pipelines.train.extras import get_extra, list_extras
from pipelines.train.extras.entity import (
    BASE, CUE, ENTITY, NEGATION, EntityLexicon, EntityMasking, draw_mlm, tokenize_categories,
)

TEXTS = [
    "A small nodule in the left upper lobe. No pleural effusion. The heart is normal.",
    "Large pleural effusion on the right. The liver is unremarkable. No nodule.",
]
FINDINGS = ("nodule", "pleural effusion")


def _categories(text: str, lexicon: EntityLexicon) -> dict[str, int]:
    """word (lower case, as written) -> its category (first occurrence wins)."""
    cat = lexicon.categories(text)
    out: dict[str, int] = {}
    for m in re.finditer(r"[A-Za-z0-9]+", text):
        out.setdefault(m.group().lower(), int(cat[m.start():m.end()].max()))
    return out


def test_categories_from_finding_words_modifiers_and_negations() -> None:
    lex = EntityLexicon(FINDINGS)
    c = _categories(TEXTS[0], lex)
    for word in ("nodule", "pleural", "effusion", "small", "left", "upper", "lobe"):
        assert c[word] == ENTITY, word  # finding words and the modifiers of their sentence
    assert c["normal"] == NEGATION  # boilerplate of a normal sentence without a finding word
    assert c["no"] == CUE  # "No pleural effusion.": the cue the image answers (issue 22)
    for word in ("a", "in", "the", "heart", "is"):
        assert c[word] == BASE, word
    # a modifier word without a finding in its sentence is an ordinary word
    assert _categories("The right kidney is small.", lex)["right"] == BASE


def test_the_parser_gives_statuses_cues_and_measurements() -> None:
    lex = EntityLexicon.from_preset("fvlm15")
    text = "Nodule (21x19 mm) is present in the left upper lobe. Pleural effusion was not detected."
    c = _categories(text, lex)
    for word in ("nodule", "21x19", "mm", "left", "upper", "lobe", "pleural", "effusion"):
        assert c[word] == ENTITY, word
    for word in ("was", "not", "detected"):  # the ConText cue of the absent mention: the image's question
        assert c[word] == CUE, word
    # a denied finding's cue is a cue in a report that also has a present finding; boilerplate without a finding is not
    c3 = _categories("Nodule in the left lobe. No pleural effusion. The heart is normal.", lex)
    assert c3["no"] == CUE and c3["normal"] == NEGATION
    # "no" in a sentence with a present finding is not boilerplate: it keeps the base category
    c2 = _categories("Nodule in the left lobe, no change in the size of the nodule.", lex)
    assert c2["no"] == BASE and c2["nodule"] == ENTITY


@pytest.fixture(scope="module")
def tokenizer():
    return train_wordpiece(TEXTS * 3 + ["no nodule pleural effusion heart liver lobe"], vocab_size=200,
                           min_frequency=1, max_length=32)


def _draws(tokenizer, cfg: EntityMasking, n: int, seed: int = 0):
    ids, words, cats = tokenize_categories(tokenizer, TEXTS, 32, EntityLexicon(FINDINGS))
    mask_id = tokenizer.mask_token_id
    random_ids = np.array([i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids])
    rng = np.random.default_rng(seed)
    out = [draw_mlm(ids, words, cats, rng, cfg, mask_id, random_ids) for _ in range(n)]
    return ids, words, cats, out


def test_pieces_of_a_word_share_its_category_and_special_tokens_have_none(tokenizer) -> None:
    ids, words, cats = tokenize_categories(tokenizer, TEXTS, 32, EntityLexicon(FINDINGS))
    assert ids.shape == words.shape == cats.shape == (2, 32)
    specials = np.isin(ids, tokenizer.all_special_ids)
    assert (words[specials] == -1).all() and (words[~specials] >= 0).all()
    for t in range(2):
        for w in np.unique(words[t][words[t] >= 0]):
            assert len(set(cats[t][words[t] == w].tolist())) == 1
    enc = tokenizer(TEXTS, padding="max_length", truncation=True, max_length=32)
    assert (ids == np.array(enc["input_ids"])).all()  # the dataset's tokenisation


def test_finding_tokens_are_masked_far_more_often_and_negations_less(tokenizer) -> None:
    cfg = EntityMasking()
    ids, words, cats, draws = _draws(tokenizer, cfg, 1500)
    masked = np.stack([(lab.numpy() != -100) for _, lab, _ in draws])  # (n, T, L)
    rate = {c: masked[:, (cats == c) & (words >= 0)].mean() for c in (BASE, NEGATION, ENTITY, CUE)}
    assert abs(rate[ENTITY] - 0.5) < 0.05, rate
    assert abs(rate[CUE] - 0.5) < 0.06, rate  # "No" of "No pleural effusion." / "No nodule.": asked as often
    assert abs(rate[BASE] - 0.15) < 0.04, rate
    assert rate[NEGATION] < 0.1 and rate[ENTITY] > 3 * rate[BASE] and rate[BASE] > 2 * rate[NEGATION], rate
    assert not masked[:, words < 0].any()  # [CLS], [SEP], padding never
    assert masked.sum(-1).min() >= 1  # every text gets at least one masked word
    # whole words: all pieces of a word are masked together
    for m in masked[:50]:
        for t in range(2):
            for w in np.unique(words[t][words[t] >= 0]):
                assert len(set(m[t][words[t] == w].tolist())) == 1
    # weights: entity and base 1, negation 0.1, zero where not masked
    weights = np.stack([w.numpy() for _, _, w in draws])
    cat_n = np.broadcast_to(cats, masked.shape)
    assert np.allclose(weights[masked & (cat_n == NEGATION)], 0.1)
    assert np.allclose(weights[masked & (cat_n != NEGATION)], 1.0) and (weights[~masked] == 0).all()


def test_bert_replacement_and_labels(tokenizer) -> None:
    ids, words, cats, draws = _draws(tokenizer, EntityMasking(entity_prob=1.0, base_prob=1.0, negation_prob=1.0), 300)
    total = replaced = kept = 0
    for inp, lab, _ in draws:
        inp, lab = inp.numpy(), lab.numpy()
        m = lab != -100
        assert (lab[m] == ids[m]).all() and (inp[~m] == ids[~m]).all()
        total += m.sum()
        replaced += (inp[m] == tokenizer.mask_token_id).sum()
        kept += (inp[m] == ids[m]).sum()
        assert not np.isin(inp[m], [i for i in tokenizer.all_special_ids if i != tokenizer.mask_token_id]).any()
    assert abs(replaced / total - 0.8) < 0.03 and 0.07 < kept / total < 0.16  # kept: 10 % + random hits


def test_draws_are_deterministic_per_rng(tokenizer) -> None:
    *_, a = _draws(tokenizer, EntityMasking(), 3, seed=5)
    *_, b = _draws(tokenizer, EntityMasking(), 3, seed=5)
    *_, c = _draws(tokenizer, EntityMasking(), 3, seed=6)
    assert all(torch.equal(x, y) for da, db in zip(a, b) for x, y in zip(da, db))
    assert not all(torch.equal(x, y) for da, dc in zip(a, c) for x, y in zip(da, dc))


@pytest.mark.parametrize("options, words", [({"entity_prob": 1.5}, "entity_prob"), ({"negation_weight": -1}, ">= 0"),
                                            ({"mask_share": 0.95, "random_share": 0.1}, "mask_share")])
def test_bad_settings_are_errors(options: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        EntityMasking(**options)


def test_the_recipe_rates_reach_the_extra_through_the_head(tokenizer) -> None:
    """Issue 22: the rates are recipe data (``model.heads.entity_mlm.masking``); the head names the extra with
    them and the data pipeline builds that masking."""
    from fvlm.model.heads import data_extras_for
    from fvlm.model.heads.entity import EntityMLMHead
    from pipelines.config.recipe import load_recipe
    from pipelines.train.trainer import model_config_for

    name = EntityMLMHead.extras_for({"masking": {"cue_prob": 1.0, "entity_prob": 0.0, "base_prob": 0.0,
                                                 "negation_prob": 0.0}})[0]
    assert name.startswith("entity_mlm?")
    produce = get_extra(name)
    assert produce is get_extra(name)  # built once per name
    ids, words, cats = tokenize_categories(tokenizer, TEXTS, 32, EntityLexicon(FINDINGS))
    cfg = EntityMasking(cue_prob=1.0, entity_prob=0.0, base_prob=0.0, negation_prob=0.0)
    _, labels, weights = draw_mlm(ids, words, cats, np.random.default_rng(0), cfg, tokenizer.mask_token_id,
                                  np.arange(5, 50))
    masked = labels.numpy() != -100
    assert masked.any() and (cats[masked] == CUE).all() and np.allclose(weights.numpy()[masked], 1.0)
    with pytest.raises(ValueError, match="entity_mlm\\?cue_rate"):
        get_extra("entity_mlm?cue_rate=0.5")
    # the shipped recipe states its rates, and the default masking holds the same ones
    cfg = load_recipe("fvlm-entity")
    extra = data_extras_for(model_config_for(cfg))
    masking = cfg.model.heads["entity_mlm"]["masking"]
    assert masking["cue_prob"] == 0.5 and any(e.startswith("entity_mlm?") for e in extra)
    assert all(getattr(EntityMasking(), k) == v for k, v in masking.items())


def test_a_slow_tokenizer_is_an_error() -> None:
    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match="fast tokenizer"):
        tokenize_categories(Slow(), ["x"], 8, EntityLexicon(()))


# --------------------------------------------------------------------------- on a preprocessed cohort


@pytest.fixture(scope="module")
def prepared(cohort4) -> Path:
    return cohort4.prep


def test_fields_on_a_preprocessed_cohort(prepared: Path) -> None:
    from pipelines.cases.dataset import CaseDataset
    from pipelines.cases.format import corpus_texts

    assert "entity_mlm" in list_extras() and callable(get_extra("entity_mlm"))
    tok = train_wordpiece(corpus_texts(prepared), vocab_size=600, max_length=48)
    kw = dict(crop_size_zyx=(32, 64, 64), mode="resize", max_text_len=48, extras=("entity_mlm",))
    train = CaseDataset(prepared, tok, train=True, **kw)
    for i in range(len(train)):
        s = train[i]
        a = train.num_anatomies
        assert s["mlm_input_ids"].shape == s["mlm_labels"].shape == s["mlm_weights"].shape == (a, 48)
        assert s["mlm_input_ids"].dtype == s["mlm_labels"].dtype == torch.int64 and s["mlm_weights"].dtype == torch.float32
        m = s["mlm_labels"] != -100
        assert torch.equal(s["mlm_input_ids"][~m], s["input_ids"][~m]) and torch.equal(s["mlm_labels"][m], s["input_ids"][m])
        assert (m.sum(-1) >= 1).all()  # every anatomy text (never empty: the parser's normal text) is masked
        assert ((s["mlm_weights"] > 0) == m).all()
    again = train[0]
    assert torch.equal(again["mlm_labels"], train[0]["mlm_labels"])  # same (seed, epoch, index): same draw
    train.set_epoch(1)
    assert not torch.equal(train[0]["mlm_labels"], again["mlm_labels"])  # another epoch: another draw
    # evaluation: a fixed draw per case
    ev = CaseDataset(prepared, tok, train=False, **kw)
    assert torch.equal(ev[1]["mlm_input_ids"], ev[1]["mlm_input_ids"])
