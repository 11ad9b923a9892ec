"""Prompt budgets at their exact edges, the trimming rule, and context passages."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from transformers import AutoTokenizer

from services.common.errors import InvalidArgument, NotFound
from services.common.generation import Message, Role, Sampling
from services.gateway.budget import Passage, PromptBudget, TemplateCost, compose
from services.gateway.core import Budget, GatewayRequest, ValidateInput
from services.gateway.servicer import client_address
from services.gateway.settings import RouteClassConfig


class Tokenizer:
    """A stand-in for inference's Tokenize: 3 tokens of template, 4 per message, one per word.
    Like a byte-level BPE it never takes more tokens than bytes + template."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, engine: str, messages: Sequence[Message]) -> int:
        self.calls += 1
        return 3 + sum(4 + len(m.content.split()) for m in messages)


def _user(words: int, tag: str = "w") -> Message:
    return Message(Role.USER, " ".join(f"{tag}{i}" for i in range(words)))


async def test_the_budget_holds_at_its_exact_edge() -> None:
    tok = Tokenizer()
    budget = PromptBudget(tok)
    at_limit = (_user(93),)  # 3 + 4 + 93 = 100 tokens
    assert await tok("e", at_limit) == 100
    assert await budget.fit("e", 100, at_limit, (), allow_trim=False) == (at_limit, (), None)
    with pytest.raises(InvalidArgument) as exc:
        await budget.fit("e", 99, at_limit, (), allow_trim=False)
    [v] = exc.value.violations
    assert v.field == "messages" and "prompt is 100 tokens" in v.description and "at most 99" in v.description


async def test_short_prompts_are_not_counted_exactly() -> None:
    tok = Tokenizer()
    budget = PromptBudget(tok)
    for _ in range(5):
        await budget.fit("e", 1000, (_user(10),), (), allow_trim=False)
    assert tok.calls == 2  # the template's cost, measured once per engine; no per-request call
    await budget.fit("e", 30, (_user(20),), (), allow_trim=False)  # bound over 30: counted (27 tokens)
    assert tok.calls == 3


async def test_trimming_drops_oldest_turns_then_lowest_ranked_passages_and_keeps_system_and_last_user() -> None:
    tok = Tokenizer()
    system = Message(Role.SYSTEM, "be brief")
    messages = (
        system,
        _user(20, "a"),
        Message(Role.ASSISTANT, "x " * 20),
        _user(20, "b"),
        Message(Role.ASSISTANT, "y " * 20),
        _user(5, "last"),
    )
    passages = tuple(Passage(f"p{i}", "word " * 30) for i in range(3))
    full = await tok("e", compose(messages, passages))
    # room for everything but the four old turns and one passage
    limit = full - 4 * 24 - 31  # a passage is 31 words in the context message
    kept, kept_passages, trimmed = await PromptBudget(tok).fit("e", limit, messages, passages, allow_trim=True)
    assert kept == (system, messages[-1])
    assert [p.id for p in kept_passages] == ["p0", "p1"]
    assert trimmed is not None
    assert (trimmed.messages_removed, trimmed.passage_ids_removed) == (4, ("p2",))
    assert trimmed.prompt_tokens_before == full and trimmed.prompt_tokens_after <= limit
    assert trimmed.prompt_tokens_after == await tok("e", compose(kept, kept_passages))


async def test_a_prompt_that_cannot_fit_even_trimmed_is_refused() -> None:
    tok = Tokenizer()
    messages = (_user(5), Message(Role.ASSISTANT, "ok"), _user(50))
    with pytest.raises(InvalidArgument, match="even after trimming"):
        await PromptBudget(tok).fit("e", 40, messages, (Passage("p", "t"),), allow_trim=True)


def test_passages_come_after_leading_system_messages_numbered_by_rank() -> None:
    out = compose(
        (Message(Role.SYSTEM, "sys"), Message(Role.USER, "q")), (Passage("a", "alpha", "A"), Passage("b", "beta"))
    )
    assert [m.role for m in out] == [Role.SYSTEM, Role.SYSTEM, Role.USER]
    assert "[1] A\nalpha" in out[1].content and "[2] beta" in out[1].content


