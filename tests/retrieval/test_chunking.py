"""Chunking documents into overlapping word-piece windows cut between words."""

from __future__ import annotations

import random
from itertools import pairwise

import pytest
from tokenizers import Tokenizer

from services.retrieval.ingest import chunking
from services.retrieval.ingest.chunking import Chunker, minilm_tokenizer
from services.retrieval.ingest.parsers import parse
from services.retrieval.models import Chunk, Document, MediaType, Section

# Each of these is one word piece (checked in test_the_plain_words_are_one_piece_each).
PLAIN = (
    "the river flows past old mill and under stone bridge into green valley where small boats rest near quiet town"
).split()
LONG_WORDS = ["electroencephalography", "antidisestablishmentarianism", "aerodynamically", "magnetohydrodynamics"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return minilm_tokenizer()


def document(text: str, sections: list[Section] | None = None, **metadata: str) -> Document:
    return Document(
        document_id="doc-1",
        filename="doc.txt",
        title="A title",
        text=text,
        sections=tuple(sections or [Section((), 0, len(text))]),
        media_type=MediaType.TEXT,
        content_sha256="0" * 64,
        metadata=metadata,
    )


def from_file(data: str, filename: str) -> Document:
    parsed = parse(data.encode(), filename, None, max_bytes=2**20)
    return Document("doc-1", filename, parsed.title, parsed.text, parsed.sections, parsed.media_type, "0" * 64)


def plain_words(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for start in range(0, n, 12):
        lines.append(" ".join(rng.choice(PLAIN) for _ in range(min(12, n - start))))
    return "\n".join(lines)


def tokens_in(tokenizer: Tokenizer, doc: Document, start: int, end: int) -> list[tuple[int, int]]:
    """Pieces of the whole document's tokenisation that fall in [start, end), as document offsets."""
    section = next(s for s in doc.sections if s.start <= start and end <= s.end)
    encoding = tokenizer.encode(doc.text[section.start : section.end], add_special_tokens=False)
    spans = [(section.start + a, section.start + b) for a, b in encoding.offsets]
    return [(a, b) for a, b in spans if start <= a and b <= end]


def assert_chunks_cover_the_text_exactly(tokenizer: Tokenizer, doc: Document, chunks: list[Chunk], size: int) -> None:
    assert [c.chunk_id for c in chunks] == [f"doc-1#{n}" for n in range(len(chunks))]
    for chunk in chunks:
        assert chunk.text == doc.text[chunk.start : chunk.end]
        assert chunk.text == chunk.text.strip() and chunk.text
        assert chunk.document_id == "doc-1" and chunk.title == doc.title
        assert dict(chunk.metadata) == dict(doc.metadata)
        section = next(s for s in doc.sections if s.start <= chunk.start < s.end)
        assert chunk.end <= section.end and chunk.headings == section.headings
        pieces = tokens_in(tokenizer, doc, chunk.start, chunk.end)
        assert 0 < len(pieces) <= size
        assert (pieces[0][0], pieces[-1][1]) == (chunk.start, chunk.end)  # snapped to pieces
    for section in doc.sections:
        inside = [c for c in chunks if section.start <= c.start < section.end]
        covered = set()
        for chunk in inside:
            covered.update(tokens_in(tokenizer, doc, chunk.start, chunk.end))
        assert covered == set(tokens_in(tokenizer, doc, section.start, section.end))
        ends = [c.end for c in inside]
        assert ends == sorted(set(ends))  # each window reaches past the previous one: no contained tail


def test_minilm_tokenizer_neither_pads_nor_truncates(tokenizer: Tokenizer) -> None:
    assert tokenizer.padding is None and tokenizer.truncation is None
    assert len(tokenizer.encode("word " * 600, add_special_tokens=False).ids) == 600


def test_tokenizer_offsets_are_code_points_of_the_python_string(tokenizer: Tokenizer) -> None:
    text = "café naïve 東京 𝒳 x"
    encoding = tokenizer.encode(text, add_special_tokens=False)
    assert [text[a:b] for a, b in encoding.offsets] == ["café", "naïve", "東", "京", "𝒳", "x"]


def test_the_plain_words_are_one_piece_each(tokenizer: Tokenizer) -> None:
    assert all(len(tokenizer.encode(word, add_special_tokens=False).ids) == 1 for word in PLAIN)
    assert all(len(tokenizer.encode(word, add_special_tokens=False).ids) > 1 for word in LONG_WORDS)


@pytest.mark.parametrize(
    ("chunk_tokens", "overlap", "message"),
    [
        (31, 0, "chunk_tokens must be an integer between 32 and 256, got 31"),
        (257, 0, "chunk_tokens must be an integer between 32 and 256, got 257"),
        (64.0, 0, "chunk_tokens must be an integer between 32 and 256"),
        (64, -1, "overlap must be an integer between 0 and chunk_tokens // 2 (32), got -1"),
        (64, 33, "overlap must be an integer between 0 and chunk_tokens // 2 (32), got 33"),
        (64, True, "overlap must be an integer"),
    ],
)
def test_parameters_out_of_range_are_refused_by_name(
    tokenizer: Tokenizer, chunk_tokens: int, overlap: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Chunker(tokenizer, chunk_tokens, overlap)


@pytest.mark.parametrize(("chunk_tokens", "overlap"), [(32, 0), (32, 16), (256, 128)])
def test_the_range_limits_are_accepted(tokenizer: Tokenizer, chunk_tokens: int, overlap: int) -> None:
    assert Chunker(tokenizer, chunk_tokens, overlap).chunk_tokens == chunk_tokens


def test_full_windows_hold_chunk_tokens_pieces_and_overlap_by_overlap(tokenizer: Tokenizer) -> None:
    doc = document(plain_words(300), source="unit")
    chunks = Chunker(tokenizer, 40, 10).chunk(doc)
    assert_chunks_cover_the_text_exactly(tokenizer, doc, chunks, 40)
    sizes = [len(tokens_in(tokenizer, doc, c.start, c.end)) for c in chunks]
    assert sizes[:-1] == [40] * (len(chunks) - 1) and 10 < sizes[-1] <= 40
    assert len(chunks) == 1 + -(-(300 - 40) // 30)  # windows advance by chunk_tokens - overlap
    for before, after in pairwise(chunks):
        assert after.start < before.end
        assert len(tokens_in(tokenizer, doc, after.start, before.end)) == 10
    assert chunks[0].start == 0 and chunks[-1].end == len(doc.text)
    assert all(c.metadata == {"source": "unit"} for c in chunks)


def test_without_overlap_chunks_are_adjacent(tokenizer: Tokenizer) -> None:
    doc = document(plain_words(200))
    chunks = Chunker(tokenizer, 64, 0).chunk(doc)
    assert_chunks_cover_the_text_exactly(tokenizer, doc, chunks, 64)
    for before, after in pairwise(chunks):
        assert before.end < after.start and not doc.text[before.end : after.start].strip()
    assert " ".join(c.text for c in chunks).split() == doc.text.split()


def test_a_section_shorter_than_a_window_is_one_chunk(tokenizer: Tokenizer) -> None:
    doc = document("  \n Short section of text.\n\n ")
    [chunk] = Chunker(tokenizer, 32, 8).chunk(doc)
    assert (chunk.text, chunk.start, chunk.end) == ("Short section of text.", 4, 26)


def test_chunks_never_cross_sections_and_carry_their_headings(tokenizer: Tokenizer) -> None:
    markdown = f"# Wings\n\n{plain_words(90, 1)}\n\n## Flaps\n\nShort.\n\n## Slats\n\n{plain_words(70, 2)}\n"
    doc = from_file(markdown, "wings.md")
    chunks = Chunker(tokenizer, 32, 8).chunk(doc)
    assert_chunks_cover_the_text_exactly(tokenizer, doc, chunks, 32)
    assert {c.headings for c in chunks} == {("Wings",), ("Wings", "Flaps"), ("Wings", "Slats")}
    assert [c.text for c in chunks if c.headings == ("Wings", "Flaps")] == ["Flaps\n\nShort."]
    assert all(c.title == "Wings" for c in chunks)
    assert chunks[0].text.startswith("Wings\n\n")


def test_words_are_never_split_across_windows(tokenizer: Tokenizer) -> None:
    rng = random.Random(3)
    text = " ".join(rng.choice(LONG_WORDS + PLAIN[:4]) for _ in range(200))
    doc = document(text)
    chunks = Chunker(tokenizer, 32, 12).chunk(doc)
    assert_chunks_cover_the_text_exactly(tokenizer, doc, chunks, 32)
    assert len(chunks) > 10
    for chunk in chunks:
        assert chunk.start == 0 or text[chunk.start - 1] == " "
        assert chunk.end == len(text) or text[chunk.end] == " "


def test_a_spaceless_run_is_cut_between_its_tokenizer_words(tokenizer: Tokenizer) -> None:
    text = "-".join(["aerodynamically", "unbelievable"] * 20)  # 120 pieces, no whitespace
    doc = document(text)
    chunks = Chunker(tokenizer, 32, 8).chunk(doc)
    assert_chunks_cover_the_text_exactly(tokenizer, doc, chunks, 32)
    assert len(chunks) > 3
    for chunk in chunks:
        assert chunk.text[0] == "-" or chunk.text.startswith(("aerodynamically", "unbelievable"))
        assert chunk.text[-1] == "-" or chunk.text.endswith(("aerodynamically", "unbelievable"))


def test_a_word_longer_than_a_window_is_cut_anyway(tokenizer: Tokenizer) -> None:
    word = "qzxvkjwqpzxv" * 8  # 96 single-letter pieces
    doc = document(f"before {word} after")
    chunks = Chunker(tokenizer, 32, 0).chunk(doc)
    assert_chunks_cover_the_text_exactly(tokenizer, doc, chunks, 32)
    assert "".join(c.text for c in chunks) == f"before{word}after"
    assert [len(tokens_in(tokenizer, doc, c.start, c.end)) for c in chunks] == [1, 32, 32, 32, 1]


def test_non_ascii_text_keeps_exact_code_point_offsets(tokenizer: Tokenizer) -> None:
    phrase = "café naïve 東京 𝒳 Straße ﬁne e.g. İstanbul 😀 crème brûlée "
    text = (phrase * 20).strip()
    doc = document(text)
    chunks = Chunker(tokenizer, 32, 8).chunk(doc)
    assert_chunks_cover_the_text_exactly(tokenizer, doc, chunks, 32)
    assert chunks[0].text.startswith("café naïve 東京 𝒳")
    assert chunks[-1].text.endswith("crème brûlée")
    for chunk in chunks:
        assert chunk.start == 0 or text[chunk.start - 1] == " "


def test_the_callers_tokenizer_is_left_as_it_was(tokenizer: Tokenizer) -> None:
    padded = Tokenizer.from_str(tokenizer.to_str())
    padded.enable_padding(length=128)
    padded.enable_truncation(max_length=128)
    doc = document(plain_words(300))
    chunks = Chunker(padded, 64, 16).chunk(doc)
    assert_chunks_cover_the_text_exactly(tokenizer, doc, chunks, 64)
    assert padded.padding is not None and padded.truncation is not None


def test_chunks_stay_exact_when_the_word_memo_starts_afresh(
    tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chunking, "_MEMO_WORDS", 30)  # fewer than the words of one document
    chunker = Chunker(tokenizer, 32, 8)
    fresh = [f"w{n}x" for n in range(20)]
    for seed, words in enumerate((PLAIN, [*PLAIN, *fresh], [*LONG_WORDS, *fresh])):  # 20, 20 + 20 new, 4 new
        rng = random.Random(seed)
        doc = document(" ".join(rng.choices(words, k=150)))
        assert_chunks_cover_the_text_exactly(tokenizer, doc, chunker.chunk(doc), 32)
