"""Scorers, validation, ordering, concurrency and settings of the rerank core (no gRPC)."""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from services.common.errors import InvalidArgument
from services.common.settings import SettingsError, load_settings, service_config_dir
from services.rerank.core import MAX_VIOLATIONS, Limits, RerankCore, RerankResult
from services.rerank.errors import ScorerLoadError
from services.rerank.scorers import load_scorer
from services.rerank.scorers.base import PassageInput as P
from services.rerank.scorers.base import ScorerKind
from services.rerank.scorers.cross_encoder import CrossEncoderScorer
from services.rerank.scorers.fallback import FALLBACK_ID, FallbackScorer, content_terms, idf_overlap
from services.rerank.settings import RerankSettings

from .conftest import StandInScorer

pytestmark = pytest.mark.timeout(120)

PASSAGES = [
    P("paris", "Paris is the capital and largest city of France."),
    P("sem", "acquire it with async with; at most N coroutines run the block at once.", "asyncio.Semaphore"),
    P("banana", "Bananas are rich in potassium and grow in tropical climates."),
    P("lists", "Python lists are ordered, mutable sequences."),
    P("tilt", "Earth's axis is tilted about 23.4 degrees, which gives the seasons."),
]


def by_length(query: str, passage: P) -> float:
    return float(len(passage.text))


def violations(err: pytest.ExceptionInfo[InvalidArgument]) -> dict[str, str]:
    return {v.field: v.description for v in err.value.violations}


# --- the cross-encoder --------------------------------------------------------------------


def test_cross_encoder_scores_are_the_models_predictions(cross_encoder_scorer, tiny_cross_encoder_dir):
    from sentence_transformers import CrossEncoder

    query = "how do I limit concurrency in asyncio"
    scores = cross_encoder_scorer.score(query, PASSAGES)
    direct = CrossEncoder(str(tiny_cross_encoder_dir), device="cpu", local_files_only=True).predict(
        [(query, p.text if not p.title else f"{p.title}\n{p.text}") for p in PASSAGES], batch_size=4
    )
    assert scores == pytest.approx([float(s) for s in direct], rel=1e-6, abs=1e-7)
    assert len(set(scores)) == len(scores), "the tiny model should not tie on these"


async def test_cross_encoder_order_follows_its_scores(cross_encoder_scorer):
    query = "why are there seasons"
    scores = cross_encoder_scorer.score(query, PASSAGES)
    results = await RerankCore(cross_encoder_scorer).rerank(query, PASSAGES)
    assert [r.index for r in results] == sorted(range(len(PASSAGES)), key=lambda i: -scores[i])
    assert [r.score for r in results] == pytest.approx(sorted(scores, reverse=True), rel=1e-6)
    assert [r.id for r in results] == [PASSAGES[r.index].id for r in results]


def test_cross_encoder_identity(cross_encoder_scorer, tiny_cross_encoder_dir):
    assert cross_encoder_scorer.id == "tiny-cross-encoder"
    assert cross_encoder_scorer.kind == ScorerKind.CROSS_ENCODER
    weights = (tiny_cross_encoder_dir / "model.safetensors").read_bytes()
    assert cross_encoder_scorer.model_sha256 == hashlib.sha256(weights).hexdigest()


def test_missing_model_dir_is_a_clear_settings_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ScorerLoadError) as err:
        load_scorer(RerankSettings(model_dir=missing))
    message = str(err.value)
    assert isinstance(err.value, SettingsError)
    assert f"model_dir={missing}: not a folder" in message and "SERVEMESH_RERANK_MODEL_DIR" in message


def test_unloadable_model_dir_is_a_clear_settings_error(tmp_path, tiny_cross_encoder_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ScorerLoadError, match="has no config.json"):
        CrossEncoderScorer.load(empty)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_cross_encoder_dir / "config.json").read_text())
    with pytest.raises(ScorerLoadError, match=r"has no weight files \(\*\.safetensors or \*\.bin\)"):
        CrossEncoderScorer.load(no_weights)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ScorerLoadError, match="cannot be loaded as a CrossEncoder") as err:
        CrossEncoderScorer.load(broken)
    assert "SERVEMESH_RERANK_MODEL_DIR" in str(err.value)


