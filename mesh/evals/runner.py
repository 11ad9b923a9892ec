"""Run a golden set against a target (a gateway or an inference deployment) and judge it.

    stable = await run_set(golden, GatewayTarget(stable_channel, metrics_url=...))
    canary = await run_set(golden, GatewayTarget(canary_channel, metrics_url=...), reference=stable)
    canary.categories["golden"].pass_rate, canary.pass_rate, canary.ok

    # or both at once, for a rollout's analysis window (deployments from the registry):
    canary, stable = await run_pair(golden, deployment_target(canary_dep, ch1), deployment_target(stable_dep, ch2))

`run_set` never raises for what a target does: a gRPC error is a failed case naming the
status code (or a skipped one, for the codes the case lists in `skip_on`), a case over its
time limit is a failed case, an unreachable metrics URL fails the metrics cases. Cases that do
not apply to the target are skipped with the reason and count in no pass rate.
"""

from __future__ import annotations

import abc
import asyncio
import math
import time
from collections.abc import Iterable, Sequence
from enum import StrEnum

import grpc
import httpx
from pydantic import BaseModel, ConfigDict
from servemesh.gateway.v1 import gateway_pb2 as gpb
from servemesh.gateway.v1 import gateway_pb2_grpc as gpb_grpc
from servemesh.inference.v1 import inference_pb2 as ipb
from servemesh.inference.v1 import inference_pb2_grpc as ipb_grpc
from servemesh.registry.v1 import registry_pb2 as rpb

from mesh.evals.checks import Answer, Verdict, check_answer, check_metrics, check_sha256
from mesh.evals.golden import REFERENCE, Category, GoldenCase, GoldenSet, RequestKind, TargetKind

#: seconds one case may take (its gRPC deadline, and a local guard)
DEFAULT_TIMEOUT_S = 60.0
#: `detail` of a sha256-reference case run without a reference report
NO_REFERENCE = "no reference run"


# --- targets --------------------------------------------------------------------------------


class Target(abc.ABC):
    """Where a set's requests go: GatewayTarget or InferenceTarget (or a subclass of this).
    `answer` may raise grpc.aio.AioRpcError (or anything else); run_set turns it into a failed
    case. Targets do not own their channel: the caller opens and closes it."""

    kind: TargetKind
    #: the target's Prometheus endpoint, e.g. http://127.0.0.1:9150/metrics; "" = none
    metrics_url: str

    @abc.abstractmethod
    def describe(self) -> str:
        """For reports: what was evaluated."""

    def unsupported(self, case: GoldenCase) -> str | None:
        """Why `case` cannot run on this target (it is then skipped), or None."""
        if self.kind not in case.targets:
            return f"applies to {' and '.join(t.value for t in case.targets)} targets only"
        if case.metrics is not None and not self.metrics_url:
            return "the target has no metrics URL"
        return None

    @abc.abstractmethod
    async def answer(self, case: GoldenCase, timeout_s: float) -> Answer:
        """Send the case's request and collect the streamed answer."""


