"""SparseIndex: BM25 ranking, stemming, stopwords, filters, save/load."""

from __future__ import annotations

import math
from pathlib import Path

import bm25s
import numpy as np
import pytest
import Stemmer

from services.retrieval.index.sparse import SparseIndex

DOCS = [
    "The river flows past the old mill and the water is cold.",  # 0
    "Cash flow statements list money coming in and going out.",  # 1
    "The old mill was rebuilt after the fire.",  # 2
    "A gentle stream runs through the valley.",  # 3
    "Photosynthesis converts light into chemical energy in the mill of the leaf.",  # 4
    "The mill owner sold flour at the market.",  # 5
]


@pytest.fixture(scope="module")
def index() -> SparseIndex:
    return SparseIndex.build(DOCS)


def test_rare_term_ranks_first(index: SparseIndex) -> None:
    ids, scores = index.search("mill photosynthesis", 10)
    assert ids[0] == 4
    assert sorted(ids.tolist()) == [0, 2, 4, 5]  # only documents sharing a term; no zero scores
    assert np.all(scores > 0) and np.all(np.diff(scores) <= 0)
    assert ids.dtype == np.int64 and scores.dtype == np.float32


def test_stemming_matches_inflections(index: SparseIndex) -> None:
    assert sorted(index.search("flows", 10)[0].tolist()) == [0, 1]  # "flows" and "flow"
    assert sorted(index.search("FLOWING", 10)[0].tolist()) == [0, 1]


def test_scores_are_lucene_bm25(index: SparseIndex) -> None:
    # "photosynthesis" occurs once in doc 4 only; terms per doc after stopwords and stemming
    lengths = [len(bm25s.tokenize(d, stopwords="en", show_progress=False, return_ids=False)[0]) for d in DOCS]
    n, tf, k1, b = len(DOCS), 1, 1.2, 0.75
    idf = math.log(1 + (n - 1 + 0.5) / (1 + 0.5))
    expected = idf * tf / (tf + k1 * (1 - b + b * lengths[4] / (sum(lengths) / n)))
    ids, scores = index.search("photosynthesis", 3)
    assert ids.tolist() == [4]
    assert scores[0] == pytest.approx(expected, rel=1e-5)


def test_matches_bm25s_retrieve(index: SparseIndex) -> None:
    stemmer = Stemmer.Stemmer("english")
    reference = bm25s.BM25(k1=1.2, b=0.75, method="lucene")
    reference.index(bm25s.tokenize(DOCS, stopwords="en", stemmer=stemmer, show_progress=False), show_progress=False)
    query = "the old mill flows into the market"
    tokens = bm25s.tokenize([query], stopwords="en", stemmer=stemmer, show_progress=False, return_ids=False)
    want_ids, want_scores = reference.retrieve(tokens, k=4, show_progress=False)
    ids, scores = index.search(query, 4)
    np.testing.assert_array_equal(ids, want_ids[0])
    np.testing.assert_allclose(scores, want_scores[0], rtol=1e-5)


def test_filter_returns_only_allowed_rows(index: SparseIndex) -> None:
    allowed = np.array([0, 3, 5], dtype=np.int64)
    ids, scores = index.search("mill photosynthesis", 10, allowed=allowed)
    full_ids, full_scores = index.search("mill photosynthesis", 10)
    keep = np.isin(full_ids, allowed)
    assert sorted(ids.tolist()) == [0, 5]
    np.testing.assert_array_equal(ids, full_ids[keep])
    np.testing.assert_array_equal(scores, full_scores[keep])
    assert len(index.search("photosynthesis", 10, allowed=allowed)[0]) == 0
    assert len(index.search("mill", 10, allowed=np.empty(0, np.int64))[0]) == 0


def test_queries_without_known_terms_match_nothing(index: SparseIndex) -> None:
    for query in ["the of and is", "", "   ", "zebra", "a b c"]:
        ids, scores = index.search(query, 10)
        assert len(ids) == 0 and len(scores) == 0, query


def test_top_k_and_ties(index: SparseIndex) -> None:
    assert index.search("mill", 2)[0].tolist() == index.search("mill", 10)[0][:2].tolist()
    assert len(index.search("mill", 0)[0]) == 0
    twins = SparseIndex.build(["alpha beta", "gamma", "alpha beta", "alpha beta"])
    ids, scores = twins.search("beta", 3)
    assert ids.tolist() == [0, 2, 3] and scores[0] == scores[2]


def test_save_load_roundtrip(index: SparseIndex, tmp_path: Path) -> None:
    index.save(tmp_path)
    loaded = SparseIndex.load(tmp_path)
    assert loaded.size == index.size == len(DOCS)
    assert isinstance(loaded._retriever.scores["data"], np.memmap)
    for query in ["mill photosynthesis", "flows", "old market flour", "the"]:
        got, want = loaded.search(query, 10), index.search(query, 10)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_build_rejects_empty_corpus() -> None:
    with pytest.raises(ValueError, match="no texts"):
        SparseIndex.build([])