CLASSES = {"chat_short": RouteClassConfig(engine="vllm", max_prompt_tokens=40)}


def _req(**kw) -> GatewayRequest:
    base = dict(request_id="r", route_class="chat_short", prompt=None, messages=(), sampling=Sampling(), engine="e")
    return GatewayRequest(**(base | kw))


async def test_the_budget_policy_names_prompt_for_a_prompt_request_and_composes_context() -> None:
    policy = Budget(CLASSES, PromptBudget(Tokenizer()))
    req = _req(prompt="one two three " * 15)
    await ValidateInput(CLASSES).admit(req)
    with pytest.raises(InvalidArgument) as exc:
        await policy.admit(req)
    assert exc.value.violations[0].field == "prompt"
    fits = _req(messages=(Message(Role.USER, "hi"),), context=(Passage("d1", "short"),))
    await policy.admit(fits)
    assert fits.context == () and [m.role for m in fits.messages] == [Role.SYSTEM, Role.USER]
    trims = _req(
        messages=(_user(30), Message(Role.ASSISTANT, "fine"), Message(Role.USER, "and?")),
        allow_trim=True,
    )
    await policy.admit(trims)
    assert trims.notes["trimmed"] == "messages=1,passages=0" and len(trims.messages) == 2


async def test_passages_are_validated_by_index() -> None:
    req = _req(messages=(Message(Role.USER, "q"),), context=(Passage("ok", "text"), Passage("", "x" * 40_000)))
    with pytest.raises(InvalidArgument) as exc:
        await ValidateInput(CLASSES).admit(req)
    assert {v.field for v in exc.value.violations} == {"context[1].id", "context[1].text"}


def test_the_client_address_comes_from_what_the_edge_appended() -> None:
    spoofed = [("x-forwarded-for", "6.6.6.6, 10.0.0.7")]  # the client wrote 6.6.6.6; the edge appended the rest
    assert client_address(spoofed, "unix:/run/gw.sock", trust_forwarded_for=True) == "10.0.0.7"
    assert client_address(spoofed, "ipv4:127.0.0.1:5000", trust_forwarded_for=False) == "127.0.0.1"
    assert client_address([], "ipv6:[::1]:5000", trust_forwarded_for=True) == "::1"


async def test_the_bound_is_an_upper_bound_for_the_real_chat_template(prepared_model) -> None:
    """With SmolLM2's tokenizer and chat template (its default system prompt included), bytes +
    measured template cost is never below the exact count, for text hard on a tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(prepared_model[0])

    async def count(engine: str, messages: Sequence[Message]) -> int:
        text = tokenizer.apply_chat_template(
            [{"role": m.role.value, "content": m.content} for m in messages], tokenize=False, add_generation_prompt=True
        )
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    bound = TemplateCost(count)
    texts = ["", "a", "hello world", "名前は何ですか 🚀🚀", "<|im_start|> spoof", "\n\n\t  ", "x" * 500, "ab1-" * 100]
    conversations = [[Message(Role.USER, t)] for t in texts] + [
        [Message(Role.SYSTEM, "s"), Message(Role.USER, t), Message(Role.ASSISTANT, t[::-1]), Message(Role.USER, t)]
        for t in texts
    ]
    for conv in conversations:
        exact, upper = await count("e", conv), await bound.bound("e", conv)
        assert exact <= upper, (conv, exact, upper)


async def test_tokens_are_counted_on_the_first_engine_that_exists() -> None:
    tok = Tokenizer()

    async def count(engine: str, messages: Sequence[Message]) -> int:
        if engine == "missing":
            raise NotFound("engine 'missing' does not exist")
        return await tok(engine, messages)

    budget = PromptBudget(count)
    with pytest.raises(InvalidArgument, match="at most 50"):
        await budget.fit(("missing", "e"), 50, (_user(60),), (), allow_trim=False)
    with pytest.raises(NotFound):
        await budget.fit(("missing",), 50, (_user(60),), (), allow_trim=False)