class GatewayTarget(Target):
    """GatewayService: StreamGenerate (and StreamRagAnswer for rag cases).

    `route_class_override` replaces every case's route class (e.g. to evaluate one class);
    `metadata` goes with every call (an `authorization: Bearer` key when the channel does not
    add one, `x-servemesh-canary: always` to pin the canary through a shared gateway);
    `metrics_url` is the gateway's Prometheus endpoint ("" skips metrics cases); `name` is how
    reports name the target."""

    kind = TargetKind.GATEWAY

    def __init__(
        self,
        channel: grpc.aio.Channel,
        route_class_override: str = "",
        metadata: Sequence[tuple[str, str]] = (),
        metrics_url: str = "",
        *,
        name: str = "",
    ) -> None:
        self._stub = gpb_grpc.GatewayServiceStub(channel)
        self._route_class = route_class_override
        self._metadata = tuple(metadata)
        self.metrics_url = metrics_url
        self._name = name or "gateway"

    def describe(self) -> str:
        return self._name + (f" (route class {self._route_class})" if self._route_class else "")

    def _params(self, case: GoldenCase) -> gpb.DecodingParams:
        p = case.params
        return gpb.DecodingParams(max_tokens=p.max_tokens, temperature=p.temperature, seed=p.seed)

    async def answer(self, case: GoldenCase, timeout_s: float) -> Answer:
        route_class = self._route_class or case.route_class
        parts: list[str] = []
        last = None
        first = None
        if case.kind is RequestKind.RAG:
            assert case.prompt is not None and case.index is not None  # validated
            rag = gpb.StreamRagAnswerRequest(
                question=case.prompt,
                index=case.index,
                top_k=case.top_k or 0,
                params=self._params(case),
                route_class=route_class,
            )
            async for msg in self._stub.StreamRagAnswer(rag, timeout=timeout_s, metadata=self._metadata):
                if first is None:
                    first = msg
                parts.append(msg.text_delta)
                last = msg
            if last is None:
                return Answer("")
            return Answer(
                "".join(parts),
                finish_reason=_finish(last.finish_reason),
                engine=last.engine,
                model=last.model,
                prompt_tokens=last.usage.prompt_tokens,
                completion_tokens=last.usage.completion_tokens,
                citations=tuple(c.number for c in last.citations),
                citation_status=gpb.CitationStatus.Name(last.citation_status).removeprefix("CITATION_STATUS_"),
                invalid_citations=tuple(last.invalid_citations),
                passages=len(first.passages) if first is not None else 0,
            )
        request = gpb.StreamGenerateRequest(params=self._params(case), route_class=route_class)
        if case.messages is not None:
            request.messages.extend(gpb.Message(role=_GATEWAY_ROLES[m.role], content=m.content) for m in case.messages)
        else:
            request.prompt = case.prompt or ""
        async for msg in self._stub.StreamGenerate(request, timeout=timeout_s, metadata=self._metadata):
            parts.append(msg.text_delta)
            last = msg
        if last is None:
            return Answer("")
        return Answer(
            "".join(parts),
            finish_reason=_finish(last.finish_reason),
            engine=last.engine,
            model=last.model,
            prompt_tokens=last.usage.prompt_tokens,
            completion_tokens=last.usage.completion_tokens,
            cached=last.cached,
        )


class InferenceTarget(Target):
    """InferenceService.StreamGenerate directly (e.g. an inference canary deployment).

    A case's prompt goes as one user message (the chat template applied), as the gateway
    sends it, so greedy outputs compare with a gateway reference run. `engine` names the
    engine ("" = the service's default). Route classes are a gateway notion and are ignored
    here; rag, cites and refuses cases need a gateway and are skipped."""

    kind = TargetKind.INFERENCE

    def __init__(self, channel: grpc.aio.Channel, metrics_url: str = "", *, engine: str = "", name: str = "") -> None:
        self._stub = ipb_grpc.InferenceServiceStub(channel)
        self.metrics_url = metrics_url
        self._engine = engine
        self._name = name or "inference"

    def describe(self) -> str:
        return self._name + (f" (engine {self._engine})" if self._engine else "")

    def unsupported(self, case: GoldenCase) -> str | None:
        if case.kind is RequestKind.RAG:
            return "RAG answers come from a gateway, not an inference deployment"
        if case.refuses:
            return "safety refusals are the gateway's policy, not an inference deployment's"
        return super().unsupported(case)

    async def answer(self, case: GoldenCase, timeout_s: float) -> Answer:
        p = case.params
        request = ipb.StreamGenerateRequest(
            engine=self._engine,
            sampling=ipb.SamplingParams(max_tokens=p.max_tokens, temperature=p.temperature, seed=p.seed),
        )
        if case.messages is not None:
            request.messages.extend(
                ipb.ChatMessage(role=_INFERENCE_ROLES[m.role], content=m.content) for m in case.messages
            )
        else:
            request.messages.append(ipb.ChatMessage(role=ipb.ROLE_USER, content=case.prompt or ""))
        parts: list[str] = []
        last = None
        async for msg in self._stub.StreamGenerate(request, timeout=timeout_s):
            parts.append(msg.text_delta)
            last = msg
        if last is None:
            return Answer("")
        return Answer(
            "".join(parts),
            finish_reason=_finish(last.finish_reason),
            engine=last.engine,
            model=last.model,
            prompt_tokens=last.usage.prompt_tokens,
            completion_tokens=last.usage.completion_tokens,
        )


