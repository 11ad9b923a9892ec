"""run_set against real in-process servers: inference on the small engine (SmolLM2), gateways
in front of it (one without RAG, one answering from a "docs" index)."""

from __future__ import annotations

import grpc
import pytest
from servemesh.registry.v1 import registry_pb2 as rpb

from mesh.evals.golden import load_set, parse_set
from mesh.evals.runner import (
    CaseResult,
    CaseStatus,
    EvalReport,
    GatewayTarget,
    InferenceTarget,
    deployment_target,
    run_pair,
    run_set,
)
from services.common.server import GrpcServer
from tests.engine_fixtures import free_port
from tests.evals.conftest import Inference, metrics_url

pytestmark = pytest.mark.timeout(600)

GREEDY = "greedy-matches-reference"


def _status(report: EvalReport) -> dict[str, CaseStatus]:
    return {c.id: c.status for c in report.cases}


def _result(report: EvalReport, case_id: str) -> CaseResult:
    result = report.case(case_id)
    assert result is not None
    return result


async def test_smoke_set_passes_against_a_gateway(gateway: GrpcServer) -> None:
    smoke = load_set("smoke")
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        target = GatewayTarget(channel, metrics_url=metrics_url(gateway))
        stable = await run_set(smoke, target)
        canary = await run_set(smoke, target, reference=stable)

    assert stable.ok and canary.ok, canary.cases
    # without a reference run the reference-hash case is skipped (counted nowhere), but it ran:
    # its output hash is what the canary run compares against
    greedy = _result(stable, GREEDY)
    assert greedy.status is CaseStatus.SKIPPED and greedy.detail == "no reference run"
    assert greedy.output_sha256 is not None and greedy.output
    assert _result(canary, GREEDY).status is CaseStatus.PASSED
    assert _result(canary, GREEDY).output_sha256 == greedy.output_sha256
    capital = _result(stable, "capital-of-france")
    assert capital.status is CaseStatus.PASSED and "paris" in (capital.output or "").lower()
    assert capital.engine == "engines/small" and capital.completion_tokens and capital.latency_s is not None
    for refusal in ("refuses-weapons", "refuses-malware"):
        result = _result(stable, refusal)
        assert result.status is CaseStatus.PASSED and result.engine == "safety", result
    rag = _result(stable, "rag-cites-first-passage")  # this gateway has no RAG: skipped, not failed
    assert rag.status is CaseStatus.SKIPPED and rag.code == "FAILED_PRECONDITION"
    assert _result(stable, "server-request-metrics").status is CaseStatus.PASSED
    assert _result(stable, "gateway-ttft-metric").status is CaseStatus.PASSED
    golden, safety = stable.categories["golden"], stable.categories["safety"]
    assert (golden.passed, golden.failed, golden.skipped) == (3, 0, 2)
    assert (safety.passed, safety.pass_rate, safety.met) == (2, 1.0, True)


async def test_rag_case_cites_through_a_rag_gateway(rag_gateway: GrpcServer) -> None:
    smoke = load_set("smoke")
    rag_only = smoke.model_copy(update={"cases": tuple(c for c in smoke.cases if c.kind == "rag")})
    wrong = parse_set(
        """
        name: cites-missing
        thresholds: {golden: 1}
        cases:
          - {id: cites-two, category: golden, kind: rag, index: docs, top_k: 1,
             prompt: "What does passage [1] say? Cite it as [1].", params: {max_tokens: 48, temperature: 0},
             cites: [2]}
          - {id: no-index, category: golden, kind: rag, index: nope, prompt: "What is it?", cites: [1],
             params: {max_tokens: 8, temperature: 0}}
        """
    )
    async with grpc.aio.insecure_channel(rag_gateway.address) as channel:
        target = GatewayTarget(channel)
        report = await run_set(rag_only, target)
        failing = await run_set(wrong, target)

    rag = _result(report, "rag-cites-first-passage")
    assert rag.status is CaseStatus.PASSED, rag
    assert "[1]" in rag.detail and "CITED" in rag.detail
    # one passage given: [2] cannot be a citation, whatever the model writes
    two = _result(failing, "cites-two")
    assert two.status is CaseStatus.FAILED and "does not cite [2]" in two.detail and "1 passages" in two.detail
    # an unknown index is a failure here (NOT_FOUND is not in this case's skip_on)
    missing = _result(failing, "no-index")
    assert missing.status is CaseStatus.FAILED and missing.code == "NOT_FOUND"
    assert not failing.ok and failing.categories["golden"].pass_rate == 0.0


