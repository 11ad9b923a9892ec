"""Session fixtures shared by every test area."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.inference.models import ModelCard, prepare_model


@pytest.fixture(scope="session")
def prepared_model() -> tuple[Path, ModelCard]:
    """The SmolLM2 folder in $SERVEMESH_HOME/models, prepared once per machine like the CLI does."""
    home = Path(os.environ.get("SERVEMESH_HOME") or Path.home() / ".local" / "share" / "servemesh")
    return prepare_model(home / "models")


# The real engine (vLLM) and the mesh in front of it, started once per session.
pytest_plugins = ["tests.engine_fixtures"]
