"""The small in-process engine: the prepared SmolLM2 folder on CPU with transformers.

It is the fallback when no vLLM / TensorRT-LLM server is up. Each request runs a manual
decode loop (prefill in chunks, then one token per forward with the KV cache) in its own
thread, which streams chunks to the event loop and checks a stop flag between forwards,
so closing the stream or `abort()` ends the work within one decode step. At most
`max_concurrency` requests decode at once; the rest wait in FIFO order.

dtype: float32 by default. Measured on this 2-core AVX2 machine (no AVX-512/AMX; one
process, interleaved runs, other work on the machine): float32 prefills ~5x faster
(TTFT 0.26 s vs 1.0-1.5 s for a 42-token chat prompt, 2.3 s vs 10-13 s for 537 tokens)
because CPU bf16 matmuls have no native kernel here; bf16 decodes faster only at short
contexts (~19 vs ~13.5 tokens/s at 42 tokens; equal, ~12, at 537) because decode is
memory bound. End to end they tie on short chats and float32 wins everything longer, so
float32 it is; dtype="bfloat16" halves the memory (270 MB instead of 540 MB).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import hashlib
import statistics
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.errors import (
    Aborted,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    Unavailable,
)
from services.common.generation import sampling_violations
from services.inference.engines.base import (
    Chunk,
    Engine,
    EngineStatus,
    FinishReason,
    GenerationRequest,
    Message,
    Sampling,
    Usage,
)

DEFAULT_MAX_TOKENS = 256
PREFILL_CHUNK = 512
_DTYPES = ("bfloat16", "float32")


@dataclass(frozen=True, slots=True)
class _Params:
    """Sampling with the engine's defaults filled in."""

    temperature: float
    top_p: float
    max_tokens: int
    stop: tuple[str, ...]
    seed: int | None
    repetition_penalty: float