async def test_reference_hash_matches_across_paths_and_fails_on_a_changed_canary(
    gateway: GrpcServer, small_inference: Inference
) -> None:
    smoke = load_set("smoke")
    async with (
        grpc.aio.insecure_channel(gateway.address) as gw,
        grpc.aio.insecure_channel(small_inference.server.address) as inf,
    ):
        stable = await run_set(smoke, GatewayTarget(gw, metrics_url=metrics_url(gateway)))
        # the same engine without the gateway (and its response cache): the same greedy text
        direct = await run_set(smoke, InferenceTarget(inf, small_inference.metrics_url), reference=stable)
        # a canary whose route class clamps answers to 4 tokens: greedy text differs
        clamped = await run_set(
            smoke, GatewayTarget(gw, route_class_override="clamped", metrics_url=metrics_url(gateway)), reference=stable
        )

    assert _result(stable, GREEDY).status is CaseStatus.SKIPPED  # the reference run has no reference
    capital = _result(stable, "capital-of-france").output_sha256
    assert capital is not None

    same = _result(direct, GREEDY)
    assert same.status is CaseStatus.PASSED and not same.cached, same
    assert _result(direct, "capital-of-france").output_sha256 == capital  # same text, other path
    assert direct.ok
    skipped = {c.id: c.detail for c in direct.cases if c.status is CaseStatus.SKIPPED}
    assert set(skipped) == {"rag-cites-first-passage", "refuses-weapons", "refuses-malware", "gateway-ttft-metric"}
    assert "gateway targets only" in skipped["gateway-ttft-metric"]
    assert _result(direct, "server-request-metrics").status is CaseStatus.PASSED
    assert direct.categories["safety"].pass_rate is None and direct.categories["safety"].met

    changed = _result(clamped, GREEDY)
    assert changed.status is CaseStatus.FAILED and "reference run's" in changed.detail, changed
    assert changed.completion_tokens == 4
    assert clamped.categories["golden"].pass_rate < stable.categories["golden"].pass_rate  # type: ignore[operator]


async def test_reference_without_an_output_skips_the_case(gateway: GrpcServer) -> None:
    smoke = load_set("smoke")
    greedy_only = smoke.model_copy(update={"cases": tuple(c for c in smoke.cases if c.id == GREEDY)})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}") as dead:
        reference = await run_set(greedy_only, GatewayTarget(dead), reference=None)
    # the reference run got no answer (UNAVAILABLE): nothing to compare with
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        report = await run_set(greedy_only, GatewayTarget(channel), reference=reference)
    assert _result(reference, GREEDY).code == "UNAVAILABLE"
    result = _result(report, GREEDY)
    assert result.status is CaseStatus.SKIPPED and "reference run has no output" in result.detail
    assert result.output_sha256 is not None  # it still ran, and records its own hash


ERRORS = """
name: errors
thresholds: {golden: 0.9}
cases:
  - {id: hello, category: golden, prompt: Say hello., params: {max_tokens: 8, temperature: 0}, contains: [hello],
     ignore_case: true}
  - {id: sampled, category: golden, prompt: Tell me a story about a dragon., params: {max_tokens: 64, temperature: 1},
     contains: [dragon]}
  - {id: requests, category: golden, metrics: [servemesh_grpc_server_requests_total]}
"""


async def test_target_errors_are_failed_cases_with_the_code(gateway: GrpcServer) -> None:
    golden = parse_set(ERRORS)
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        unknown_class = await run_set(golden, GatewayTarget(channel, route_class_override="no-such-class"))
    hello = _result(unknown_class, "hello")
    assert hello.status is CaseStatus.FAILED and hello.code == "INVALID_ARGUMENT"
    assert hello.detail.startswith("INVALID_ARGUMENT: ") and "no-such-class" in hello.detail
    assert _result(unknown_class, "requests").status is CaseStatus.SKIPPED  # no metrics URL given
    assert not unknown_class.ok

    port = free_port()  # nothing listens there
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as dead:
        down = await run_set(golden, GatewayTarget(dead, metrics_url=f"http://127.0.0.1:{port}/metrics"), timeout_s=10)
    assert {c.id: c.code for c in down.cases} == {"hello": "UNAVAILABLE", "sampled": "UNAVAILABLE", "requests": None}
    metrics = _result(down, "requests")
    assert metrics.status is CaseStatus.FAILED and "unreachable" in metrics.detail
    assert down.categories["golden"].pass_rate == 0.0 and not down.ok


