"""Dense vector index over FAISS (inner product on L2-normalised vectors = cosine).

The float32 vectors are kept next to the FAISS index (memory-mapped after `load`): a search
whose metadata filter admits few rows is answered exactly from them, which is both faster
and better than filtering inside an approximate index.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from services.retrieval.index.fusion import top_k

Kind = Literal["flat", "hnsw", "ivf"]
KINDS: tuple[Kind, ...] = ("flat", "hnsw", "ivf")

# A filter admitting at most this many rows (or this share of them) is searched exactly with
# numpy over the admitted vectors; measured at 384-d: ~1.5 ms for 5k rows, ~10 ms for 20k.
EXACT_MAX_ROWS = 8192
EXACT_MAX_FRACTION = 0.05
IVF_MIN_POINTS_PER_LIST = 39  # FAISS k-means warns below this many training points per centroid

_INDEX_FILE = "index.faiss"
_VECTORS_FILE = "vectors.npy"
_META_FILE = "dense.json"


@dataclass(frozen=True, slots=True)
class DenseParams:
    """Build and search parameters (only those of the index's kind matter)."""

    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 64
    ivf_nlist: int = 0
    ivf_nprobe: int = 16


class DenseIndex:
    """Rows of L2-normalised float32 vectors, searched by inner product.

    `search` is safe to call from several threads at once.
    """

    def __init__(self, index: faiss.Index, vectors: np.ndarray, kind: Kind, params: DenseParams) -> None:
        if index.ntotal != len(vectors):
            raise ValueError(f"index has {index.ntotal} vectors, vector file {len(vectors)}")
        self._index = index
        self._vectors = vectors
        self._kind: Kind = kind
        self._params = params

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        kind: Kind,
        *,
        hnsw_m: int = 32,
        hnsw_ef_construction: int = 80,
        hnsw_ef_search: int = 64,
        ivf_nlist: int | None = None,
        ivf_nprobe: int = 16,
    ) -> DenseIndex:
        """Index `vectors` (n, d); row i of the index is vectors[i].

        IVF trains its centroids on the vectors; `ivf_nlist` defaults to about 4*sqrt(n),
        lowered so that every list has enough training points.
        """
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ValueError(f"vectors must be a non-empty (n, d) array, got shape {vectors.shape}")
        n, dim = vectors.shape
        if kind == "flat":
            index: faiss.Index = faiss.IndexFlatIP(dim)
            params = DenseParams()
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = hnsw_ef_construction
            index.hnsw.efSearch = hnsw_ef_search
            params = DenseParams(
                hnsw_m=hnsw_m, hnsw_ef_construction=hnsw_ef_construction, hnsw_ef_search=hnsw_ef_search
            )
        elif kind == "ivf":
            nlist = ivf_nlist if ivf_nlist is not None else default_nlist(n)
            if not 1 <= nlist <= n:
                raise ValueError(f"ivf_nlist must be in [1, {n}], got {nlist}")
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)  # keeps a ref
            index.train(vectors)
            index.nprobe = min(ivf_nprobe, nlist)
            params = DenseParams(ivf_nlist=nlist, ivf_nprobe=min(ivf_nprobe, nlist))
        else:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        index.add(vectors)
        return cls(index, vectors, kind, params)

    @property
    def kind(self) -> Kind:
        return self._kind

    @property
    def size(self) -> int:
        return int(self._index.ntotal)

    @property
    def dimensions(self) -> int:
        return int(self._index.d)

    @property
    def params(self) -> DenseParams:
        return self._params

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k best rows for one query vector: (row ids int64, scores float32), best first.

        `allowed`, if given, is the sorted int64 array of rows a metadata filter admits; only
        those are returned. Fewer than k rows come back when fewer exist.
        """
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.dimensions:
            raise ValueError(f"query has {q.shape[0]} dimensions, index {self.dimensions}")
        if k <= 0:
            return _empty()
        if allowed is None:
            return self._search_index(q, k, None)
        allowed = np.asarray(allowed, dtype=np.int64)
        if len(allowed) == 0:
            return _empty()
        if allowed[0] < 0 or allowed[-1] >= self.size:
            raise ValueError(f"allowed rows must be sorted and within [0, {self.size})")
        if len(allowed) <= max(EXACT_MAX_ROWS, EXACT_MAX_FRACTION * self.size):
            return self._search_exact(q, k, allowed)
        ids, scores = self._search_index(q, k, allowed)
        if len(ids) < min(k, len(allowed)):
            # the approximate index found too few admitted rows near the query
            return self._search_exact(q, k, allowed)
        return ids, scores

    def save(self, directory: Path) -> None:
        """Write index.faiss, vectors.npy and dense.json into `directory` (each file atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        index_tmp = directory / f".{_INDEX_FILE}.tmp"
        faiss.write_index(self._index, str(index_tmp))
        os.replace(index_tmp, directory / _INDEX_FILE)
        vectors_tmp = directory / f".{_VECTORS_FILE}.tmp"
        with vectors_tmp.open("wb") as f:
            np.save(f, np.asarray(self._vectors, dtype=np.float32))
        os.replace(vectors_tmp, directory / _VECTORS_FILE)
        meta = {"kind": self._kind, "size": self.size, "dimensions": self.dimensions, **asdict(self._params)}
        meta_tmp = directory / f".{_META_FILE}.tmp"
        meta_tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(meta_tmp, directory / _META_FILE)

    @classmethod
    def load(cls, directory: Path) -> DenseIndex:
        """Read an index written by `save`; the vectors are memory-mapped read-only."""
        directory = Path(directory)
        meta = json.loads((directory / _META_FILE).read_text())
        kind = meta["kind"]
        if kind not in KINDS:
            raise ValueError(f"{directory}: unknown index kind {kind!r}")
        params = DenseParams(**{f: meta[f] for f in DenseParams.__dataclass_fields__})
        index = faiss.read_index(str(directory / _INDEX_FILE))
        vectors = np.load(directory / _VECTORS_FILE, mmap_mode="r")
        return cls(index, vectors, kind, params)

    def _search_index(self, q: np.ndarray, k: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        selector = _bitmap_selector(allowed, self.size) if allowed is not None else None
        if self._kind == "hnsw":
            ef = max(self._params.hnsw_ef_search, k)
            params: faiss.SearchParameters | None = faiss.SearchParametersHNSW(efSearch=ef, sel=selector)
        elif self._kind == "ivf":
            params = faiss.SearchParametersIVF(nprobe=self._params.ivf_nprobe, sel=selector)
        elif selector is not None:
            params = faiss.SearchParameters(sel=selector)
        else:
            params = None
        with _omp_threads(1):  # one query: OpenMP start-up costs more than it parallelises
            scores, ids = self._index.search(q[None, :], min(k, self.size), params=params)
        keep = ids[0] >= 0
        return ids[0][keep].astype(np.int64, copy=False), scores[0][keep].astype(np.float32, copy=False)

    def _search_exact(self, q: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = np.take(self._vectors, allowed, axis=0) @ q
        best = top_k(scores, k)
        return allowed[best], scores[best].astype(np.float32, copy=False)


def default_nlist(n: int) -> int:
    """About 4*sqrt(n) inverted lists, but never fewer than IVF_MIN_POINTS_PER_LIST points each."""
    return max(1, min(round(4 * math.sqrt(n)), n // IVF_MIN_POINTS_PER_LIST))


def _bitmap_selector(allowed: np.ndarray, n: int) -> faiss.IDSelectorBitmap:
    mask = np.zeros(n, dtype=bool)
    mask[allowed] = True
    # the wrapper keeps a reference to the bits for the selector's lifetime
    return faiss.IDSelectorBitmap(np.packbits(mask, bitorder="little"))


@contextmanager
def _omp_threads(n: int) -> Iterator[None]:
    """Run FAISS with n OpenMP threads in this thread only (libgomp keeps the setting per thread)."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _empty() -> tuple[np.ndarray, np.ndarray]:
    return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
