"""BM25 keyword index over bm25s (Lucene scoring, English stemming and stopwords).

bm25s precomputes each (term, document) score into a CSC matrix, so a query costs the
postings of its terms; top-k selection and the metadata filter are done here.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path

import bm25s
import numpy as np
import Stemmer

from services.retrieval.index.fusion import top_k

STEMMER_LANGUAGE = "english"
STOPWORDS = "en"
_META_FILE = "sparse.json"


class _Analyzer:
    """Text -> stemmed terms: lower-case, split on words of 2+ characters, drop stopwords, stem.

    PyStemmer stemmers keep state, so each thread gets its own.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def _stemmer(self) -> Stemmer.Stemmer:
        stemmer = getattr(self._local, "stemmer", None)
        if stemmer is None:
            stemmer = self._local.stemmer = Stemmer.Stemmer(STEMMER_LANGUAGE)
        return stemmer

    def corpus(self, texts: Sequence[str]) -> bm25s.tokenization.Tokenized:
        return bm25s.tokenize(
            list(texts), lower=True, stopwords=STOPWORDS, stemmer=self._stemmer(), return_ids=True, show_progress=False
        )

    def query(self, text: str) -> list[str]:
        (terms,) = bm25s.tokenize(
            [text], lower=True, stopwords=STOPWORDS, stemmer=self._stemmer(), return_ids=False, show_progress=False
        )
        return terms


class SparseIndex:
    """Documents (rows) scored by BM25. `search` is safe to call from several threads at once."""

    def __init__(self, retriever: bm25s.BM25) -> None:
        self._retriever = retriever
        self._analyzer = _Analyzer()

    @classmethod
    def build(cls, texts: Sequence[str], *, k1: float = 1.2, b: float = 0.75) -> SparseIndex:
        """Index `texts`; row i is texts[i]."""
        if len(texts) == 0:
            raise ValueError("no texts to index")
        analyzer = _Analyzer()
        retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
        retriever.index(analyzer.corpus(texts), show_progress=False)
        return cls(retriever)

    @property
    def size(self) -> int:
        return int(self._retriever.scores["num_docs"])

    def search(self, query: str, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k best rows for a query: (row ids int64, scores float32), best first.

        Only rows sharing a term with the query come back (no zero scores); a query of
        stopwords only matches nothing. `allowed` is the sorted int64 array of admitted rows.
        """
        if k <= 0:
            return _empty()
        vocab = self._retriever.vocab_dict
        # a repeated query term counts once per occurrence, as in bm25s and rank_bm25
        term_ids = [vocab[t] for t in self._analyzer.query(query) if t in vocab]
        if not term_ids:
            return _empty()
        scores = self._retriever.get_scores_from_ids(term_ids)  # float32, one per row
        if allowed is not None:
            allowed = np.asarray(allowed, dtype=np.int64)
            best = top_k(scores[allowed], k)
            rows, best_scores = allowed[best], scores[allowed[best]]
        else:
            rows = top_k(scores, k)
            best_scores = scores[rows]
        keep = best_scores > 0
        return rows[keep].astype(np.int64, copy=False), best_scores[keep].astype(np.float32, copy=False)

    def save(self, directory: Path) -> None:
        """Write the bm25s files and sparse.json (the analyzer settings) into `directory`."""
        directory = Path(directory)
        self._retriever.save(str(directory), show_progress=False)
        meta = {"size": self.size, "stemmer": STEMMER_LANGUAGE, "stopwords": STOPWORDS}
        tmp = directory / f".{_META_FILE}.tmp"
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        tmp.replace(directory / _META_FILE)

    @classmethod
    def load(cls, directory: Path) -> SparseIndex:
        """Read an index written by `save`; the score matrix is memory-mapped."""
        directory = Path(directory)
        meta = json.loads((directory / _META_FILE).read_text())
        if (meta["stemmer"], meta["stopwords"]) != (STEMMER_LANGUAGE, STOPWORDS):
            raise ValueError(f"{directory}: built with analyzer {meta['stemmer']}/{meta['stopwords']}")
        return cls(bm25s.BM25.load(str(directory), mmap=True, show_progress=False))


def _empty() -> tuple[np.ndarray, np.ndarray]:
    return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