def test_auto_picks_the_cross_encoder_when_model_dir_is_set(tiny_cross_encoder_dir, embedding_cache_dir, embedder):
    picked = load_scorer(RerankSettings(model_dir=tiny_cross_encoder_dir, embedding_cache_dir=embedding_cache_dir))
    assert isinstance(picked, CrossEncoderScorer) and picked.id == "tiny-cross-encoder"
    unset = load_scorer(RerankSettings(embedding_cache_dir=embedding_cache_dir))  # reuses the session's export
    assert isinstance(unset, FallbackScorer) and unset.model_sha256 == embedder.model_sha256
    forced = load_scorer(
        RerankSettings(scorer="fallback", model_dir=tiny_cross_encoder_dir, embedding_cache_dir=embedding_cache_dir)
    )
    assert isinstance(forced, FallbackScorer)


# --- the fallback -------------------------------------------------------------------------

EXAMPLES = [
    (
        "How do I bound concurrency in asyncio?",
        [
            P("paris", "Paris is the capital and largest city of France."),
            P("lists", "Python lists are ordered, mutable sequences."),
            P(
                "answer",
                "An asyncio.Semaphore limits how many coroutines run a section at once: acquire it with async with.",
                "Limiting concurrency in asyncio",
            ),
            P("banana", "Bananas are rich in potassium and grow in tropical climates."),
        ],
    ),
    (
        "what causes the seasons on earth",
        [
            P("stocks", "The stock market fell sharply on Tuesday after the announcement."),
            P("lists", "Python lists are ordered, mutable sequences."),
            P(
                "answer",
                "Earth's axis is tilted about 23.4 degrees, so each hemisphere gets more direct sunlight for part "
                "of the year: that is why we have summer and winter.",
            ),
        ],
    ),
    (
        "boiling point of water at sea level",
        [
            P("everest", "Mount Everest is the highest mountain above sea level."),
            P("oceans", "Water covers about 71% of Earth's surface."),
            P("answer", "At standard atmospheric pressure, water boils at 100 degrees Celsius (212 °F)."),
        ],
    ),
    (
        "what does error ZX-4411 mean",
        [
            P("generic", "Errors are reported with a code and a message; most errors mean the request was malformed."),
            P("go", "Error handling in Go uses explicit return values."),
            P("answer", "ZX-4411: the disk quota of the tenant is exhausted; free space or raise the quota."),
        ],
    ),
]


@pytest.mark.parametrize(("query", "passages"), EXAMPLES, ids=[q for q, _ in EXAMPLES])
async def test_fallback_ranks_the_answer_first(fallback_scorer, query, passages):
    results = await RerankCore(fallback_scorer).rerank(query, passages)
    assert results[0].id == "answer", results


def test_fallback_score_is_the_weighted_blend(embedder):
    query, passages = EXAMPLES[0]
    dense = np.array([embedder.embed_documents([p.full_text])[0] @ embedder.embed_query(query) for p in passages])
    lexical = np.array(idf_overlap(query, [p.full_text for p in passages]))
    for w in (0.0, 0.3, 0.7, 1.0):
        got = FallbackScorer(embedder, dense_weight=w).score(query, passages)
        assert got == pytest.approx(list(w * dense + (1 - w) * lexical), abs=1e-5)
    scorer = FallbackScorer(embedder)
    assert (scorer.id, scorer.kind, scorer.model_sha256) == (FALLBACK_ID, ScorerKind.FALLBACK, embedder.model_sha256)


async def test_idf_weighting_ranks_the_rare_term_first(embedder):
    # Each passage shares exactly one content term with the query. With every term weighted the
    # same they would tie and keep request order ("tutorial" first); weighted by IDF over the
    # candidates, "semaphore" (one passage has it) beats "python" (three have it).
    query = "python semaphore"
    passages = [
        P("tutorial", "A python tutorial for beginners."),
        P("guide", "The python style guide."),
        P("install", "Installing python on Windows."),
        P("rare", "A semaphore counts permits."),
    ]
    results = await RerankCore(FallbackScorer(embedder, dense_weight=0.0)).rerank(query, passages)
    assert results[0].id == "rare"
    assert [r.id for r in results[1:]] == ["tutorial", "guide", "install"]  # ties keep request order
    assert results[1].score == results[2].score == results[3].score < results[0].score


