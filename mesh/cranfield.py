"""The Cranfield collection and the ranking metrics the RAG benchmark and its regression test share.

Cranfield (../shared/data/cranfield, beside the repository): 1,400 aeronautics abstracts, 225
queries and graded relevance judgements. Its quirks, handled here once:

- cran.qry numbers its queries with `.I` labels that skip (001, 002, 004, ...); cranqrel numbers
  them 1..225 by position in cran.qry.
- cranqrel's codes: 1 (a complete answer) to 4 (of minimum interest); -1 means "not judged"
  and is dropped. Graded gain = 5 - code (1 -> 4, ..., 4 -> 1).
- Two abstracts (.W) are empty; they are left out of the corpus (ingestion refuses empty files),
  but judgements naming them still count as relevant, so they lower recall as they should.

Metrics are per document: a ranking of chunks is first turned into a ranking of documents,
each document at the rank of its best chunk (`documents_of`).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.retrieval.core import Hit, Mode, RetrievalCore
    from services.retrieval.store import ManifestRecord

REPO = Path(__file__).resolve().parent.parent
_FIELD = re.compile(r"^\.([ITABW])\b ?(.*)$")


@dataclass(frozen=True, slots=True)
class Abstract:
    doc_id: str  # Cranfield's .I, as a string ("1" .. "1400")
    title: str  # .T, whitespace collapsed
    text: str  # .W, whitespace collapsed


@dataclass(frozen=True, slots=True)
class Query:
    number: int  # 1..225, by position in cran.qry (what cranqrel uses)
    label: str  # cran.qry's own .I label ("001", "002", "004", ...)
    text: str


@dataclass(frozen=True, slots=True)
class Cranfield:
    abstracts: list[Abstract]  # those with a non-empty abstract
    empty: list[str]  # doc ids of the abstracts left out
    queries: list[Query]
    #: query number -> doc id -> graded gain (1..4); only judged-relevant documents
    qrels: dict[int, dict[str, int]]

    def judged(self) -> list[Query]:
        """The queries with at least one relevant document (the ones metrics are averaged over)."""
        return [q for q in self.queries if self.qrels.get(q.number)]


def data_dir() -> Path:
    """../shared/data/cranfield beside the repository, or a clear error."""
    path = REPO.parent / "shared" / "data" / "cranfield"
    if not (path / "cran.all.1400").is_file():
        raise FileNotFoundError(
            f"the Cranfield collection is not at {path} (expected cran.all.1400, cran.qry and cranqrel there: "
            "the shared data folder is checked out beside the repository as ../shared)"
        )
    return path


def _records(path: Path) -> list[dict[str, str]]:
    """`.I` records of a SMART-format file: field letter -> its text, whitespace collapsed."""
    records: list[dict[str, list[str]]] = []
    field = ""
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        m = _FIELD.match(line)
        if m and m.group(1) == "I":
            records.append({"I": [m.group(2)]})
            field = ""
        elif m and records:
            field = m.group(1)
            records[-1].setdefault(field, []).append(m.group(2))
        elif field:
            records[-1][field].append(line)
    return [{k: " ".join(" ".join(v).split()) for k, v in r.items()} for r in records]


def load(directory: Path | None = None) -> Cranfield:
    directory = directory or data_dir()
    abstracts, empty = [], []
    for r in _records(directory / "cran.all.1400"):
        if r.get("W"):
            abstracts.append(Abstract(r["I"], r.get("T", ""), r["W"]))
        else:
            empty.append(r["I"])
    queries = [Query(n, r["I"], r.get("W", "")) for n, r in enumerate(_records(directory / "cran.qry"), start=1)]
    qrels: dict[int, dict[str, int]] = {}
    for line in (directory / "cranqrel").read_text().splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        number, doc_id, code = int(parts[0]), str(int(parts[1])), int(parts[2])
        if 1 <= code <= 4:
            judged = qrels.setdefault(number, {})
            judged[doc_id] = max(judged.get(doc_id, 0), 5 - code)
    return Cranfield(abstracts, empty, queries, qrels)


# --- through the retrieval core -----------------------------------------------------------------

#: chunks retrieved per query: the hybrid default's candidates per list (fusion_candidates), so a
#: hybrid ranking's first 10 are exactly what a top_k=10 search returns; also the rerank pool
DEPTH = 100


async def ingest(core: RetrievalCore, index: str, collection: Cranfield) -> None:
    """Each non-empty abstract as a text document: id = Cranfield's doc id, title = .T, text = .W."""
    from services.retrieval.core import FileHeader, IngestStatus, parse_index
    from services.retrieval.models import MediaType

    tenant, idx = parse_index(index)
    for a in collection.abstracts:
        header = FileHeader(f"cran-{a.doc_id}.txt", MediaType.TEXT, document_id=a.doc_id, title=a.title)
        result = await core.ingest_file(tenant, idx, header, a.text.encode())
        if result.status != IngestStatus.INGESTED:
            raise RuntimeError(f"Cranfield {a.doc_id} was not ingested: {result.status} {result.error}")


