"""Scorers of the rerank service; `load_scorer` picks and loads the one the settings name."""

from __future__ import annotations

from services.rerank.scorers.base import PassageInput, Scorer, ScorerKind
from services.rerank.settings import RerankSettings

__all__ = ["PassageInput", "Scorer", "ScorerKind", "load_scorer"]


def load_scorer(settings: RerankSettings) -> Scorer:
    """Load settings.resolved_scorer() (slow: seconds; minutes for the first ONNX export).

    Raises services.rerank.errors.ScorerLoadError, naming the setting, when it cannot.
    Each implementation is imported only when chosen (the cross-encoder needs torch).
    """
    if settings.resolved_scorer() == "cross_encoder":
        from services.rerank.scorers.cross_encoder import CrossEncoderScorer

        assert settings.model_dir is not None  # the settings validator makes sure
        return CrossEncoderScorer.load(settings.model_dir, batch_size=settings.batch_size, threads=settings.threads)

    from services.rerank.scorers.fallback import FallbackScorer

    return FallbackScorer.load(
        cache_dir=settings.embedding_cache_dir,
        dense_weight=settings.fallback_dense_weight,
        batch_size=settings.batch_size,
        threads=settings.threads,
        backend=settings.embedding_backend,
    )
