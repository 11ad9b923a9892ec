"""What GetVersion reports: release, build commit, environment, and the models behind the engines."""

from __future__ import annotations

import subprocess
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path


@dataclass(frozen=True, slots=True)
class ModelInfo:
    engine: str
    model: str
    card_sha256: str


@dataclass(frozen=True, slots=True)
class Version:
    version: str
    build_commit: str
    environment: str
    models: tuple[ModelInfo, ...]


def build_commit(configured: str = "") -> str:
    """The configured commit (set by image builds), else the checkout's HEAD, else "unknown"."""
    if configured:
        return configured
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


class VersionInfo:
    def __init__(
        self, commit: str, environment: str, list_models: Callable[[], Awaitable[Sequence[ModelInfo]]]
    ) -> None:
        try:
            release = metadata.version("servemesh")
        except metadata.PackageNotFoundError:
            release = "0+unknown"
        self._static = (release, commit, environment)
        self._list_models = list_models

    async def current(self) -> Version:
        return Version(*self._static, models=tuple(await self._list_models()))
