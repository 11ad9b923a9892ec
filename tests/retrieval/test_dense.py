"""DenseIndex: exactness of flat, recall of hnsw/ivf, metadata filters, save/load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.retrieval.index import dense
from services.retrieval.index.dense import DenseIndex, default_nlist

N, DIM, K = 5000, 384, 10


def _unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    """Random unit vectors around 256 random centres (embeddings cluster by topic; uniform
    random vectors in 384-d have no neighbours worth the name), and queries near random rows."""
    rng = np.random.default_rng(7)
    centres = _unit(rng.standard_normal((256, DIM)))
    vectors = _unit(centres[rng.integers(0, 256, N)] + 1.5 * _unit(rng.standard_normal((N, DIM))))
    queries = _unit(vectors[rng.integers(0, N, 40)] + 0.45 * _unit(rng.standard_normal((40, DIM))))
    return vectors, queries


@pytest.fixture(scope="module")
def indexes(data: tuple[np.ndarray, np.ndarray]) -> dict[str, DenseIndex]:
    vectors, _ = data
    return {kind: DenseIndex.build(vectors, kind) for kind in ("flat", "hnsw", "ivf")}


def _brute_force(vectors: np.ndarray, query: np.ndarray, k: int, rows: np.ndarray | None = None) -> np.ndarray:
    rows = np.arange(len(vectors)) if rows is None else rows
    scores = vectors[rows] @ query
    return rows[np.lexsort((rows, -scores))[:k]]


def test_flat_is_exact(data: tuple[np.ndarray, np.ndarray], indexes: dict[str, DenseIndex]) -> None:
    vectors, queries = data
    for query in queries:
        ids, scores = indexes["flat"].search(query, K)
        assert ids.dtype == np.int64 and scores.dtype == np.float32
        np.testing.assert_array_equal(ids, _brute_force(vectors, query, K))
        np.testing.assert_allclose(scores, vectors[ids] @ query, atol=1e-5)
        assert np.all(np.diff(scores) <= 0)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_recall(kind: str, data: tuple[np.ndarray, np.ndarray], indexes: dict[str, DenseIndex]) -> None:
    _, queries = data
    hits = 0
    for query in queries:
        truth = set(indexes["flat"].search(query, K)[0].tolist())
        ids, scores = indexes[kind].search(query, K)
        assert len(ids) == K and np.all(ids >= 0) and np.all(np.diff(scores) <= 0)
        hits += len(truth & set(ids.tolist()))
    assert hits / (K * len(queries)) >= 0.9


def test_parameters(indexes: dict[str, DenseIndex]) -> None:
    assert default_nlist(N) == 128  # 4 * sqrt(5000) = 283, but at least 39 points per list
    assert default_nlist(100_000) == 1265
    assert default_nlist(10) == 1
    assert indexes["ivf"].params.ivf_nlist == 128 and indexes["ivf"].params.ivf_nprobe == 16
    assert indexes["hnsw"].params.hnsw_ef_search == 64
    for kind, index in indexes.items():
        assert (index.kind, index.size, index.dimensions) == (kind, N, DIM)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_small_filter_is_exact_over_allowed_rows(
    kind: str, data: tuple[np.ndarray, np.ndarray], indexes: dict[str, DenseIndex]
) -> None:
    vectors, queries = data
    allowed = np.sort(np.random.default_rng(1).choice(N, 200, replace=False)).astype(np.int64)
    for query in queries[:10]:
        ids, _ = indexes[kind].search(query, K, allowed=allowed)
        np.testing.assert_array_equal(ids, _brute_force(vectors, query, K, allowed))
    few = allowed[:3]
    assert sorted(indexes[kind].search(queries[0], K, allowed=few)[0].tolist()) == few.tolist()
    assert len(indexes[kind].search(queries[0], K, allowed=np.empty(0, np.int64))[0]) == 0


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_large_filter_uses_the_index_and_returns_only_allowed_rows(
    kind: str, data: tuple[np.ndarray, np.ndarray], indexes: dict[str, DenseIndex], monkeypatch: pytest.MonkeyPatch
) -> None:
    vectors, queries = data
    monkeypatch.setattr(dense, "EXACT_MAX_ROWS", 100)  # so that 60% of 5000 rows counts as large
    exact_calls: list[int] = []
    original = DenseIndex._search_exact

    def spy(self: DenseIndex, q: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        exact_calls.append(len(allowed))
        return original(self, q, k, allowed)

    monkeypatch.setattr(DenseIndex, "_search_exact", spy)
    mask = np.random.default_rng(2).random(N) < 0.6
    allowed = np.flatnonzero(mask).astype(np.int64)
    hits = 0
    for query in queries:
        ids, _ = indexes[kind].search(query, K, allowed=allowed)
        assert len(ids) == K and mask[ids].all()
        hits += len(set(ids.tolist()) & set(_brute_force(vectors, query, K, allowed).tolist()))
    assert exact_calls == []
    assert hits / (K * len(queries)) >= (1.0 if kind == "flat" else 0.9)


def test_filtered_approximate_search_falls_back_to_exact(
    data: tuple[np.ndarray, np.ndarray], indexes: dict[str, DenseIndex], monkeypatch: pytest.MonkeyPatch
) -> None:
    vectors, queries = data
    monkeypatch.setattr(dense, "EXACT_MAX_ROWS", 0)
    monkeypatch.setattr(dense, "EXACT_MAX_FRACTION", 0.0)
    # rows least similar to the query: the graph search never gets near them
    allowed = np.sort(np.argsort(vectors @ queries[0])[:5]).astype(np.int64)
    ids, _ = indexes["hnsw"].search(queries[0], K, allowed=allowed)
    np.testing.assert_array_equal(ids, _brute_force(vectors, queries[0], K, allowed))


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_save_load_roundtrip(
    kind: str, data: tuple[np.ndarray, np.ndarray], indexes: dict[str, DenseIndex], tmp_path: Path
) -> None:
    _, queries = data
    indexes[kind].save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.json", "index.faiss", "vectors.npy"]
    loaded = DenseIndex.load(tmp_path)
    assert (loaded.kind, loaded.size, loaded.params) == (kind, N, indexes[kind].params)
    assert isinstance(loaded._vectors, np.memmap)
    allowed = np.arange(0, N, 7, dtype=np.int64)
    for query in queries[:10]:
        for rows in (None, allowed):
            got, want = loaded.search(query, K, allowed=rows), indexes[kind].search(query, K, allowed=rows)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])


def test_small_index_never_returns_missing_rows() -> None:
    vectors = _unit(np.random.default_rng(0).standard_normal((6, 8)))
    for kind in ("flat", "hnsw", "ivf"):
        ids, scores = DenseIndex.build(vectors, kind).search(vectors[2], 50)
        assert sorted(ids.tolist()) == list(range(6)), kind
        assert ids[0] == 2 and scores[0] == pytest.approx(1.0, abs=1e-5)
    index = DenseIndex.build(vectors, "flat")
    assert len(index.search(vectors[0], 0)[0]) == 0
    with pytest.raises(ValueError, match="dimensions"):
        index.search(np.ones(5, np.float32), 3)
    with pytest.raises(ValueError, match="allowed"):
        index.search(vectors[0], 3, allowed=np.array([0, 6], dtype=np.int64))
    with pytest.raises(ValueError, match="kind"):
        DenseIndex.build(vectors, "lsh")  # type: ignore[arg-type]
