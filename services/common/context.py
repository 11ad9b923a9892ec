"""Per-request context (request id, deadline, access-log fields) carried in a contextvar.

grpc.aio runs every RPC in its own asyncio task, so a value bound by the server
interceptor is visible to the handler and to anything it awaits (including outgoing
calls made through services.common.client), and never leaks into another request.
"""

from __future__ import annotations

import hashlib
import logging
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

# Names annotate() may not use: the LogRecord attributes plus the keys every JSON log
# line or access-log line already carries.
RESERVED_LOG_FIELDS: frozenset[str] = frozenset(vars(logging.LogRecord("", logging.INFO, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "ts",
    "level",
    "service",
    "logger",
    "msg",
    "exc",
    "request_id",
    "trace_id",
    "method",
    "grpc_service",
    "code",
    "latency_ms",
    "error",
}


@dataclass(slots=True)
class RequestState:
    """What the server interceptor knows about the request being served."""

    request_id: str
    deadline: float | None  # absolute time.monotonic() value
    fields: dict[str, Any] = field(default_factory=dict)


_current: ContextVar[RequestState | None] = ContextVar("servemesh_request", default=None)


def bind(request_id: str, deadline: float | None) -> RequestState:
    """Start a request scope in the current context (used by the server interceptor)."""
    state = RequestState(request_id=request_id, deadline=deadline)
    _current.set(state)
    return state


def current() -> RequestState | None:
    """The current request's state, or None outside a request."""
    return _current.get()


def request_id() -> str:
    """The current request id; "" outside a request."""
    state = _current.get()
    return state.request_id if state else ""


def deadline() -> float | None:
    """Absolute time.monotonic() deadline of the current inbound call, None if it has none."""
    state = _current.get()
    return state.deadline if state else None


def remaining_timeout() -> float | None:
    """Seconds left before the current call's deadline (never negative), None without one."""
    limit = deadline()
    if limit is None:
        return None
    return max(0.0, limit - time.monotonic())


def annotate(**fields: Any) -> None:
    """Add fields (token counts, prompt_sha256, engine, ...) to the current access-log line.

    A no-op outside a request. Values must be JSON-serialisable; never pass raw prompts.
    """
    bad = RESERVED_LOG_FIELDS.intersection(fields)
    if bad:
        raise ValueError(f"reserved access-log field name(s): {', '.join(sorted(bad))}")
    state = _current.get()
    if state is not None:
        state.fields.update(fields)


def prompt_hash(text: str) -> str:
    """First 16 hex chars of the prompt's sha256: what logs carry instead of the prompt."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