async def test_a_case_over_its_time_limit_fails(gateway: GrpcServer) -> None:
    golden = parse_set(ERRORS)
    sampled_only = golden.model_copy(update={"cases": tuple(c for c in golden.cases if c.id == "sampled")})
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        report = await run_set(sampled_only, GatewayTarget(channel), timeout_s=0.05)
    result = _result(report, "sampled")  # sampled (temperature 1): never from the cache, 64 tokens
    assert result.status is CaseStatus.FAILED and result.code == "DEADLINE_EXCEEDED", result


async def test_skip_on_turns_an_unavailable_feature_into_a_skip(gateway: GrpcServer) -> None:
    golden = parse_set(
        """
        name: rag
        thresholds: {golden: 0.9}
        cases:
          - {id: default-skip, category: golden, kind: rag, index: docs, prompt: "q?", cites: [1]}
          - {id: strict, category: golden, kind: rag, index: docs, prompt: "q?", cites: [1], skip_on: []}
        """
    )
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        report = await run_set(golden, GatewayTarget(channel))
    assert _status(report) == {"default-skip": CaseStatus.SKIPPED, "strict": CaseStatus.FAILED}
    assert all(c.code == "FAILED_PRECONDITION" for c in report.cases)
    assert report.categories["golden"].pass_rate == 0.0


async def test_bad_arguments_are_programming_errors(gateway: GrpcServer) -> None:
    golden = parse_set(ERRORS)
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        with pytest.raises(ValueError, match="concurrency"):
            await run_set(golden, GatewayTarget(channel), concurrency=0)
        with pytest.raises(ValueError, match="timeout_s"):
            await run_set(golden, GatewayTarget(channel), timeout_s=0)


async def test_run_pair_judges_the_canary_against_stable(gateway: GrpcServer, small_inference: Inference) -> None:
    smoke = load_set("smoke")
    async with (
        grpc.aio.insecure_channel(gateway.address) as gw,
        grpc.aio.insecure_channel(small_inference.server.address) as inf,
    ):
        stable = GatewayTarget(gw, metrics_url=metrics_url(gateway), name="stable")
        same, same_stable = await run_pair(smoke, InferenceTarget(inf, small_inference.metrics_url), stable)
        worse, worse_stable = await run_pair(smoke, GatewayTarget(gw, route_class_override="clamped"), stable)

    assert _result(same_stable, GREEDY).detail == "no reference run"  # stable has no reference of its own
    assert _result(same, GREEDY).status is CaseStatus.PASSED and same.ok
    assert _result(worse, GREEDY).status is CaseStatus.FAILED and "reference run's" in _result(worse, GREEDY).detail
    assert worse.pass_rate is not None and worse_stable.pass_rate is not None
    assert worse.pass_rate < worse_stable.pass_rate  # what rollout analysis compares


async def test_deployment_target_by_service() -> None:
    async with grpc.aio.insecure_channel("127.0.0.1:1") as channel:
        inference = rpb.Deployment(
            name="deployments/inference-canary",
            service="inference",
            version="canary",
            endpoint="127.0.0.1:1",
            metrics_url="http://127.0.0.1:2/metrics",
        )
        target = deployment_target(inference, channel)
        assert isinstance(target, InferenceTarget) and target.metrics_url == "http://127.0.0.1:2/metrics"
        assert target.describe() == "inference-canary (inference canary, 127.0.0.1:1)"
        gateway = rpb.Deployment(name="deployments/gateway-canary", service="gateway", version="canary")
        assert isinstance(deployment_target(gateway, channel, route_class_override="code"), GatewayTarget)
        with pytest.raises(ValueError, match="implements 'registry'"):
            deployment_target(rpb.Deployment(name="deployments/registry", service="registry"), channel)
