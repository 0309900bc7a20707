"""CLIP byte-level BPE tokenizer, offline, from the vocabulary file OpenAI published with CLIP (MIT licence).

``assets/bpe_simple_vocab_16e6.txt.gz`` is the merge list that the CLIP tokenizer (and the HF ``CLIPTokenizer``
used by the official SegVol code) is built from; ids follow the same construction, so "liver" ->
[49406, 12639, 49407]. No download at run time and no dependency on transformers.
"""
from __future__ import annotations

import functools
import gzip
import html
import re
from pathlib import Path

import torch

VOCAB_FILE = Path(__file__).with_name("assets") / "bpe_simple_vocab_16e6.txt.gz"
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
PROMPT_TEMPLATE = "A computerized tomography of a {}."
# 49408 ids = 256 byte symbols + the same with an end-of-word marker + 48894 merges + the 2 special tokens.
_NUM_MERGES = 49408 - 2 * 256 - 2

# CLIP splits on letters, single digits and runs of other symbols. Python's `re` has no \p{L}/\p{N}: [^\W\d_] is
# "letters", \d "digits"; this differs from the original only on exotic numerals (e.g. superscripts).
_SPLIT = re.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+", re.IGNORECASE)


@functools.lru_cache(maxsize=1)
def _byte_symbols() -> dict[int, str]:
    """Reversible byte -> printable character map of byte-level BPE (printable bytes map to themselves)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class CLIPTokenizer:
    """Text -> CLIP token ids, padded to the longest text with <|endoftext|> and an attention mask."""

    def __init__(self, vocab_file: Path = VOCAB_FILE, max_length: int = 77) -> None:
        with gzip.open(vocab_file, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:1 + _NUM_MERGES]]
        symbols = list(_byte_symbols().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START_OF_TEXT, END_OF_TEXT]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.max_length = max_length
        self.sot = self.encoder[START_OF_TEXT]
        self.eot = self.encoder[END_OF_TEXT]
        self._cache: dict[str, list[str]] = {}

    def _bpe(self, word: str) -> list[str]:
        if word in self._cache:
            return self._cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts[:-1], parts[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        """One text -> [<|startoftext|>, ..., <|endoftext|>], truncated to ``max_length``."""
        text = " ".join(html.unescape(html.unescape(text)).split()).lower()
        symbols = _byte_symbols()
        ids = [self.sot]
        for piece in _SPLIT.findall(text):
            mapped = "".join(symbols[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[p] for p in self._bpe(mapped))
        ids = ids[: self.max_length - 1]
        return ids + [self.eot]

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> (input_ids (B, L) int64, attention_mask (B, L) int64), padded with <|endoftext|>."""
        encoded = [self.encode(t) for t in texts]
        length = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), length), self.eot, dtype=torch.int64)
        mask = torch.zeros((len(encoded), length), dtype=torch.int64)
        for row, e in enumerate(encoded):
            ids[row, : len(e)] = torch.tensor(e)
            mask[row, : len(e)] = 1
        return ids, mask


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> CLIPTokenizer:
    """The process-wide tokenizer (built once: reading the merges takes ~0.3 s)."""
    return CLIPTokenizer()


def organ_prompts(names: list[str]) -> list[str]:
    """Organ names -> the sentence template SegVol was trained with."""
    return [PROMPT_TEMPLATE.format(n) for n in names]