_GATEWAY_ROLES = {"system": gpb.ROLE_SYSTEM, "user": gpb.ROLE_USER, "assistant": gpb.ROLE_ASSISTANT}
_INFERENCE_ROLES = {"system": ipb.ROLE_SYSTEM, "user": ipb.ROLE_USER, "assistant": ipb.ROLE_ASSISTANT}


def _finish(value: int) -> str:
    # both protos number FinishReason alike: 0 unspecified, 1 stop, 2 length
    return {1: "STOP", 2: "LENGTH"}.get(value, "")


# --- the report -----------------------------------------------------------------------------


class CaseStatus(StrEnum):
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"


class CaseResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    category: Category
    status: CaseStatus
    #: why it passed, failed or was skipped, for people
    detail: str
    #: gRPC status name when the target answered with an error
    code: str | None = None
    #: sha256 of the output text (hex); None when there was no answer
    output_sha256: str | None = None
    #: the output, cut to 500 characters
    output: str | None = None
    #: seconds from sending the request to the end of its stream (None: not sent)
    latency_s: float | None = None
    #: seconds to the first text (None: no text)
    ttft_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    engine: str = ""
    cached: bool = False


class CategoryResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    passed: int
    failed: int
    skipped: int
    #: passed / (passed + failed); None when no case of the category ran
    pass_rate: float | None
    threshold: float
    #: pass_rate >= threshold; True when nothing ran (nothing to hold against it)
    met: bool


class EvalReport(BaseModel):
    """The outcome of one run_set: per case, per category, overall."""

    model_config = ConfigDict(frozen=True)

    set_name: str
    target: str
    #: in the set's order
    cases: tuple[CaseResult, ...]
    categories: dict[Category, CategoryResult]
    #: passed / (passed + failed) over every category; None when nothing ran
    pass_rate: float | None
    #: every category met its threshold
    ok: bool

    def case(self, case_id: str) -> CaseResult | None:
        return next((c for c in self.cases if c.id == case_id), None)

    def summary(self) -> str:
        """One line, e.g. "smoke on gateway …: golden 3/3 ≥ 90% ok, safety 2/2 ≥ 95% ok"."""
        parts = []
        for cat, r in self.categories.items():
            rate = "n/a" if r.pass_rate is None else f"{r.passed}/{r.passed + r.failed}"
            parts.append(f"{cat.value} {rate} (>= {r.threshold:.0%}) {'ok' if r.met else 'BELOW'}")
        return f"{self.set_name} on {self.target}: " + ", ".join(parts)


def _rate(passed: int, failed: int) -> float | None:
    return passed / (passed + failed) if passed + failed else None


def build_report(golden_set: GoldenSet, target: str, results: Iterable[CaseResult]) -> EvalReport:
    """Tally results into per-category pass rates against the set's thresholds."""
    results = tuple(results)
    categories: dict[Category, CategoryResult] = {}
    for cat, threshold in golden_set.thresholds.items():
        mine = [r for r in results if r.category is cat]
        passed = sum(r.status is CaseStatus.PASSED for r in mine)
        failed = sum(r.status is CaseStatus.FAILED for r in mine)
        rate = _rate(passed, failed)
        # a small epsilon: 9/10 against 0.9 is met whatever the float rounding
        met = rate is None or rate >= threshold - 1e-9
        skipped = len(mine) - passed - failed
        categories[cat] = CategoryResult(
            passed=passed, failed=failed, skipped=skipped, pass_rate=rate, threshold=threshold, met=met
        )
    passed = sum(r.status is CaseStatus.PASSED for r in results)
    failed = sum(r.status is CaseStatus.FAILED for r in results)
    return EvalReport(
        set_name=golden_set.name,
        target=target,
        cases=results,
        categories=categories,
        pass_rate=_rate(passed, failed),
        ok=all(c.met for c in categories.values()),
    )


