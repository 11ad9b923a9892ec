"""The ranking metrics and the Cranfield reader shared by `servemesh bench rag` and the quality test,
checked on small examples worked out by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from mesh import cranfield as cf

GAINS = {"a": 3, "b": 1, "c": 2}  # three judged documents; anything else has gain 0


def test_ndcg_on_a_hand_computed_ranking() -> None:
    ranking = ["x", "a", "y", "b"]  # relevant at ranks 2 (gain 3) and 4 (gain 1); "c" not retrieved
    dcg = 3 / math.log2(3) + 1 / math.log2(5)  # 1.89279 + 0.43068 = 2.32347
    idcg = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)  # 3 + 1.26186 + 0.5 = 4.76186
    assert cf.ndcg(ranking, GAINS, k=10) == pytest.approx(dcg / idcg)
    assert cf.ndcg(ranking, GAINS, k=10) == pytest.approx(0.48793, abs=1e-5)
    # the cut-off: only "a" at rank 2 counts at k=2, against the two best gains (3, 2)
    assert cf.ndcg(ranking, GAINS, k=2) == pytest.approx((3 / math.log2(3)) / (3 + 2 / math.log2(3)))


def test_ndcg_is_one_for_the_ideal_ordering_and_zero_without_relevant_documents() -> None:
    assert cf.ndcg(["a", "c", "b", "x"], GAINS) == pytest.approx(1.0)
    assert cf.ndcg(["x", "y"], GAINS) == 0.0
    assert cf.ndcg(["a"], {}) == 0.0


def test_recall_and_reciprocal_rank() -> None:
    ranking = ["x", "a", "y", "b"]
    assert cf.recall(ranking, GAINS, k=100) == pytest.approx(2 / 3)
    assert cf.recall(ranking, GAINS, k=2) == pytest.approx(1 / 3)
    assert cf.reciprocal_rank(ranking, GAINS) == 0.5
    assert cf.reciprocal_rank(["x", "y"], GAINS) == 0.0


def test_chunks_map_to_documents_at_their_best_rank() -> None:
    assert cf.documents_of(["d1", "d2", "d1", "d3", "d2"]) == ["d1", "d2", "d3"]


def test_evaluate_averages_over_judged_queries_and_counts_a_missing_ranking_as_zero() -> None:
    qrels = {1: {"a": 4}, 2: {"b": 2, "c": 1}, 3: {}}  # query 3 has no relevant document: left out
    rankings = {1: ["a", "x"], 3: ["a"]}  # query 2 returned nothing
    scores = cf.evaluate(rankings, qrels)
    assert scores.queries == 2
    assert scores.ndcg10 == pytest.approx(0.5)  # (1 + 0) / 2
    assert scores.recall100 == pytest.approx(0.5)
    assert scores.mrr == pytest.approx(0.5)
    assert scores.documents == pytest.approx(1.0)  # (2 + 0) / 2


def test_reader_numbers_queries_by_position_and_grades_codes(tmp_path: Path) -> None:
    (tmp_path / "cran.all.1400").write_text(
        ".I 1\n.T\nwing flutter .\n.A\nsmith\n.B\nj. ae. 1958\n.W\nwing flutter .\n  flutter of wings\nat speed .\n"
        ".I 2\n.T\nempty one .\n.A\n.B\n.W\n"
    )
    (tmp_path / "cran.qry").write_text(".I 001\n.W\nwhat is flutter .\n.I 004\n.W\nwhy do\nwings flutter .\n")
    (tmp_path / "cranqrel").write_text("1 1 1\n1 2 4 \n2 1 3\n2 7 -1\n")
    data = cf.load(tmp_path)
    assert [(a.doc_id, a.title, a.text) for a in data.abstracts] == [
        ("1", "wing flutter .", "wing flutter . flutter of wings at speed .")
    ]
    assert data.empty == ["2"]
    assert [(q.number, q.label, q.text) for q in data.queries] == [
        (1, "001", "what is flutter ."),
        (2, "004", "why do wings flutter ."),
    ]
    assert data.qrels == {1: {"1": 4, "2": 1}, 2: {"1": 2}}  # gain 5 - code; -1 dropped


def test_a_missing_collection_is_named_clearly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(cf, "REPO", tmp_path / "repo")
    with pytest.raises(FileNotFoundError, match=r"shared/data/cranfield"):
        cf.data_dir()
