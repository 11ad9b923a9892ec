"""RerankService through a real gRPC server on a free port and the generated stub."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from servemesh.rerank.v1 import rerank_pb2 as pb

from services.common.context import prompt_hash
from services.rerank.scorers.base import PassageInput
from services.rerank.scorers.fallback import FALLBACK_ID
from services.rerank.server import SERVICE_NAME

from .conftest import StandInScorer

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]

PASSAGES = [
    pb.Passage(id="paris", text="Paris is the capital and largest city of France."),
    pb.Passage(
        id="sem",
        title="Limiting concurrency in asyncio",
        text="An asyncio.Semaphore limits how many coroutines run a section at once: acquire it with async with.",
    ),
    pb.Passage(id="banana", text="Bananas are rich in potassium and grow in tropical climates."),
    pb.Passage(id="lists", text="Python lists are ordered, mutable sequences."),
]
QUERY = "How do I bound concurrency in asyncio?"


def bad_request(err: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(err)
    assert status is not None
    for packed in status.details:
        if packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            out = error_details_pb2.BadRequest()
            packed.Unpack(out)
            return {v.field: v.description for v in out.field_violations}
    raise AssertionError(f"no BadRequest in {status}")


async def test_rerank_and_get_scorer_with_the_cross_encoder(make_rerank, cross_encoder_scorer, tiny_cross_encoder_dir):
    rerank = await make_rerank(scorer=cross_encoder_scorer, model_dir=tiny_cross_encoder_dir)
    response = await rerank.stub.Rerank(pb.RerankRequest(query=QUERY, passages=PASSAGES))
    passages = [PassageInput(p.id, p.text, p.title) for p in PASSAGES]
    expected = cross_encoder_scorer.score(QUERY, passages)
    assert response.scorer == "tiny-cross-encoder"
    assert [r.index for r in response.results] == sorted(range(len(PASSAGES)), key=lambda i: -expected[i])
    assert [r.id for r in response.results] == [PASSAGES[r.index].id for r in response.results]
    assert [r.score for r in response.results] == pytest.approx(sorted(expected, reverse=True), rel=1e-6)

    top = await rerank.stub.Rerank(pb.RerankRequest(query=QUERY, passages=PASSAGES, top_n=2))
    assert list(top.results) == list(response.results[:2])

    scorer = await rerank.stub.GetScorer(pb.GetScorerRequest())
    assert scorer == pb.GetScorerResponse(
        scorer="tiny-cross-encoder",
        kind=pb.SCORER_KIND_CROSS_ENCODER,
        model_sha256=cross_encoder_scorer.model_sha256,
    )


async def test_server_loads_the_cross_encoder_from_settings(make_rerank, tiny_cross_encoder_dir):
    rerank = await make_rerank(model_dir=tiny_cross_encoder_dir)  # scorer "auto", loaded by the server
    scorer = await rerank.stub.GetScorer(pb.GetScorerRequest())
    assert (scorer.scorer, scorer.kind) == ("tiny-cross-encoder", pb.SCORER_KIND_CROSS_ENCODER)


async def test_rerank_and_get_scorer_with_the_fallback(make_rerank, embedder):
    rerank = await make_rerank()  # no model_dir: the fallback, from the session's ONNX export
    response = await rerank.stub.Rerank(pb.RerankRequest(query=QUERY, passages=PASSAGES))
    assert response.scorer == FALLBACK_ID
    assert response.results[0].id == "sem" and response.results[0].index == 1
    scores = [r.score for r in response.results]
    assert scores == sorted(scores, reverse=True)
    scorer = await rerank.stub.GetScorer(pb.GetScorerRequest())
    assert scorer == pb.GetScorerResponse(
        scorer=FALLBACK_ID, kind=pb.SCORER_KIND_FALLBACK, model_sha256=embedder.model_sha256
    )


async def test_invalid_argument_with_bad_request_details(make_rerank):
    scorer = StandInScorer()
    rerank = await make_rerank(scorer=scorer)
    request = pb.RerankRequest(
        query="q",
        passages=[pb.Passage(id="a", text="t"), pb.Passage(id="b", text=""), pb.Passage(id="a", text="t")],
        top_n=-1,
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await rerank.stub.Rerank(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(err.value) == {
        "passages[1].text": "must be 1 to 32768 characters",
        "passages[2].id": "duplicate of passages[0].id",
        "top_n": "must be in [1, 3] (the number of passages), or unset for all",
    }
    assert "passages[2].id: duplicate of passages[0].id" in err.value.details()

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await rerank.stub.Rerank(
            pb.RerankRequest(query="q", passages=[pb.Passage(id=str(i), text="t") for i in range(201)])
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(err.value) == {"passages": "at most 200 (got 201)"}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await rerank.stub.Rerank(pb.RerankRequest(query="q" * 2049, passages=[pb.Passage(id="a", text="t")]))
    assert bad_request(err.value) == {"query": "must be 1 to 2048 characters"}
    assert scorer.calls == 0


async def test_health_metrics_and_access_log(make_rerank, caplog):
    caplog.set_level(logging.INFO, logger="servemesh.access")
    rerank = await make_rerank(scorer=StandInScorer(fn=lambda q, p: float(len(p.text))))
    health = health_pb2_grpc.HealthStub(rerank.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    await rerank.stub.Rerank(pb.RerankRequest(query=QUERY, passages=PASSAGES))
    registry = rerank.registry
    assert registry.get_sample_value("servemesh_rerank_passages_sum", {"kind": "fallback"}) == len(PASSAGES)
    assert registry.get_sample_value("servemesh_rerank_seconds_count", {"kind": "fallback"}) == 1
    labels = {"service": SERVICE_NAME, "method": "Rerank", "code": "OK"}
    assert registry.get_sample_value("servemesh_grpc_server_requests_total", labels) == 1
    (line,) = [r for r in caplog.records if getattr(r, "method", "").endswith("RerankService/Rerank")]
    assert (line.passages, line.scorer, line.query_sha256) == (len(PASSAGES), "fallback", prompt_hash(QUERY))
    assert QUERY not in caplog.text


def test_main_exits_with_a_clear_error_when_the_model_folder_is_missing(tmp_path):
    missing = tmp_path / "reranker"
    env = {
        **os.environ,
        "APP_ENV": "dev",
        "SERVEMESH_RERANK_MODEL_DIR": str(missing),
        "SERVEMESH_RERANK_PORT": "0",
        "SERVEMESH_RERANK_METRICS_PORT": "0",
    }
    done = subprocess.run(
        [sys.executable, "-m", "services.rerank.server"], cwd=REPO, env=env, capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last == (
        f"error: rerank settings invalid: model_dir={missing}: not a folder (mount a CrossEncoder model folder "
        "there) (key 'model_dir', env SERVEMESH_RERANK_MODEL_DIR)"
    )
