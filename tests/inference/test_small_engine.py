"""The small in-process engine on the prepared SmolLM2 folder."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from services.common.errors import Aborted, InvalidArgument
from services.inference.engines.base import (
    Chunk,
    FinishReason,
    GenerationRequest,
    Message,
    Role,
    Sampling,
)
from services.inference.engines.small import SmallEngine, _StopText
from services.inference.models import ModelCard

QUESTION = (Message(Role.USER, "List the planets of the solar system, one per line."),)
SHORT_ANSWER = (Message(Role.USER, "What is the capital of France?"),)  # greedy: one sentence, then EOS


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engine(prepared_model: tuple[Path, ModelCard]) -> AsyncIterator[SmallEngine]:
    folder, card = prepared_model
    eng = SmallEngine("small", folder, model_id=card.model_id, card_sha256=card.sha256(), max_model_len=2048)
    await eng.start()
    yield eng
    await eng.close()


async def _run(
    engine: SmallEngine,
    request_id: str,
    *,
    messages: tuple[Message, ...] = QUESTION,
    prompt: str | None = None,
    **sampling: object,
) -> list[Chunk]:
    request = GenerationRequest(
        request_id, prompt=prompt, messages=() if prompt is not None else messages, sampling=Sampling(**sampling)
    )  # type: ignore[arg-type]
    return [chunk async for chunk in engine.generate(request)]


def _text(chunks: list[Chunk]) -> str:
    return "".join(c.text for c in chunks)


def _decode_threads(request_id: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"small-engine:{request_id}" and t.is_alive()]


async def test_greedy_is_repeatable_and_streams(engine: SmallEngine) -> None:
    first = await _run(engine, "greedy-1", temperature=0, max_tokens=24)
    second = await _run(engine, "greedy-2", temperature=0, max_tokens=24)
    assert _text(first) and _text(first) == _text(second)
    assert len([c for c in first if c.text]) > 3, "text must arrive as several deltas, not one block"
    assert all(c.finish_reason is None and c.usage is None for c in first[:-1])
    assert first[-1].finish_reason is not None and first[-1].usage is not None
    status = await engine.check_health()
    assert status.healthy and engine.ready() and status.ttft_p50_s is not None and status.ttft_p50_s > 0


@pytest.mark.parametrize(
    ("messages", "finish"), [(SHORT_ANSWER, FinishReason.STOP), (QUESTION, FinishReason.LENGTH)], ids=["eos", "length"]
)
async def test_matches_transformers_greedy_generate(
    engine: SmallEngine, messages: tuple[Message, ...], finish: FinishReason
) -> None:
    """Text and completion_tokens agree with HF generate() on the same weights (generated ids, EOS included)."""
    import torch

    chunks = await _run(engine, "ref", messages=messages, temperature=0, max_tokens=30)
    ids = await engine.tokenize(None, messages)
    with torch.inference_mode():
        out = engine._model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=30,
        )
    new_ids = out[0, len(ids) :].tolist()
    last = chunks[-1]
    assert last.finish_reason == finish
    assert (new_ids[-1] in engine._eos_ids) == (finish == FinishReason.STOP)
    assert last.usage is not None
    assert last.usage.prompt_tokens == len(ids)
    assert last.usage.completion_tokens == len(new_ids)
    assert _text(chunks) == engine._tokenizer.decode(new_ids, skip_special_tokens=True)


async def test_max_tokens_gives_length(engine: SmallEngine) -> None:
    chunks = await _run(engine, "len5", temperature=0, max_tokens=5)
    assert chunks[-1].finish_reason == FinishReason.LENGTH
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


async def test_stop_string_cuts_text_before_it(engine: SmallEngine) -> None:
    full = _text(await _run(engine, "full", temperature=0, max_tokens=30))
    words = full.split()
    assert len(words) >= 4, full
    stop = words[3]
    expected = full[: full.index(stop)]
    chunks = await _run(engine, "stopped", temperature=0, max_tokens=30, stop=(stop,))
    assert _text(chunks) == expected
    assert stop not in _text(chunks)
    assert chunks[-1].finish_reason == FinishReason.STOP


async def test_seeded_sampling_is_repeatable(engine: SmallEngine) -> None:
    a = await _run(engine, "seed-a", temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, repetition_penalty=1.2)
    b = await _run(engine, "seed-b", temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, repetition_penalty=1.2)
    assert _text(a) == _text(b) and _text(a)


async def test_tokenize_agrees_with_usage(engine: SmallEngine) -> None:
    ids = await engine.tokenize(None, QUESTION)
    chunks = await _run(engine, "count", temperature=0, max_tokens=2)
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == len(ids)
    prompt = "The capital of France is"
    raw = await engine.tokenize(prompt, [])
    assert raw == engine._tokenizer(prompt)["input_ids"]
    chunks = await _run(engine, "count-raw", prompt=prompt, temperature=0, max_tokens=2)
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == len(raw)
    assert "<|im_start|>" not in engine._tokenizer.decode(raw) and "<|im_start|>assistant" in (
        engine._tokenizer.decode(ids)
    )


async def test_overlong_prompt_is_invalid_argument(engine: SmallEngine) -> None:
    prompt = "hello " * 3000
    n = len(await engine.tokenize(prompt, []))
    with pytest.raises(InvalidArgument) as info:
        await _run(engine, "too-long", prompt=prompt, max_tokens=5)
    violation = info.value.violations[0]
    assert violation.field == "prompt"
    assert str(n) in violation.description and "2047" in violation.description
    status = await engine.check_health()
    assert status.running_requests == 0 and status.queue_depth == 0


async def test_bad_sampling_is_invalid_argument(engine: SmallEngine) -> None:
    with pytest.raises(InvalidArgument) as info:
        await _run(engine, "bad", temperature=-1, top_p=0)
    assert {v.field for v in info.value.violations} == {"sampling.temperature", "sampling.top_p"}


async def _wait_idle(engine: SmallEngine, request_id: str, limit_s: float = 3.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        status = await engine.check_health()
        if status.running_requests == 0 and not _decode_threads(request_id):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"decode thread of {request_id} still running {limit_s}s after the stream was closed")


async def test_aclose_stops_the_decode_thread(engine: SmallEngine) -> None:
    stream = engine.generate(
        GenerationRequest("early", messages=QUESTION, sampling=Sampling(temperature=0, max_tokens=1000))
    )
    got = 0
    async for chunk in stream:  # type: ignore[attr-defined]
        got += bool(chunk.text)
        if got == 2:
            break
    assert _decode_threads("early"), "the decode thread should be running mid-stream"
    t0 = time.monotonic()
    await stream.aclose()  # type: ignore[attr-defined]
    await _wait_idle(engine, "early")
    assert time.monotonic() - t0 < 2.0, "closing the stream must stop decoding within a step or two"


async def test_cancelled_consumer_stops_the_decode_thread(engine: SmallEngine) -> None:
    first = asyncio.Event()

    async def consume() -> None:
        async for chunk in engine.generate(
            GenerationRequest("cancel", messages=QUESTION, sampling=Sampling(temperature=0, max_tokens=1000))
        ):
            if chunk.text:
                first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 20)
    t0 = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _wait_idle(engine, "cancel")
    assert time.monotonic() - t0 < 2.0, "cancelling the consumer must stop decoding within a step or two"


async def test_requests_beyond_concurrency_wait_and_abort(engine: SmallEngine) -> None:
    started = asyncio.Event()

    async def consume(request_id: str, max_tokens: int) -> list[Chunk]:
        out = []
        async for chunk in engine.generate(
            GenerationRequest(request_id, messages=QUESTION, sampling=Sampling(temperature=0, max_tokens=max_tokens))
        ):
            out.append(chunk)
            started.set()
        return out

    running = asyncio.create_task(consume("q-running", 1000))
    await asyncio.wait_for(started.wait(), 20)
    waiting = asyncio.create_task(consume("q-waiting", 3))
    await asyncio.sleep(0.05)
    status = await engine.check_health()
    assert (status.running_requests, status.queue_depth) == (1, 1)
    await engine.abort("q-running")
    with pytest.raises(Aborted):
        await running
    chunks = await asyncio.wait_for(waiting, 20)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    status = await engine.check_health()
    assert (status.running_requests, status.queue_depth) == (0, 0)


class _CharTokenizer:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


def test_stop_text_holds_back_partial_stop_strings() -> None:
    text = _StopText(_CharTokenizer(), ("END",))
    ids: list[int] = []
    deltas = []
    for ch in "abcEN":
        ids.append(ord(ch))
        deltas.append(text.update(ids))
    assert "".join(d for d, _ in deltas) == "abc", "a possible start of 'END' must be held back"
    ids.append(ord("D"))
    assert text.update(ids) == ("", True)
    other = _StopText(_CharTokenizer(), ("END",))
    assert other.update([ord(c) for c in "xyE"]) == ("xy", False)
    assert other.flush() == "E", "a held-back prefix is output when generation ends another way"


async def test_mean_logprob_is_the_raw_model_logprob_of_the_output(engine: SmallEngine) -> None:
    """Asked for, the last chunk carries the mean log-probability of the generated tokens under
    the model's raw distribution (before the repetition penalty), as HF's unprocessed logits give it."""
    import torch

    request = GenerationRequest(
        "logprob",
        messages=QUESTION,
        sampling=Sampling(temperature=0, max_tokens=12, repetition_penalty=1.3),
        return_logprobs=True,
    )
    chunks = [chunk async for chunk in engine.generate(request)]
    mean = chunks[-1].mean_logprob
    assert mean is not None and math.isfinite(mean) and mean < 0
    assert all(c.mean_logprob is None for c in chunks[:-1])
    ids = await engine.tokenize(None, QUESTION)
    with torch.inference_mode():
        out = engine._model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=12,
            repetition_penalty=1.3,
            output_logits=True,
            return_dict_in_generate=True,
        )
    new_ids = out.sequences[0, len(ids) :].tolist()
    assert _text(chunks) == engine._tokenizer.decode(new_ids, skip_special_tokens=True)
    raw = [float(torch.log_softmax(step[0].float(), -1)[tok]) for step, tok in zip(out.logits, new_ids, strict=True)]
    assert mean == pytest.approx(sum(raw) / len(raw), abs=1e-3)
    plain = await _run(engine, "no-logprob", temperature=0, max_tokens=4)
    assert plain[-1].mean_logprob is None, "not asked for"