@dataclass(eq=False)
class _Job:
    """One request: shared between the event loop and its decode thread."""

    request_id: str
    prompt_ids: list[int]
    max_new: int
    params: _Params
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Chunk | BaseException]
    done: asyncio.Future[None]
    submitted: float
    stop: threading.Event = field(default_factory=threading.Event)
    waiter: asyncio.Future[None] | None = None
    thread: threading.Thread | None = None
    first_token_at: float | None = None
    cached_tokens: int = 0
    #: sum the raw log-probabilities of the generated tokens (for the last chunk's mean_logprob)
    logprobs: bool = False

    def put(self, item: Chunk | BaseException) -> None:
        """Hand an item to the consumer (called from the decode thread)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.stop.set()


class SmallEngine(Engine):
    """transformers on CPU, in-process; see the module docstring."""

    kind = "small"
    endpoint = "in-process"

    def __init__(
        self,
        engine_id: str,
        model_dir: Path,
        *,
        model_id: str,
        card_sha256: str = "",
        max_model_len: int = 2048,
        max_concurrency: int = 1,
        threads: int | None = None,
        dtype: str = "float32",
    ) -> None:
        if max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if threads is not None and threads < 1:
            raise ValueError("threads must be at least 1")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}")
        self.id = engine_id
        self.model = model_id
        self.card_sha256 = card_sha256
        self.max_model_len = max_model_len
        self._model_dir = Path(model_dir)
        self._max_concurrency = max_concurrency
        self._threads = threads
        self._dtype = dtype
        self._model: Any = None
        self._tokenizer: Any = None
        self._eos_ids: frozenset[int] = frozenset()
        self._jobs: dict[str, _Job] = {}
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._active = 0
        self._ttft: collections.deque[float] = collections.deque(maxlen=100)
        self._closed = False

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load tokenizer and weights in a worker thread (a few seconds), then warm up."""
        if self._model is None:
            self._model, self._tokenizer, self._eos_ids = await asyncio.to_thread(self._load)

    def _load(self) -> tuple[Any, Any, frozenset[int]]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._check_card()
        if self._threads is not None:
            torch.set_num_threads(self._threads)  # process-wide: torch has one intra-op pool
        tokenizer = AutoTokenizer.from_pretrained(str(self._model_dir), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(self._model_dir), dtype=getattr(torch, self._dtype), local_files_only=True
        )
        model.eval()
        eos = model.generation_config.eos_token_id
        eos_ids = {*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id} - {None}
        with torch.inference_mode():  # the first forward is slow; keep it out of the first request's TTFT
            model(input_ids=torch.tensor([tokenizer("warm up")["input_ids"]]), use_cache=True)
        return model, tokenizer, frozenset(int(i) for i in eos_ids)

    def _check_card(self) -> None:
        """When a card hash was given, the folder's card.json must match it."""
        if not self.card_sha256:
            return
        card = self._model_dir / "card.json"
        try:
            actual = hashlib.sha256(card.read_bytes()).hexdigest()
        except OSError as exc:
            raise FailedPrecondition(f"{card}: cannot read the model card: {exc}") from None
        if actual != self.card_sha256:
            raise FailedPrecondition(f"{card}: sha256 {actual} does not match the expected card {self.card_sha256}")

    async def close(self) -> None:
        """Abort everything, wait for the decode threads, and drop the weights."""
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(Unavailable(f"engine {self.id} is closing"))
        jobs = list(self._jobs.values())
        for job in jobs:
            job.stop.set()
        pending = [job.done for job in jobs if job.thread is not None]
        if pending:
            await asyncio.wait(pending, timeout=30)
        self._model = self._tokenizer = None
        gc.collect()

    # ------------------------------------------------------------ state

    def ready(self) -> bool:
        return self._model is not None and not self._closed

    async def check_health(self) -> EngineStatus:
        loaded = self.ready()
        detail = (
            f"{self._model_dir.name} loaded ({self._dtype}, in-process)"
            if loaded
            else "closed"
            if self._closed
            else "not loaded"
        )
        cached = sum(job.cached_tokens for job in self._jobs.values())
        return EngineStatus(
            healthy=loaded,
            detail=detail,
            queue_depth=len(self._waiters),
            running_requests=self._active,
            kv_cache_usage=min(1.0, cached / (self.max_model_len * self._max_concurrency)),
            ttft_p50_s=statistics.median(self._ttft) if self._ttft else None,
        )

    # ------------------------------------------------------------ tokenizing

    async def tokenize(self, prompt: str | None, messages: Sequence[Message]) -> list[int]:
        self._require_ready()
        return self._encode(prompt, messages)

    def _encode(self, prompt: str | None, messages: Sequence[Message]) -> list[int]:
        """What the model is fed: a raw prompt as is, or messages through the chat template."""
        if (prompt is None) == (not messages):
            raise InvalidArgument(FieldViolation("prompt", "exactly one of prompt and messages must be set"))
        if prompt is not None:
            return list(self._tokenizer(prompt)["input_ids"])
        text = self._tokenizer.apply_chat_template(
            [{"role": m.role.value, "content": m.content} for m in messages], tokenize=False, add_generation_prompt=True
        )
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------ generation

    def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        return self._stream(request)

    async def abort(self, request_id: str) -> None:
        job = self._jobs.get(request_id)
        if job is None:
            return
        job.stop.set()
        if job.waiter is not None and not job.waiter.done():
            job.waiter.set_exception(Aborted(f"request {request_id} was aborted"))

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        job = self._new_job(request)
        self._jobs[job.request_id] = job
        try:
            await self._acquire(job)
            job.thread = threading.Thread(
                target=self._run, args=(job,), name=f"small-engine:{job.request_id}", daemon=True
            )
            job.thread.start()
            while True:
                item = await job.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            job.stop.set()
            if job.thread is not None:
                await asyncio.shield(job.done)  # the thread checks the flag between forwards
            self._jobs.pop(job.request_id, None)

    def _new_job(self, request: GenerationRequest) -> _Job:
        """Validate and tokenize; raises InvalidArgument before the request takes a slot."""
        self._require_ready()
        submitted = time.monotonic()
        if request.request_id in self._jobs:
            raise InvalidArgument(FieldViolation("request_id", f"{request.request_id!r} is already running"))
        params = _resolve(request.sampling)
        ids = self._encode(request.prompt, request.messages)
        where = "prompt" if request.prompt is not None else "messages"
        if not ids:
            raise InvalidArgument(FieldViolation(where, "is empty (0 tokens)"))
        if len(ids) >= self.max_model_len:
            raise InvalidArgument(
                FieldViolation(
                    where,
                    f"is {len(ids)} tokens; the limit is {self.max_model_len - 1} "
                    f"(context length {self.max_model_len} tokens for prompt + output)",
                )
            )
        loop = asyncio.get_running_loop()
        return _Job(
            request_id=request.request_id,
            prompt_ids=ids,
            max_new=min(params.max_tokens, self.max_model_len - len(ids)),
            params=params,
            loop=loop,
            queue=asyncio.Queue(),
            done=loop.create_future(),
            submitted=submitted,
            logprobs=request.return_logprobs,
        )

    def _require_ready(self) -> None:
        if not self.ready():
            raise Unavailable(f"engine {self.id} is {'closed' if self._closed else 'not started'}")

    # ------------------------------------------------------------ slots (event loop only)

    async def _acquire(self, job: _Job) -> None:
        """Take a decode slot, waiting in FIFO order behind earlier requests."""
        if self._active < self._max_concurrency and not self._waiters:
            self._active += 1
            return
        job.waiter = job.loop.create_future()
        self._waiters.append(job.waiter)
        try:
            await job.waiter
        except BaseException:
            waiter = job.waiter
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release()  # the slot was handed over just as we left
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def _release(self) -> None:
        """Hand the slot to the next live waiter, or free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._active -= 1

    def _thread_finished(self, job: _Job) -> None:
        if job.first_token_at is not None:
            self._ttft.append(job.first_token_at - job.submitted)
        self._release()
        if not job.done.done():
            job.done.set_result(None)

    # ------------------------------------------------------------ the decode thread

    def _run(self, job: _Job) -> None:
        try:
            self._decode(job)
        except Exception as exc:  # surfaced to the consumer
            job.put(Unavailable(f"small engine failed on request {job.request_id}: {exc!r}"))
        finally:
            try:
                job.loop.call_soon_threadsafe(self._thread_finished, job)
            except RuntimeError:
                pass

    def _decode(self, job: _Job) -> None:
        import torch

        model, p = self._model, job.params
        generator = torch.Generator()
        if p.seed is not None:
            generator.manual_seed(p.seed)
        else:
            generator.seed()
        prompt = torch.tensor([job.prompt_ids])
        seen = torch.zeros(model.config.vocab_size, dtype=torch.bool)
        seen[prompt[0]] = True
        text = _StopText(self._tokenizer, p.stop)
        generated: list[int] = []
        logprob_sum = 0.0
        delta, stopped = "", False
        with torch.inference_mode():
            past: Any = None
            for start in range(0, prompt.shape[1], PREFILL_CHUNK):
                if job.stop.is_set():
                    job.put(Aborted(f"request {job.request_id} was aborted"))
                    return
                out = model(
                    input_ids=prompt[:, start : start + PREFILL_CHUNK],
                    past_key_values=past,
                    use_cache=True,
                    logits_to_keep=1,
                )
                past = out.past_key_values
            job.cached_tokens = len(job.prompt_ids)
            while True:
                logits = out.logits[0, -1].float()
                # The raw distribution, before _sample applies the penalty (in place) and temperature.
                raw = torch.log_softmax(logits, dim=-1) if job.logprobs else None
                token = _sample(logits, seen, p, generator)
                if raw is not None:
                    logprob_sum += float(raw[token])
                if job.first_token_at is None:
                    job.first_token_at = time.monotonic()
                generated.append(token)
                if token in self._eos_ids:
                    finish = FinishReason.STOP
                    break
                seen[token] = True
                delta, stopped = text.update(generated)
                if stopped:
                    finish = FinishReason.STOP
                    break
                if delta:
                    job.put(Chunk(delta))
                if len(generated) >= job.max_new:
                    finish = FinishReason.LENGTH
                    break
                if job.stop.is_set():
                    job.put(Aborted(f"request {job.request_id} was aborted"))
                    return
                out = model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
                job.cached_tokens += 1
        tail = delta if stopped else text.flush()
        mean = logprob_sum / len(generated) if job.logprobs and generated else None
        job.put(Chunk(tail, finish_reason=finish, usage=Usage(len(job.prompt_ids), len(generated)), mean_logprob=mean))


# ---------------------------------------------------------------- helpers


def _resolve(s: Sampling) -> _Params:
    """Fill in defaults and check ranges (those of servemesh.inference.v1.SamplingParams)."""
    p = _Params(
        temperature=1.0 if s.temperature is None else float(s.temperature),
        top_p=1.0 if s.top_p is None else float(s.top_p),
        max_tokens=DEFAULT_MAX_TOKENS if s.max_tokens is None else int(s.max_tokens),
        stop=tuple(s.stop),
        seed=s.seed,
        repetition_penalty=1.0 if s.repetition_penalty is None else float(s.repetition_penalty),
    )
    bad = sampling_violations(s, "sampling")
    if bad:
        raise InvalidArgument(bad)
    return p


def _sample(logits: Any, seen: Any, p: _Params, generator: Any) -> int:
    """Next token: repetition penalty (as in HF/vLLM), then greedy or temperature + top-p sampling."""
    import torch

    if p.repetition_penalty != 1.0:
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
    if p.temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) < p.top_p  # always keeps the top token
        choice = torch.multinomial(sorted_probs * keep, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


class _StopText:
    """Incremental detokenization that never emits a stop string or a prefix of one."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...]) -> None:
        self._tokenizer = tokenizer
        self._stops = stops
        self._text = ""
        self._sent = 0

    def update(self, ids: list[int]) -> tuple[str, bool]:
        """New safe text for the generated ids, and whether a stop string appeared (text cut before it)."""
        self._text = self._tokenizer.decode(ids, skip_special_tokens=True)
        hits = [i for i in (self._text.find(s, max(0, self._sent - len(s) + 1)) for s in self._stops) if i >= 0]
        if hits:
            end, stopped = max(min(hits), self._sent), True
        else:
            end, stopped = self._safe_end(), False
        delta = self._text[self._sent : end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        return delta, stopped

    def flush(self) -> str:
        """Everything not sent yet (a held-back partial stop string is real output after all)."""
        delta, self._sent = self._text[self._sent :], len(self._text)
        return delta

    def _safe_end(self) -> int:
        """End of the text that can be sent: before an incomplete UTF-8 character or a partial stop string."""
        end = len(self._text)
        while end > self._sent and self._text[end - 1] == "\ufffd":
            end -= 1
        hold = 0
        for s in self._stops:
            hold = max(
                hold, next((k for k in range(min(len(s) - 1, end), 0, -1) if self._text.endswith(s[:k], 0, end)), 0)
            )
        return end - hold
