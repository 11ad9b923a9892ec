"""Inference logic: pick the engine, validate, stream, and keep every engine's state fresh."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from services.common import context
from services.common.errors import FieldViolation, InvalidArgument, NotFound
from services.common.generation import Sampling, prompt_text, validate_input
from services.inference.engines.base import Chunk, Engine, EngineStatus, GenerationRequest, Message, Role

log = logging.getLogger(__name__)

ENGINE_PREFIX = "engines/"


@dataclass(slots=True)
class StreamTiming:
    """Filled in while a stream runs."""

    #: seconds from asking the engine to its first text
    engine_ttft_s: float | None = None


@dataclass(frozen=True, slots=True)
class EngineState:
    engine: Engine
    status: EngineStatus
    checked_at: float  # time.time() of the probe


class InferenceCore:
    """Fronts a fixed set of engines, one of them the default."""

    def __init__(
        self, engines: Sequence[Engine], default_engine: str | None = None, health_interval_s: float = 1.0
    ) -> None:
        if not engines:
            raise ValueError("at least one engine is required")
        self._engines = {e.id: e for e in engines}
        self._default = default_engine or engines[0].id
        self._interval = health_interval_s
        self._states = {
            e.id: EngineState(e, EngineStatus(healthy=False, detail="not checked yet"), 0.0) for e in engines
        }
        self._probe_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        for engine in self._engines.values():
            await engine.start()
        await self.probe_all()
        self._probe_task = asyncio.create_task(self._probe_forever(), name="engine-health")

    async def close(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe_task
        for engine in self._engines.values():
            await engine.close()

    def resolve(self, name: str, field: str = "engine") -> Engine:
        """`engines/{id}`, a bare id, or "" for the default engine."""
        engine_id = name.removeprefix(ENGINE_PREFIX) or self._default
        engine = self._engines.get(engine_id)
        if engine is None:
            if "/" in engine_id:
                raise InvalidArgument(FieldViolation(field, f"{name!r} is not of the form engines/{{engine}}"))
            raise NotFound(f"engine {name!r} does not exist; engines: {', '.join(self._engines)}")
        return engine

    async def stream(
        self, engine_name: str, request: GenerationRequest, timing: StreamTiming | None = None
    ) -> AsyncIterator[tuple[Engine, Chunk]]:
        """Validate and stream; closing the iterator aborts the engine's work."""
        engine = self.resolve(engine_name)
        roles = [(m.role if isinstance(m.role, Role) else None, m.content) for m in request.messages]
        validate_input(request.prompt, roles, request.sampling)
        context.annotate(
            engine=engine.id, prompt_sha256=context.prompt_hash(prompt_text(request.prompt, request.messages))
        )
        timing = timing if timing is not None else StreamTiming()
        started = time.perf_counter()
        stream = engine.generate(request)
        try:
            async for chunk in stream:
                if timing.engine_ttft_s is None and chunk.text:
                    timing.engine_ttft_s = time.perf_counter() - started
                    context.annotate(engine_ttft_ms=round(timing.engine_ttft_s * 1e3, 3))
                if chunk.usage is not None:
                    context.annotate(
                        prompt_tokens=chunk.usage.prompt_tokens, completion_tokens=chunk.usage.completion_tokens
                    )
                yield engine, chunk
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    async def tokenize(
        self, engine_name: str, prompt: str | None, messages: Sequence[Message]
    ) -> tuple[Engine, list[int]]:
        engine = self.resolve(engine_name)
        roles = [(m.role if isinstance(m.role, Role) else None, m.content) for m in messages]
        validate_input(prompt, roles, Sampling())
        return engine, await engine.tokenize(prompt, messages)

    def states(self) -> list[EngineState]:
        return list(self._states.values())

    def state(self, name: str) -> EngineState:
        if not name.startswith(ENGINE_PREFIX) or name == ENGINE_PREFIX:
            raise InvalidArgument(FieldViolation("name", f"{name!r} is not of the form engines/{{engine}}"))
        return self._states[self.resolve(name, field="name").id]

    async def probe_all(self) -> None:
        await asyncio.gather(*(self._probe(e) for e in self._engines.values()))

    async def _probe(self, engine: Engine) -> None:
        try:
            status = await engine.check_health()
        except Exception as exc:  # a probe must never kill the loop
            status = EngineStatus(healthy=False, detail=f"health check failed: {exc!r}")
        before = self._states[engine.id].status.healthy
        if before != status.healthy:
            log.info(
                "engine health changed", extra={"engine": engine.id, "healthy": status.healthy, "detail": status.detail}
            )
        self._states[engine.id] = EngineState(engine, status, time.time())

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.probe_all()
