"""Tokenizers for the text tower: a local pretrained one, or a WordPiece trained on the report corpus.

``train_wordpiece`` builds a BERT-style tokenizer with the ``tokenizers`` library (BERT normaliser with
lower-casing and accent stripping, BERT pre-tokeniser, WordPiece model, ``[CLS] text [SEP]`` template) and
wraps it as a ``transformers.PreTrainedTokenizerFast``, which ``save_pretrained(dir)`` writes and
:func:`load_tokenizer` reads back. Nothing is ever fetched from a model hub.
"""

from __future__ import annotations

from collections import Counter

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def train_wordpiece(
    texts: Iterable[str],
    vocab_size: int = 30522,
    min_frequency: int = 2,
    lowercase: bool = True,
    max_length: int = 128,
) -> Any:
    """Train a WordPiece tokenizer on ``texts`` -> ``transformers.PreTrainedTokenizerFast``.

    ``vocab_size`` is an upper bound (a small corpus gives fewer tokens); ``len(tokenizer)`` is the size
    the text encoder needs. ``max_length`` becomes ``model_max_length`` (truncation length).

    The vocabulary is chosen deterministically: the special tokens, every character of the corpus alone and
    as a ``##`` continuation (so any word can be spelled), then whole words by descending frequency (ties
    by the word), at least ``min_frequency`` times, up to ``vocab_size``. The normaliser, pre-tokeniser and
    WordPiece model are the ``tokenizers`` library's BERT ones. Its own ``WordPieceTrainer`` is not used:
    it breaks frequency ties in hash-map order, so two runs on the same corpus gave different
    vocabularies (4 of 4 here), and with them different token ids and a different trained model.
    """
    try:
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("train_wordpiece needs the 'tokenizers' and 'transformers' packages") from e

    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("train_wordpiece got no non-empty text to train on")
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small (needs room for {len(SPECIAL_TOKENS)} special tokens)")
    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                            strip_accents=lowercase, lowercase=lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    alphabet = sorted({c for word in counts for c in word})
    pieces = list(dict.fromkeys([*SPECIAL_TOKENS, *alphabet, *(f"##{c}" for c in alphabet)]))[:vocab_size]
    words = sorted((w for w, n in counts.items() if n >= min_frequency and len(w) > 1), key=lambda w: (-counts[w], w))
    vocab = {piece: i for i, piece in enumerate(pieces + words[: max(vocab_size - len(pieces), 0)])}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
        model_max_length=max_length, padding_side="right", truncation_side="right",
    )


def load_tokenizer(path: str | os.PathLike) -> Any:
    """A tokenizer from a local folder (``save_pretrained`` output, or a pretrained BERT's ``vocab.txt``)."""
    from transformers import AutoTokenizer

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"tokenizer folder {str(path)!r} does not exist; fvlm never downloads tokenizers: give a local "
            "folder (save_pretrained output) or leave text.tokenizer empty to train a WordPiece on the corpus"
        )
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
