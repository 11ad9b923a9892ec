"""The scorer family: a small abstract class; one module per implementation (see load_scorer)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum


class ScorerKind(StrEnum):
    CROSS_ENCODER = "cross_encoder"
    FALLBACK = "fallback"


@dataclass(frozen=True, slots=True)
class PassageInput:
    """A candidate passage as the caller sent it (already validated by the core)."""

    id: str
    text: str
    title: str = ""

    @property
    def full_text(self) -> str:
        """What the scorers read: the title, a newline and the text (just the text without a title)."""
        return f"{self.title}\n{self.text}" if self.title else self.text


class Scorer(ABC):
    """Scores passages against a query; higher is more relevant, comparable within one call only.

    `score` is synchronous and CPU-bound: the core runs it in a worker thread and bounds how
    many run at once, so implementations need to be safe for that many concurrent calls.
    """

    #: shown to callers (RerankResponse.scorer, GetScorer): the model folder's name, or "fallback/..."
    id: str
    kind: ScorerKind
    #: sha256 (hex) of the weights; "" when the scorer loads none
    model_sha256: str

    @abstractmethod
    def score(self, query: str, passages: Sequence[PassageInput]) -> list[float]:
        """One score per passage, in the passages' order."""