async def build(core: RetrievalCore, index: str, reason: str = "cranfield") -> ManifestRecord:
    """Build `index` with the core's settings; the finished build's manifest."""
    from services.retrieval.core import BuildParams

    manifest = None
    async for progress in core.build(index, BuildParams(), actor="cranfield", reason=reason):
        manifest = progress.manifest or manifest
    if manifest is None:
        raise RuntimeError(f"the build of {index} ended without a manifest")
    return manifest


async def search_all(
    core: RetrievalCore,
    index: str,
    queries: Sequence[Query],
    mode: Mode,
    fusion: str | None = None,
    top_k: int = DEPTH,
) -> dict[int, list[Hit]]:
    """Query number -> the top_k best chunks (hits) of that mode."""
    return {q.number: (await core.search(index, q.text, top_k=top_k, mode=mode, fusion=fusion)).hits for q in queries}


def rankings(hits: Mapping[int, Sequence[Hit]]) -> dict[int, list[str]]:
    """Query number -> document ranking of its hits (each document at its best chunk)."""
    return {n: documents_of(h.chunk.document_id for h in hs) for n, hs in hits.items()}


# --- metrics -------------------------------------------------------------------------------------


def documents_of(doc_ids: Iterable[str]) -> list[str]:
    """Document ids of a ranked list of chunks, each kept at its first (best) rank."""
    return list(dict.fromkeys(doc_ids))


def ndcg(ranking: Sequence[str], gains: Mapping[str, int], k: int = 10) -> float:
    """nDCG@k with linear graded gains: DCG = sum over ranks i = 1..k of gain_i / log2(i + 1),
    divided by the DCG of the ideal ordering of every judged document. 0 when nothing is relevant."""
    dcg = sum(gains.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranking[:k]))
    ideal = sorted(gains.values(), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall(ranking: Sequence[str], gains: Mapping[str, int], k: int = 100) -> float:
    """Share of the relevant documents (gain > 0) among the first k of the ranking."""
    relevant = {d for d, g in gains.items() if g > 0}
    return len(relevant.intersection(ranking[:k])) / len(relevant) if relevant else 0.0


def reciprocal_rank(ranking: Sequence[str], gains: Mapping[str, int]) -> float:
    """1 / rank of the first relevant document in the ranking (0 when there is none)."""
    return next((1.0 / i for i, d in enumerate(ranking, start=1) if gains.get(d, 0) > 0), 0.0)


@dataclass(frozen=True, slots=True)
class Scores:
    ndcg10: float
    recall100: float
    mrr: float
    queries: int
    #: mean number of distinct documents in the rankings scored
    documents: float


def evaluate(rankings: Mapping[int, Sequence[str]], qrels: Mapping[int, Mapping[str, int]]) -> Scores:
    """Mean nDCG@10, recall@100 and MRR of document rankings (query number -> doc ids, best first),
    over the queries with at least one relevant document; a judged query without a ranking scores 0."""
    judged = [n for n, gains in qrels.items() if gains]
    if not judged:
        raise ValueError("no query has a relevant document")
    per = [(rankings.get(n, ()), qrels[n]) for n in judged]
    return Scores(
        ndcg10=statistics.fmean(ndcg(r, g, 10) for r, g in per),
        recall100=statistics.fmean(recall(r, g, 100) for r, g in per),
        mrr=statistics.fmean(reciprocal_rank(r, g) for r, g in per),
        queries=len(judged),
        documents=statistics.fmean(len(r) for r, _ in per),
    )