def test_term_overlap_stems_drops_stopwords_and_weights_by_idf():
    assert content_terms("What are the Running costs of the semaphores?") == {"run", "cost", "semaphor"}
    texts = ["runs and runs", "semaphores everywhere", "nothing relevant", "running semaphore"]
    scores = idf_overlap("running semaphores", texts)
    assert scores[3] == pytest.approx(1.0) and scores[2] == 0.0
    assert scores[0] == pytest.approx(scores[1]) == pytest.approx(0.5)  # both terms: df 2 of 4
    assert idf_overlap("the of and", texts) == [0.0] * 4  # no content terms
    rare_common = idf_overlap("alpha beta", ["alpha beta", "alpha", "alpha", "beta x"])
    assert rare_common[3] > rare_common[1]  # beta (df 2) outweighs alpha (df 3)


def test_fallback_w_zero_needs_no_embedding():
    class NoEmbedder:
        model_sha256 = ""

        def embed_query(self, text):
            raise AssertionError("not needed at w=0")

        embed_documents = embed_query

    scorer = FallbackScorer(NoEmbedder(), dense_weight=0.0)
    assert scorer.score("semaphore", [P("a", "semaphore"), P("b", "mutex")]) == [1.0, 0.0]


# --- validation ---------------------------------------------------------------------------


async def test_validation_names_the_field_and_the_limit():
    scorer = StandInScorer()
    core = RerankCore(scorer)
    with pytest.raises(InvalidArgument) as err:
        await core.rerank("", [])
    assert violations(err) == {
        "query": "must be 1 to 2048 characters",
        "passages": "must hold 1 to 200 passages",
    }
    bad = [
        P("a", "fine"),
        P("", "no id"),
        P("a", "again"),
        P("d", "x" * 32769),
        P("e", "   "),
        P("f", "fine", "t" * 513),
        P("g" * 257, "fine"),
    ]
    with pytest.raises(InvalidArgument) as err:
        await core.rerank("q" * 2049, bad, top_n=8)
    assert violations(err) == {
        "query": "must be 1 to 2048 characters",
        "passages[1].id": "must be 1 to 256 characters",
        "passages[2].id": "duplicate of passages[0].id",
        "passages[3].text": "must be 1 to 32768 characters",
        "passages[4].text": "must not be only whitespace",
        "passages[5].title": "must be at most 512 characters",
        "passages[6].id": "must be 1 to 256 characters",
        "top_n": "must be in [1, 7] (the number of passages), or unset for all",
    }
    with pytest.raises(InvalidArgument) as err:
        await core.rerank("q", [P(str(i), "t") for i in range(201)])
    assert violations(err) == {"passages": "at most 200 (got 201)"}
    for top_n in (0, -1, 6):
        with pytest.raises(InvalidArgument) as err:
            await core.rerank("q", [P(str(i), "t") for i in range(5)], top_n=top_n)
        assert violations(err)["top_n"].startswith("must be in [1, 5]")
    with pytest.raises(InvalidArgument, match=r"query: must not be only whitespace"):
        await core.rerank(" \n", [P("a", "t")])
    assert scorer.calls == 0


async def test_validation_reports_a_bounded_number_of_violations():
    scorer = StandInScorer()
    with pytest.raises(InvalidArgument) as err:
        await RerankCore(scorer).rerank("q", [P("", "") for _ in range(100)])
    assert len(err.value.violations) == MAX_VIOLATIONS
    assert scorer.calls == 0


async def test_limits_from_settings_tighten_the_contract():
    core = RerankCore(StandInScorer(), limits=Limits.from_settings(RerankSettings(max_passages=2, max_query_chars=5)))
    with pytest.raises(InvalidArgument) as err:
        await core.rerank("longer", [P("a", "t"), P("b", "t"), P("c", "t")])
    assert violations(err) == {"query": "must be 1 to 5 characters", "passages": "at most 2 (got 3)"}


# --- ordering, concurrency, metrics -------------------------------------------------------


async def test_results_best_first_ties_in_request_order_and_top_n():
    scores = {"a": 0.5, "b": 0.9, "c": 0.5, "d": float("nan"), "e": 0.9, "f": -1.0}
    core = RerankCore(StandInScorer(fn=lambda q, p: scores[p.id]))
    passages = [P(i, "text") for i in scores]
    results = await core.rerank("q", passages)
    assert [(r.id, r.index) for r in results] == [("b", 1), ("e", 4), ("a", 0), ("c", 2), ("f", 5), ("d", 3)]
    assert results[-1].score == -math.inf
    assert await core.rerank("q", passages, top_n=2) == [RerankResult("b", 1, 0.9), RerankResult("e", 4, 0.9)]


