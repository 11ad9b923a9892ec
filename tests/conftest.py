"""Session fixtures shared by every test area."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from services.inference.models import ModelCard, prepare_model

if TYPE_CHECKING:
    from services.common.embedding import Embedder


def _home() -> Path:
    return Path(os.environ.get("SERVEMESH_HOME") or Path.home() / ".local" / "share" / "servemesh")


@pytest.fixture(scope="session")
def prepared_model() -> tuple[Path, ModelCard]:
    """The SmolLM2 folder in $SERVEMESH_HOME/models, prepared once per machine like the CLI does."""
    return prepare_model(_home() / "models")


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    """all-MiniLM-L6-v2 on ONNX Runtime, exported once per machine where `servemesh up` keeps it."""
    from services.common.embedding import Embedder

    return Embedder.load(cache_dir=_home() / "models" / "onnx")


# The real engine (vLLM) and the mesh in front of it, started once per session.
pytest_plugins = ["tests.engine_fixtures"]
