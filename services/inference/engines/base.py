"""The engine abstraction: everything the inference service needs from a backend.

An engine turns a GenerationRequest into an async iterator of Chunks. Closing the
iterator early (the caller cancelled, or its deadline expired) must abort the work
in the backend; `abort` does the same by request id.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

# The domain types live in services.common.generation (the gateway shares them);
# engines import them from here.
from services.common.generation import (  # noqa: F401 - re-exported
    Chunk,
    FinishReason,
    GenerationRequest,
    Message,
    Role,
    Sampling,
    Usage,
)


@dataclass(frozen=True, slots=True)
class EngineStatus:
    healthy: bool
    detail: str = ""
    queue_depth: int = 0
    running_requests: int = 0
    kv_cache_usage: float = 0.0
    ttft_p50_s: float | None = None


class Engine(abc.ABC):
    """One backend. Implementations: vllm / trtllm (openai_server.py), small (small.py)."""

    #: engine id, e.g. "vllm"; the resource name is engines/{id}
    id: str
    #: "vllm" | "trtllm" | "small"
    kind: str
    #: model id as the backend names it
    model: str
    #: sha256 of the model card, hex; "" when unknown
    card_sha256: str = ""
    #: URL of the backend, or "in-process"
    endpoint: str
    #: context length (prompt + output) in tokens
    max_model_len: int

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open clients or load weights. Called once before any request."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release clients, threads and memory."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Stream the completion. Raising or closing the iterator aborts the backend work."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Abort a running request; a no-op when it is not running."""

    @abc.abstractmethod
    async def check_health(self) -> EngineStatus:
        """Probe the backend now (health endpoint, metrics) and return its live state."""

    @abc.abstractmethod
    def ready(self) -> bool:
        """Whether the last health check passed; cheap, no I/O."""

    @abc.abstractmethod
    async def tokenize(self, prompt: str | None, messages: Sequence[Message]) -> list[int]:
        """Token ids of a raw prompt, or of messages rendered with the chat template and
        the generation prompt (what generate() would feed the model)."""
