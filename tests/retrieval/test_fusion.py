"""Fusion of dense and sparse hits, checked against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from services.retrieval.index.fusion import Fused, rrf, top_k, weighted


def hits(ids: list[int], scores: list[float]) -> tuple[np.ndarray, np.ndarray]:
    return np.array(ids, dtype=np.int64), np.array(scores, dtype=np.float32)


DENSE = hits([1, 2, 3], [0.9, 0.5, 0.1])
SPARSE = hits([3, 4], [10.0, 4.0])
EMPTY = hits([], [])


def test_rrf_hand_computed() -> None:
    got = rrf(DENSE, SPARSE, top_k=10)
    # row 3: 1/63 + 1/61; row 1: 1/61; rows 2 and 4 tie at 1/62 and the lower row wins
    assert [f.row for f in got] == [3, 1, 2, 4]
    assert [f.score for f in got] == pytest.approx([1 / 63 + 1 / 61, 1 / 61, 1 / 62, 1 / 62])
    assert got[0] == Fused(row=3, score=pytest.approx(1 / 63 + 1 / 61), dense=pytest.approx(0.1), sparse=10.0)
    assert (got[1].dense, got[1].sparse) == (pytest.approx(0.9), None)
    assert (got[3].dense, got[3].sparse) == (None, 4.0)


def test_rrf_k_and_top_k() -> None:
    got = rrf(DENSE, SPARSE, k=0, top_k=2)
    assert [(f.row, f.score) for f in got] == [(3, pytest.approx(1 / 3 + 1)), (1, pytest.approx(1.0))]
    assert rrf(EMPTY, EMPTY, top_k=5) == []
    assert rrf(DENSE, SPARSE, top_k=0) == []
    with pytest.raises(ValueError, match="k must"):
        rrf(DENSE, SPARSE, k=-1, top_k=3)


def test_weighted_hand_computed() -> None:
    # dense normalises to 1, 0.5, 0 (rows 1, 2, 3); sparse to 1, 0 (rows 3, 4)
    got = weighted(DENSE, SPARSE, alpha=0.7, top_k=10)
    assert [(f.row, f.score) for f in got] == [
        (1, pytest.approx(0.7)),
        (2, pytest.approx(0.35)),
        (3, pytest.approx(0.3)),
        (4, pytest.approx(0.0)),
    ]
    even = weighted(DENSE, SPARSE, top_k=2)  # rows 1 and 3 tie at 0.5: the lower row first
    assert [(f.row, f.score) for f in even] == [(1, pytest.approx(0.5)), (3, pytest.approx(0.5))]
    assert (even[1].dense, even[1].sparse) == (pytest.approx(0.1), 10.0)


def test_weighted_degenerate_lists_normalise_to_one() -> None:
    single = weighted(hits([7], [0.2]), hits([8, 9], [3.0, 3.0]), alpha=0.25, top_k=10)
    assert [(f.row, f.score) for f in single] == [(8, 0.75), (9, 0.75), (7, 0.25)]
    only_dense = weighted(DENSE, EMPTY, alpha=1.0, top_k=10)
    assert [f.row for f in only_dense] == [1, 2, 3] and all(f.sparse is None for f in only_dense)
    assert [f.score for f in only_dense] == pytest.approx([1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="alpha"):
        weighted(DENSE, SPARSE, alpha=1.5, top_k=3)


def test_top_k_breaks_ties_by_lower_position() -> None:
    scores = np.array([0.5, 0.9, 0.5, 0.1, 0.5, 0.9], dtype=np.float32)
    assert top_k(scores, 3).tolist() == [1, 5, 0]
    assert top_k(scores, 4).tolist() == [1, 5, 0, 2]
    assert top_k(scores, 10).tolist() == [1, 5, 0, 2, 4, 3]
    assert top_k(scores, 0).tolist() == [] and top_k(np.empty(0, np.float32), 3).tolist() == []
    rng = np.random.default_rng(0)
    many = rng.integers(0, 5, 1000).astype(np.float32)  # heavy ties
    assert top_k(many, 50).tolist() == sorted(range(1000), key=lambda i: (-many[i], i))[:50]
