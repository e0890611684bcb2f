"""CTC text for Granite Speech 5, with the `tokenizers` library (no transformers at run time).

Decoding is transformers' `ParakeetTokenizer.batch_decode(ids, skip_special_tokens=True)`: consecutive equal
ids grouped, the blank (the pad token) dropped (`ctc.collapse`, done once, by the caller), then the tokenizer's
own decode (byte-level BPE, or SentencePiece-style BPE with byte fallback), and `clean_up_tokenization_spaces`
when its config asks and transformers honours it (not for BPE models, unless the config insists).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
WORD_MARKERS = ("Ġ", "▁")  # a token that begins a word: GPT-2 byte-level, SentencePiece


class TokenizerError(ValueError):
    """A tokenizer that cannot be read or used; the message names the file."""


def clean_up(text: str) -> str:
    """transformers' `clean_up_tokenization`."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m")):
        text = text.replace(a, b)
    for a, b in ((" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def clean_up_spaces(tokenizer, config: dict) -> bool:
    """Whether transformers applies `clean_up_tokenization` when decoding with this tokenizer and config: when
    the config asks, except for BPE models (it corrupts BPE text) unless the config insists."""
    clean = bool(config.get("clean_up_tokenization_spaces", False))
    if type(tokenizer.model).__name__ == "BPE":
        clean = clean and bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"))
    return clean


class CTCTokenizer:
    """A `tokenizers.Tokenizer` read as a CTC vocabulary: `blank_id` is its pad token."""

    def __init__(self, tokenizer, blank_id: int = 0, clean_up_tokenization_spaces: bool = False, source: str = ""):
        self.tokenizer = tokenizer
        self.blank_id = int(blank_id)
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        self.source = source
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._tokens = [tokenizer.id_to_token(i) or "" for i in range(self.vocab_size)]
        self._special = {int(i) for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}

    @classmethod
    def from_dir(cls, path: str | os.PathLike, default_blank: int = 0) -> CTCTokenizer:
        """From a folder holding `tokenizer.json` (and optionally `tokenizer_config.json`)."""
        from tokenizers import Tokenizer

        path = os.fspath(path)
        file = os.path.join(path, "tokenizer.json")
        try:
            tokenizer = Tokenizer.from_file(file)
        except Exception as e:  # tokenizers raises its own Exception type
            raise TokenizerError(f"cannot read the tokenizer {file}: {e}") from None
        config = {}
        config_file = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(config_file):
            try:
                with open(config_file, encoding="utf-8") as f:
                    config = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise TokenizerError(f"cannot read {config_file}: {e}") from None
            if not isinstance(config, dict):
                raise TokenizerError(f"{config_file} must hold a JSON object")
        pad = config.get("pad_token")
        if isinstance(pad, dict):
            pad = pad.get("content")
        blank = tokenizer.token_to_id(pad) if isinstance(pad, str) else None
        if isinstance(pad, str) and blank is None:
            raise TokenizerError(f"{config_file}: pad_token {pad!r} is not in {file}")
        return cls(tokenizer, default_blank if blank is None else blank, clean_up_spaces(tokenizer, config), path)

    def check_vocab(self, vocab_size: int, blank_id: int) -> None:
        """Refuse a tokenizer that does not fit the model's CTC head."""
        if self.vocab_size > vocab_size:
            raise TokenizerError(
                f"the tokenizer at {self.source or '?'} has {self.vocab_size} tokens; the CTC head has {vocab_size}"
            )
        if self.blank_id != blank_id:
            raise TokenizerError(
                f"the tokenizer's pad token (id {self.blank_id}) is not the model's CTC blank (pad_token_id {blank_id})"
            )

    def decode_tokens(self, tokens: Sequence[int]) -> str:
        """Emitted tokens (already collapsed: `ctc.collapse`) -> text. Nothing is merged here, so a token that
        repeats across a blank is decoded twice; special tokens (and the blank) are skipped."""
        text = self.tokenizer.decode([int(k) for k in tokens if k != self.blank_id], skip_special_tokens=True)
        return clean_up(text) if self.clean_up_tokenization_spaces else text

    def decode_frames(self, ids: Sequence[int]) -> str:
        """One utterance's per-frame best ids -> text: `ParakeetTokenizer.decode(ids, skip_special_tokens=True)`."""
        from granite_jax.text.ctc import collapse

        return self.decode_tokens(collapse(ids, self.blank_id))

    def is_special(self, i: int) -> bool:
        """Whether decoding skips token `i` (a special added token: the blank, <unk> and the like)."""
        return int(i) in self._special

    def token(self, i: int) -> str:
        return self._tokens[i] if 0 <= i < len(self._tokens) else ""

    def starts_word(self, i: int) -> bool:
        return self.token(i).startswith(WORD_MARKERS)

    def labels(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> (labels (B, L) int32 padded with the blank, label_lengths (B,)) for CTC training."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        rows = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {i} is a {type(text).__name__}, not a string")
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
            if self.blank_id in ids:
                raise ValueError(f"text {i} encodes to the blank token (id {self.blank_id}): {text!r}")
            rows.append(ids)
        width = max([len(r) for r in rows] + [1])
        labels = np.full((len(rows), width), self.blank_id, np.int32)
        for i, r in enumerate(rows):
            labels[i, : len(r)] = r
        return labels, np.array([len(r) for r in rows], np.int32)
