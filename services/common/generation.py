"""Generation domain types and input limits, shared by the gateway and inference.

Both services validate the same public limits; `validate_input` names the
offending field with the caller's own field paths (e.g. "params.temperature" in the
gateway, "sampling.temperature" in inference).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from services.common.errors import FieldViolation, InvalidArgument

MAX_PROMPT_CHARS = 32_768
MAX_MESSAGES = 64
MAX_STOP = 4
MAX_STOP_CHARS = 64
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_P_RANGE = (0.0, 1.0)  # exclusive at 0
MAX_TOKENS_RANGE = (1, 4096)
REPETITION_PENALTY_RANGE = (1.0, 2.0)


class Role(StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class Sampling:
    """Decoding parameters; None means the engine's (or route class's) default."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    repetition_penalty: float | None = None


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """Exactly one of `prompt` (raw text, no chat template) and `messages` is set."""

    request_id: str
    prompt: str | None = None
    messages: tuple[Message, ...] = ()
    sampling: Sampling = field(default_factory=Sampling)
    #: also compute the mean log-probability of the output (the last chunk's mean_logprob)
    return_logprobs: bool = False


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Chunk:
    """A text delta; the last chunk of a stream has finish_reason and usage set."""

    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    #: last chunk only, when logprobs were asked for: mean natural-log probability of the
    #: generated tokens under the model's raw distribution; None when not asked or unknown
    mean_logprob: float | None = None


def validate_input(
    prompt: str | None,
    messages: Sequence[tuple[Role | None, str]],
    sampling: Sampling,
    *,
    prompt_field: str = "prompt",
    messages_field: str = "messages",
    sampling_field: str = "sampling",
    extra: Sequence[FieldViolation] = (),
) -> None:
    """Raise InvalidArgument listing every violation (`extra` ones from the caller first)."""
    bad = [
        *extra,
        *input_violations(
            prompt,
            messages,
            sampling,
            prompt_field=prompt_field,
            messages_field=messages_field,
            sampling_field=sampling_field,
        ),
    ]
    if bad:
        raise InvalidArgument(bad)


def input_violations(
    prompt: str | None,
    messages: Sequence[tuple[Role | None, str]],
    sampling: Sampling,
    *,
    prompt_field: str = "prompt",
    messages_field: str = "messages",
    sampling_field: str = "sampling",
) -> list[FieldViolation]:
    """Every violation of the input limits; `messages` holds (role or None if
    unknown/unset, content) pairs so each caller maps its own enum first."""
    bad: list[FieldViolation] = []
    if prompt and messages:
        bad.append(FieldViolation(prompt_field, f"set exactly one of {prompt_field} and {messages_field}"))
    elif not prompt and not messages:
        bad.append(FieldViolation(messages_field, f"one of {messages_field} and {prompt_field} is required"))
    if prompt and len(prompt) > MAX_PROMPT_CHARS:
        bad.append(FieldViolation(prompt_field, f"is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}"))
    if len(messages) > MAX_MESSAGES:
        bad.append(FieldViolation(messages_field, f"has {len(messages)} messages; the limit is {MAX_MESSAGES}"))
    for i, (role, content) in enumerate(messages[:MAX_MESSAGES]):
        where = f"{messages_field}[{i}]"
        if role is None:
            bad.append(FieldViolation(f"{where}.role", "must be one of system, user, assistant"))
        elif not content and role is not Role.ASSISTANT:
            bad.append(FieldViolation(f"{where}.content", "must not be empty"))
        if len(content) > MAX_PROMPT_CHARS:
            bad.append(
                FieldViolation(f"{where}.content", f"is {len(content)} characters; the limit is {MAX_PROMPT_CHARS}")
            )
    if messages and messages[-1][0] is Role.ASSISTANT and not messages[-1][1]:
        bad.append(FieldViolation(f"{messages_field}[{len(messages) - 1}].content", "must not be empty"))
    return bad + sampling_violations(sampling, sampling_field)


def sampling_violations(s: Sampling, prefix: str) -> list[FieldViolation]:
    bad: list[FieldViolation] = []

    def check(name: str, value: float | None, lo: float, hi: float, lo_open: bool = False) -> None:
        if value is None:
            return
        ok = not math.isnan(value) and (lo < value if lo_open else lo <= value) and value <= hi
        if not ok:
            bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
            bad.append(FieldViolation(f"{prefix}.{name}", f"is {value}; must be in {bound}"))

    check("temperature", s.temperature, *TEMPERATURE_RANGE)
    check("top_p", s.top_p, *TOP_P_RANGE, lo_open=True)
    check("max_tokens", s.max_tokens, *MAX_TOKENS_RANGE)
    check("repetition_penalty", s.repetition_penalty, *REPETITION_PENALTY_RANGE)
    if len(s.stop) > MAX_STOP:
        bad.append(FieldViolation(f"{prefix}.stop", f"has {len(s.stop)} strings; the limit is {MAX_STOP}"))
    for i, stop in enumerate(s.stop[:MAX_STOP]):
        if not 1 <= len(stop) <= MAX_STOP_CHARS:
            bad.append(FieldViolation(f"{prefix}.stop[{i}]", f"must be 1 to {MAX_STOP_CHARS} characters"))
    return bad


def prompt_text(prompt: str | None, messages: Sequence[Message]) -> str:
    """The request's input as one string, for hashing into logs (never logged itself)."""
    if prompt is not None:
        return prompt
    return "\x1e".join(f"{m.role}:{m.content}" for m in messages)