# --- running --------------------------------------------------------------------------------


def _skipped(case: GoldenCase, detail: str, code: str | None = None) -> CaseResult:
    return CaseResult(id=case.id, category=case.category, status=CaseStatus.SKIPPED, detail=detail, code=code)


def _failed(case: GoldenCase, detail: str, code: str | None = None, latency_s: float | None = None) -> CaseResult:
    return CaseResult(
        id=case.id, category=case.category, status=CaseStatus.FAILED, detail=detail, code=code, latency_s=latency_s
    )


def _reference_hash(case: GoldenCase, reference: EvalReport | None) -> tuple[str | None, str | None]:
    """(hash, None) or (None, why the case is skipped) for a `sha256: reference` case."""
    if reference is None:
        return None, NO_REFERENCE
    ref = reference.case(case.id)
    if ref is None:
        return None, f"the reference run ({reference.target}) has no case {case.id!r}"
    if ref.output_sha256 is None:
        return None, f"the reference run has no output for this case ({ref.status.value}: {ref.detail})"
    return ref.output_sha256, None


async def _run_case(case: GoldenCase, target: Target, timeout_s: float, slots: asyncio.Semaphore) -> CaseResult:
    """Send and judge one case. A `sha256: reference` case comes back skipped ("no reference
    run") with its output hash; `with_reference` judges it against a reference report."""
    async with slots:
        start = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s):
                answer = await target.answer(case, timeout_s)
        except TimeoutError:
            return _failed(case, f"no complete answer within {timeout_s:g} s", "DEADLINE_EXCEEDED", timeout_s)
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
            latency = time.perf_counter() - start
            detail = f"{code}: {exc.details() or 'no details'}"
            if code in case.skip_codes:
                return _skipped(case, f"not available on this target: {detail}", code)
            return _failed(case, detail, code, latency)
        except Exception as exc:  # a target must never break the run: report it on the case
            return _failed(case, f"{type(exc).__name__}: {exc}", latency_s=time.perf_counter() - start)
        latency = time.perf_counter() - start
    if case.sha256 == REFERENCE:
        status, verdict = CaseStatus.SKIPPED, Verdict(False, NO_REFERENCE)
    else:
        verdict = check_answer(case, answer)
        status = CaseStatus.PASSED if verdict.passed else CaseStatus.FAILED
    return CaseResult(
        id=case.id,
        category=case.category,
        status=status,
        detail=verdict.detail,
        output_sha256=answer.sha256,
        output=answer.text[:500],
        latency_s=latency,
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=answer.completion_tokens,
        engine=answer.engine,
        cached=answer.cached,
    )


async def _fetch_metrics(url: str, timeout_s: float) -> tuple[str | None, str]:
    """(exposition text, "") or (None, why not)."""
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            response = await client.get(url)
    except httpx.HTTPError as exc:
        return None, f"metrics URL {url} unreachable ({type(exc).__name__}: {exc or 'no detail'})"
    if response.status_code != 200:
        return None, f"metrics URL {url} answered HTTP {response.status_code}"
    return response.text, ""


