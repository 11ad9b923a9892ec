"""Prompt budgets: a route class's limit on prompt tokens, exact at its edge, and the
trimming rule for requests that allow it.

Counting every prompt exactly would cost a Tokenize call to inference per request. The
engines' tokenizers are byte-level BPE, so a message's content never takes more tokens
than it has UTF-8 bytes; with the chat template's cost per message measured once per
engine (the `TemplateCost`), bytes + template cost is an upper bound on the prompt's
tokens. Only a prompt whose bound is over the limit is counted exactly, so the common
case costs no call and the edge is still exact: `tokens <= limit` is admitted,
`limit + 1` is not.

The trimming rule (`allow_trim`), applied one item at a time until the prompt fits:
1. the oldest conversation messages, oldest first; system messages and the last user
   message (with anything after it) are never removed;
2. then context passages, lowest-ranked (last) first.
If the prompt still does not fit, the request fails as if trimming were not allowed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from services.common.errors import FieldViolation, InvalidArgument, NotFound, Unavailable
from services.common.generation import Message, Role

#: tokens of a conversation on an engine, chat template and generation prompt included
CountTokens = Callable[[str, Sequence[Message]], Awaitable[int]]


@dataclass(frozen=True, slots=True)
class Passage:
    """A retrieved passage given as context; its position in the request is its rank."""

    id: str
    text: str
    title: str = ""


@dataclass(frozen=True, slots=True)
class Trimmed:
    messages_removed: int
    passage_ids_removed: tuple[str, ...]
    prompt_tokens_before: int
    prompt_tokens_after: int


def context_message(passages: Sequence[Passage]) -> Message:
    """The passages as the one system message the model sees, numbered from [1] by rank."""
    parts = ["Answer from these passages; cite them by number, like [1]."]
    for i, p in enumerate(passages, 1):
        parts.append(f"[{i}] {p.title}\n{p.text}" if p.title else f"[{i}] {p.text}")
    return Message(Role.SYSTEM, "\n\n".join(parts))


def compose(messages: Sequence[Message], passages: Sequence[Passage]) -> tuple[Message, ...]:
    """The conversation the engine gets: leading system messages, the context message, the rest."""
    if not passages:
        return tuple(messages)
    lead = 0
    while lead < len(messages) and messages[lead].role is Role.SYSTEM:
        lead += 1
    return (*messages[:lead], context_message(passages), *messages[lead:])


class TemplateCost:
    """An upper bound on the chat template's tokens, measured once per engine: the cost of
    an empty conversation and of each further message (+ a margin for role names)."""

    MARGIN_PER_MESSAGE = 4

    def __init__(self, count: CountTokens) -> None:
        self._count = count
        self._cost: dict[str, tuple[int, int]] = {}

    async def bound(self, engine: str, messages: Sequence[Message]) -> int:
        if engine not in self._cost:  # one-character turns: engines refuse empty user messages
            x = (Message(Role.USER, "x"), Message(Role.ASSISTANT, "x"))
            one = await self._count(engine, x[:1])
            two = await self._count(engine, [*x, x[0]])
            self._cost[engine] = (one, max(0, (two - one + 1) // 2) + self.MARGIN_PER_MESSAGE)
        base, per_message = self._cost[engine]
        return base + per_message * max(0, len(messages) - 1) + sum(len(m.content.encode()) for m in messages)


class PromptBudget:
    """Enforce `limit` prompt tokens on a conversation, trimming when allowed."""

    def __init__(self, count: CountTokens) -> None:
        self._count = count
        self._bound = TemplateCost(count)

    async def fit(
        self,
        engines: str | Sequence[str],
        limit: int,
        messages: tuple[Message, ...],
        passages: tuple[Passage, ...],
        allow_trim: bool,
        field: str = "messages",
    ) -> tuple[tuple[Message, ...], tuple[Passage, ...], Trimmed | None]:
        """The conversation and passages to send, and what was trimmed (None = nothing).
        Raises InvalidArgument on `field`, naming the limit, when the prompt cannot fit.

        Tokens are counted on the first of `engines` that can count (the routed engine, then
        its fallbacks): the one the request goes to when the first is missing or down."""
        if isinstance(engines, str):
            engines = (engines,)
        engine = await self._counting_engine(engines)
        composed = compose(messages, passages)
        if await self._bound.bound(engine, composed) <= limit:
            return messages, passages, None
        before = tokens = await self._count(engine, composed)
        if tokens <= limit:
            return messages, passages, None
        if not allow_trim:
            raise self._over(field, tokens, limit, trimmed=False)
        removed_messages, removed_passages = 0, []
        while tokens > limit:
            index = _oldest_removable(messages)
            if index is not None:
                messages = messages[:index] + messages[index + 1 :]
                removed_messages += 1
            elif passages:
                removed_passages.append(passages[-1].id)
                passages = passages[:-1]
            else:
                raise self._over(field, tokens, limit, trimmed=True)
            tokens = await self._count(engine, compose(messages, passages))
        return messages, passages, Trimmed(removed_messages, tuple(removed_passages), before, tokens)

    async def _counting_engine(self, engines: Sequence[str]) -> str:
        """The first engine whose template cost can be measured; the last one's error if none."""
        for i, engine in enumerate(engines):
            try:
                await self._bound.bound(engine, ())
                return engine
            except (NotFound, Unavailable):
                if i == len(engines) - 1:
                    raise
        raise ValueError("no engine to count tokens on")

    @staticmethod
    def _over(field: str, tokens: int, limit: int, *, trimmed: bool) -> InvalidArgument:
        how = (
            "even after trimming every removable message and passage"
            if trimmed
            else "set allow_trim to drop the oldest turns and lowest-ranked passages"
        )
        return InvalidArgument(
            FieldViolation(field, f"prompt is {tokens} tokens; this route class allows at most {limit} ({how})")
        )


def _oldest_removable(messages: tuple[Message, ...]) -> int | None:
    """Index of the oldest message that is neither a system message nor at or after the
    last user message."""
    last_user = max((i for i, m in enumerate(messages) if m.role is Role.USER), default=len(messages))
    return next((i for i in range(last_user) if messages[i].role is not Role.SYSTEM), None)
