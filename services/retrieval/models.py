"""Domain objects of the retrieval service (no grpc, no protobuf)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class MediaType(StrEnum):
    TEXT = "text"
    MARKDOWN = "markdown"
    HTML = "html"
    PDF = "pdf"


@dataclass(frozen=True, slots=True)
class Section:
    """A run of a document's text under the same headings: text[start:end] (code points)."""

    headings: tuple[str, ...]
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class ParsedDocument:
    """A file turned into plain text, with the sections its headings start.

    Sections cover the text in order without overlapping; text outside every section
    (none, usually) is not indexed.
    """

    title: str
    text: str
    sections: tuple[Section, ...]
    media_type: MediaType


@dataclass(frozen=True, slots=True)
class Document:
    """A document of an index's corpus, as stored."""

    document_id: str
    filename: str
    title: str
    text: str
    sections: tuple[Section, ...]
    media_type: MediaType
    content_sha256: str
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Chunk:
    """A span of a document that is indexed and returned by searches.

    `start`/`end` are code-point offsets into the document's text; `text` is
    document.text[start:end]. `headings` are the section's headings, outermost first.
    """

    chunk_id: str
    document_id: str
    title: str
    headings: tuple[str, ...]
    text: str
    start: int
    end: int
    metadata: Mapping[str, str] = field(default_factory=dict)

    def indexed_text(self) -> str:
        """What the embedder and BM25 see: title and headings, then the text, so a chunk
        deep in a section still matches its document's subject."""
        context = " > ".join(h for h in (self.title, *self.headings) if h)
        return f"{context}\n{self.text}" if context else self.text

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (a build's chunks.jsonl holds one per line)."""
        return asdict(self) | {"headings": list(self.headings), "metadata": dict(self.metadata)}

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> Chunk:
        return cls(**{**row, "headings": tuple(row["headings"])})
