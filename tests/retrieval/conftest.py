"""Fixtures of the retrieval tests. Most use the machine-wide `embedder` (tests/conftest.py);
the export itself is tested once per session on an empty cache folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.embedding import Embedder


@pytest.fixture(scope="session")
def embedder_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty ONNX cache folder for the session; `exported_embedder` exports into it."""
    return tmp_path_factory.mktemp("embedder-cache")


@pytest.fixture(scope="session")
def exported_embedder(embedder_cache: Path) -> Embedder:
    return Embedder.load(cache_dir=embedder_cache)
