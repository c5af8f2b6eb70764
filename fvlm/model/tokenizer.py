"""Tokenizers for the text tower: a local pretrained one, or a WordPiece trained on the report corpus.

``train_wordpiece`` builds a BERT-style tokenizer with the ``tokenizers`` library (BERT normaliser with
lower-casing and accent stripping, BERT pre-tokeniser, WordPiece model, ``[CLS] text [SEP]`` template) and
wraps it as a ``transformers.PreTrainedTokenizerFast``, which ``save_pretrained(dir)`` writes and
:func:`load_tokenizer` reads back. Nothing is ever fetched from a model hub.
"""

from __future__ import annotations

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
    """
    try:
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
        from transformers import PreTrainedTokenizerFast
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("train_wordpiece needs the 'tokenizers' and 'transformers' packages") from e

    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("train_wordpiece got no non-empty text to train on")
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small (needs room for {len(SPECIAL_TOKENS)} special tokens)")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=lowercase, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=list(SPECIAL_TOKENS), continuing_subword_prefix="##")
    tok.train_from_iterator(texts, trainer=trainer)
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
