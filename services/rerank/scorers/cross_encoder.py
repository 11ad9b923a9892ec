"""A sentence-transformers CrossEncoder loaded from a mounted model folder, on CPU.

No PyPI package ships reranker weights: production mounts a folder (for example
cross-encoder/ms-marco-MiniLM-L6-v2 saved with save_pretrained); tests build a tiny
randomly initialised one. The folder is loaded with local_files_only, never from the Hub.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.rerank.errors import ScorerLoadError
from services.rerank.scorers.base import PassageInput, Scorer, ScorerKind

_log = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
#: *.bin files a Hugging Face folder may hold that are not weights
_NOT_WEIGHTS = frozenset({"training_args.bin", "optimizer.bin", "scheduler.bin", "rng_state.bin"})


def weight_files(model_dir: Path) -> list[Path]:
    """The folder's weight files (*.safetensors, *.bin; top level only), sorted by name."""
    found = {p for pattern in WEIGHT_PATTERNS for p in model_dir.glob(pattern) if p.is_file()}
    return sorted((p for p in found if p.name not in _NOT_WEIGHTS), key=lambda p: p.name)


def weights_sha256(files: Sequence[Path]) -> str:
    """sha256 (hex) of the files' bytes one after the other; for one file, that file's sha256."""
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class CrossEncoderScorer(Scorer):
    """Scores (query, title + newline + text) pairs with `model.predict` (the model's own activation).

    Calls are serialised by a lock: the model's fast tokenizer is reconfigured (padding,
    truncation) on every call and refuses concurrent use ("Already borrowed"), and torch already
    spreads one forward pass over `threads` cores.
    """

    kind = ScorerKind.CROSS_ENCODER

    def __init__(self, model: Any, *, scorer_id: str, model_sha256: str, batch_size: int = 32) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.id = scorer_id
        self.model_sha256 = model_sha256
        self.batch_size = batch_size
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model_dir: Path, *, batch_size: int = 32, threads: int | None = None) -> CrossEncoderScorer:
        """Check and load `model_dir`; ScorerLoadError (naming model_dir) if it is missing or unloadable."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ScorerLoadError("model_dir", model_dir, "not a folder (mount a CrossEncoder model folder there)")
        if not (model_dir / "config.json").is_file():
            raise ScorerLoadError("model_dir", model_dir, "has no config.json: not a Hugging Face model folder")
        files = weight_files(model_dir)
        if not files:
            raise ScorerLoadError("model_dir", model_dir, "has no weight files (*.safetensors or *.bin)")
        try:
            import torch
            from sentence_transformers import CrossEncoder

            if threads is not None:
                torch.set_num_threads(threads)  # process-wide in torch
            model = CrossEncoder(str(model_dir), device="cpu", local_files_only=True)
        except Exception as exc:  # anything the loaders raise means the same thing here
            raise ScorerLoadError(
                "model_dir", model_dir, f"cannot be loaded as a CrossEncoder: {type(exc).__name__}: {exc}"
            ) from exc
        labels = getattr(model, "num_labels", 1)
        if labels != 1:
            raise ScorerLoadError("model_dir", model_dir, f"has {labels} output labels; a reranker has one (a score)")
        sha = weights_sha256(files)
        _log.info(
            "cross-encoder loaded",
            extra={"model_dir": str(model_dir), "model_sha256": sha, "weight_files": [p.name for p in files]},
        )
        return cls(model, scorer_id=model_dir.resolve().name, model_sha256=sha, batch_size=batch_size)

    def score(self, query: str, passages: Sequence[PassageInput]) -> list[float]:
        if not passages:
            return []
        pairs = [(query, p.full_text) for p in passages]
        with self._lock:
            scores = self.model.predict(
                pairs, batch_size=self.batch_size, show_progress_bar=False, convert_to_numpy=True
            )
        return [float(s) for s in scores.reshape(len(passages))]