async def test_scoring_runs_off_the_event_loop_one_call_at_a_time():
    scorer = StandInScorer(fn=by_length, delay_s=0.2)
    core = RerankCore(scorer, max_concurrency=1)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticking = asyncio.create_task(ticker())
    started = time.perf_counter()
    await asyncio.gather(*(core.rerank("q", PASSAGES) for _ in range(3)))
    elapsed = time.perf_counter() - started
    ticking.cancel()
    assert scorer.most_running == 1 and elapsed >= 0.55
    assert ticks >= 20, "the event loop was blocked while scoring"


async def test_max_concurrency_bounds_threads_even_for_cancelled_calls():
    scorer = StandInScorer(fn=by_length, delay_s=0.3)
    core = RerankCore(scorer, max_concurrency=2)
    first = [asyncio.create_task(core.rerank("q", PASSAGES)) for _ in range(2)]
    await asyncio.sleep(0.1)
    for task in first:  # their threads go on; their slots stay taken until those end
        task.cancel()
    await asyncio.gather(*first, return_exceptions=True)
    assert all(task.cancelled() for task in first)
    await asyncio.gather(*(core.rerank("q", PASSAGES) for _ in range(2)))
    assert scorer.most_running == 2 and scorer.finished == 4


async def test_metrics():
    registry = CollectorRegistry()
    core = RerankCore(StandInScorer(fn=by_length), registry=registry)
    await core.rerank("q", PASSAGES)
    await core.rerank("q", PASSAGES[:2])
    with pytest.raises(InvalidArgument):
        await core.rerank("", PASSAGES)
    labels = {"kind": "fallback"}
    assert registry.get_sample_value("servemesh_rerank_passages_count", labels) == 2
    assert registry.get_sample_value("servemesh_rerank_passages_sum", labels) == 7
    assert registry.get_sample_value("servemesh_rerank_seconds_count", labels) == 2
    assert registry.get_sample_value("servemesh_rerank_queue_wait_seconds_count", labels) == 2


# --- settings -----------------------------------------------------------------------------


def test_settings_defaults_and_environment(tmp_path):
    settings = RerankSettings()
    assert (settings.port, settings.scorer, settings.model_dir, settings.max_concurrency) == (50054, "auto", None, 1)
    assert settings.fallback_dense_weight == 0.7 and settings.resolved_scorer() == "fallback"
    assert settings.embedding_cache_dir == Path.home() / ".local/share/servemesh/models/onnx"
    loaded = load_settings(
        RerankSettings,
        config_dir=service_config_dir("rerank"),
        environ={"SERVEMESH_RERANK_MODEL_DIR": str(tmp_path), "SERVEMESH_RERANK_FALLBACK_DENSE_WEIGHT": "0.5"},
    )
    assert (loaded.port, loaded.metrics_port) == (50054, 9154)
    assert loaded.model_dir == tmp_path and loaded.resolved_scorer() == "cross_encoder"
    assert loaded.fallback_dense_weight == 0.5


@pytest.mark.parametrize("environment", ["dev", "staging", "prod"])
def test_every_environment_file_loads(environment):
    settings = load_settings(RerankSettings, config_dir=service_config_dir("rerank"), environ={"APP_ENV": environment})
    assert settings.port == 50054
    if environment != "dev":
        assert settings.resolved_scorer() == "cross_encoder" and settings.model_dir == Path("/models/reranker")


def test_cross_encoder_without_model_dir_is_refused():
    with pytest.raises(SettingsError) as err:
        load_settings(
            RerankSettings,
            config_dir=service_config_dir("rerank"),
            environ={"SERVEMESH_RERANK_SCORER": "cross_encoder"},
        )
    assert "model_dir" in str(err.value) and "required when scorer is cross_encoder" in str(err.value)
    assert "SERVEMESH_RERANK_MODEL_DIR" in str(err.value)
    with pytest.raises(SettingsError, match="fallback_dense_weight=1.5: must be <= 1"):
        load_settings(
            RerankSettings,
            config_dir=service_config_dir("rerank"),
            environ={"SERVEMESH_RERANK_FALLBACK_DENSE_WEIGHT": "1.5"},
        )