async def run_set(
    golden_set: GoldenSet,
    target: Target,
    *,
    reference: EvalReport | None = None,
    concurrency: int = 2,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> EvalReport:
    """Run every case of `golden_set` against `target` and judge the answers.

    - `reference`: the report of a run of the same set against the reference target (stable,
      when `target` is a canary); `sha256: reference` cases pass when their output hash equals
      the reference run's for the same case id. Without it ("no reference run"), or when the
      reference run has no output for the case, those cases are skipped; they still run, so
      that this report records their output hashes for use as a reference (see also
      `with_reference` and `run_pair`, which run canary and stable at once).
    - `concurrency`: requests in flight at once (>= 1).
    - `timeout_s`: limit of each case (its gRPC deadline and a local guard); a case over it fails
      with DEADLINE_EXCEEDED.

    Requests run first; metrics cases read the target's metrics URL once, after them. Returns
    the report; errors of the target are failed (or, per `skip_on`, skipped) cases, never
    exceptions.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s}")
    slots = asyncio.Semaphore(concurrency)
    results: dict[str, CaseResult] = {}
    pending: dict[str, asyncio.Task[CaseResult]] = {}
    metric_cases: list[GoldenCase] = []
    for case in golden_set.cases:
        if (why := target.unsupported(case)) is not None:
            results[case.id] = _skipped(case, why)
            continue
        if not case.sends_request:
            metric_cases.append(case)
            continue
        pending[case.id] = asyncio.create_task(_run_case(case, target, timeout_s, slots))
    try:
        for case_id, task in pending.items():
            results[case_id] = await task
    finally:
        for task in pending.values():
            task.cancel()
    if metric_cases:
        text, why = await _fetch_metrics(target.metrics_url, timeout_s)
        for case in metric_cases:
            assert case.metrics is not None
            verdict = Verdict(False, why) if text is None else check_metrics(case.metrics, text)
            results[case.id] = CaseResult(
                id=case.id,
                category=case.category,
                status=CaseStatus.PASSED if verdict.passed else CaseStatus.FAILED,
                detail=verdict.detail,
            )
    report = build_report(golden_set, target.describe(), (results[c.id] for c in golden_set.cases))
    return report if reference is None else with_reference(golden_set, report, reference)


def with_reference(golden_set: GoldenSet, report: EvalReport, reference: EvalReport) -> EvalReport:
    """`report` with its `sha256: reference` cases judged against `reference`'s output hashes
    (the rest unchanged): passed or failed where both runs have an output, skipped with the
    reason where the reference run has none. Lets two runs go at once and be compared after."""
    results = []
    for result in report.cases:
        case = golden_set.case(result.id)
        if case is None or case.sha256 != REFERENCE or result.output_sha256 is None:
            results.append(result)
            continue
        reference_sha256, why = _reference_hash(case, reference)
        if reference_sha256 is None:
            results.append(result.model_copy(update={"status": CaseStatus.SKIPPED, "detail": why}))
            continue
        verdict = check_sha256(case, result.output_sha256, result.output or "", reference_sha256)
        status = CaseStatus.PASSED if verdict.passed else CaseStatus.FAILED
        results.append(result.model_copy(update={"status": status, "detail": verdict.detail}))
    return build_report(golden_set, report.target, results)


async def run_pair(
    golden_set: GoldenSet,
    canary: Target,
    stable: Target,
    *,
    concurrency: int = 2,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> tuple[EvalReport, EvalReport]:
    """Run the set against a canary and its stable deployment at once (`concurrency` each) and
    return (canary report, stable report); the canary's `sha256: reference` cases are judged
    against the stable run's outputs. For rollout analysis: compare `report.pass_rate`s."""
    stable_report, canary_report = await asyncio.gather(
        run_set(golden_set, stable, concurrency=concurrency, timeout_s=timeout_s),
        run_set(golden_set, canary, concurrency=concurrency, timeout_s=timeout_s),
    )
    return with_reference(golden_set, canary_report, stable_report), stable_report


def deployment_target(
    deployment: rpb.Deployment,
    channel: grpc.aio.Channel,
    *,
    route_class_override: str = "",
    metadata: Sequence[tuple[str, str]] = (),
) -> Target:
    """The target for a registered deployment, reached over `channel` (the caller dials its
    `endpoint` with its own mesh identity): InferenceTarget for service "inference",
    GatewayTarget for "gateway" (with `route_class_override` and `metadata`); metrics at the
    deployment's `metrics_url`. ValueError for any other service."""
    short = deployment.name.removeprefix("deployments/")
    name = f"{short} ({deployment.service} {deployment.version}, {deployment.endpoint})"
    if deployment.service == "inference":
        return InferenceTarget(channel, deployment.metrics_url, name=name)
    if deployment.service == "gateway":
        return GatewayTarget(channel, route_class_override, metadata, deployment.metrics_url, name=name)
    raise ValueError(
        f"deployment {short} implements {deployment.service!r}; evaluations run against inference or gateway"
    )
