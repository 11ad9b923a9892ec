"""The retrieval service's on-disk store: corpora, dedupe, versioned builds, crash safety, tenants."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.retrieval.errors import (
    BuildCorrupted,
    BuildInProgress,
    IndexNotFound,
    ManifestNotFound,
)
from services.retrieval.models import Document, MediaType, Section
from services.retrieval.store import (
    BuildWriter,
    IndexStore,
    ManifestCounts,
    ManifestInput,
    ManifestRecord,
    index_name,
    inputs_sha256,
    manifest_name,
    parse_index_name,
    parse_manifest_name,
    parse_tenant_name,
)

REPO = Path(__file__).resolve().parents[2]


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def make_doc(document_id: str, text: str, **overrides: object) -> Document:
    fields: dict[str, object] = {
        "document_id": document_id,
        "filename": f"{document_id}.md",
        "title": f"Title of {document_id}",
        "text": text,
        "sections": (Section(("Intro",), 0, len(text)),),
        "media_type": MediaType.MARKDOWN,
        "content_sha256": sha(text),
        "metadata": {"lang": "en"},
    }
    fields.update(overrides)
    return Document(**fields)  # type: ignore[arg-type]


def record_for(store: IndexStore, writer: BuildWriter, *, chunk_tokens: int = 128) -> ManifestRecord:
    inputs = [ManifestInput(d, s, 2) for d, s in store.corpus_inputs(writer.tenant, writer.index)]
    return ManifestRecord(
        tenant=writer.tenant,
        index=writer.index,
        manifest_id=writer.manifest_id,
        inputs=tuple(inputs),
        embedding_model="all-MiniLM-L6-v2",
        embedding_model_sha256="ab" * 32,
        embedding_dimensions=384,
        parameters={"chunk_tokens": chunk_tokens, "chunk_overlap": 16, "dense_kind": "flat"},
        counts=ManifestCounts(documents=len(inputs), chunks=2 * len(inputs), duplicate_chunks=0, tokens=100),
        create_time=datetime.now(UTC),
        build_seconds=0.5,
    )


def build(
    store: IndexStore, tenant: str = "acme", index: str = "docs", payload: bytes = b"vectors", **kwargs: object
) -> ManifestRecord:
    with store.begin_build(tenant, index, actor="alice", reason="nightly") as writer:
        (writer.path / "dense.faiss").write_bytes(payload)
        (writer.path / "sparse").mkdir()
        (writer.path / "sparse" / "bm25.json").write_text('{"k1": 1.2}')
        return writer.commit(record_for(store, writer, **kwargs))  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> IndexStore:
    return IndexStore(tmp_path)


@pytest.fixture
def seeded(store: IndexStore) -> IndexStore:
    store.put_document("acme", "docs", make_doc("a", "alpha text"))
    store.put_document("acme", "docs", make_doc("b", "beta text"))
    return store


# --- corpus ------------------------------------------------------------------------------


def test_put_dedupes_by_content_and_replaces_by_id(store: IndexStore, tmp_path: Path) -> None:
    assert store.put_document("acme", "docs", make_doc("a", "alpha")) == ("ingested", "a")
    # same content under another id: reported as a duplicate of "a", nothing stored
    assert store.put_document("acme", "docs", make_doc("b", "alpha")) == ("duplicate", "a")
    assert not (tmp_path / "tenants/acme/indexes/docs/corpus/b.json").exists()
    assert store.put_document("acme", "docs", make_doc("a", "alpha")) == ("duplicate", "a")
    assert store.document_count("acme", "docs") == 1

    # same id, new content: replaces; the old content is free again
    assert store.put_document("acme", "docs", make_doc("a", "alpha v2")) == ("ingested", "a")
    assert store.corpus_inputs("acme", "docs") == [("a", sha("alpha v2"))]
    hashes = tmp_path / "tenants/acme/indexes/docs/corpus-hashes"
    assert {p.name: p.read_text() for p in hashes.iterdir()} == {sha("alpha v2"): "a"}
    assert store.put_document("acme", "docs", make_doc("c", "alpha")) == ("ingested", "c")
    assert store.put_document("acme", "docs", make_doc("d", "alpha v2")) == ("duplicate", "a")
    assert store.corpus_inputs("acme", "docs") == [("a", sha("alpha v2")), ("c", sha("alpha"))]
    assert store.document_count("acme", "docs") == 2
    # the hash map holds exactly the stored contents
    assert {p.name: p.read_text() for p in hashes.iterdir()} == {sha("alpha v2"): "a", sha("alpha"): "c"}


def test_documents_round_trip_in_id_order(store: IndexStore) -> None:
    weird = make_doc(
        ".Z_9-x.json",
        'Zürich ☃ "quoted"\nline',
        title="Ünïcode",
        sections=(Section(("H1", "H2"), 0, 6), Section((), 7, 12)),
        media_type=MediaType.HTML,
        metadata={"team": "search", "tier": "1"},
    )
    for doc in (make_doc("m", "middle"), weird, make_doc("B", "upper b"), make_doc("a", "lower a")):
        store.put_document("acme", "docs", doc)
    docs = list(store.documents("acme", "docs"))
    assert [d.document_id for d in docs] == [".Z_9-x.json", "B", "a", "m"]
    assert docs[0] == weird
    assert docs[0].sections[0].headings == ("H1", "H2")
    assert docs[0].media_type is MediaType.HTML
    assert [i for i, _ in store.corpus_inputs("acme", "docs")] == [".Z_9-x.json", "B", "a", "m"]


def test_corpus_inputs_sees_writes_of_another_replica(tmp_path: Path) -> None:
    one, two = IndexStore(tmp_path), IndexStore(tmp_path)
    one.put_document("acme", "docs", make_doc("a", "first"))
    assert one.corpus_inputs("acme", "docs") == [("a", sha("first"))]
    # the other replica replaces "a" and dedupes against what the first stored
    assert two.put_document("acme", "docs", make_doc("z", "first")) == ("duplicate", "a")
    assert two.put_document("acme", "docs", make_doc("a", "second")) == ("ingested", "a")
    assert one.corpus_inputs("acme", "docs") == [("a", sha("second"))]
    assert one.put_document("acme", "docs", make_doc("y", "second")) == ("duplicate", "a")


def test_stale_hash_entry_from_a_crash_is_ignored(store: IndexStore, tmp_path: Path) -> None:
    # a crash between writing the hash entry and the document leaves an entry pointing at nothing
    store.put_document("acme", "docs", make_doc("a", "alpha"))
    hashes = tmp_path / "tenants/acme/indexes/docs/corpus-hashes"
    (hashes / sha("ghost")).write_text("never-written")
    assert store.put_document("acme", "docs", make_doc("g", "ghost")) == ("ingested", "g")
    assert (hashes / sha("ghost")).read_text() == "g"


def test_bad_document_input_is_refused(store: IndexStore, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="content_sha256"):
        store.put_document("acme", "docs", make_doc("a", "x", content_sha256="../../etc/passwd"))
    for bad in ("..", ".", "a/b", "x" * 129, "", "a b"):
        with pytest.raises(ValueError, match="document id"):
            store.put_document("acme", "docs", make_doc(bad, "x"))
    assert list(tmp_path.iterdir()) == []  # refused before anything was created


# --- tenants and names -------------------------------------------------------------------


def test_tenants_are_isolated(store: IndexStore) -> None:
    store.put_document("acme", "docs", make_doc("a", "acme secret"))
    store.put_document("globex", "docs", make_doc("a", "globex secret"))
    # the same content in another tenant is not a duplicate
    assert store.put_document("globex", "docs", make_doc("b", "acme secret")) == ("ingested", "b")
    assert [d.text for d in store.documents("acme", "docs")] == ["acme secret"]
    assert [d.text for d in store.documents("globex", "docs")] == ["globex secret", "acme secret"]

    acme_build = build(store, "acme", "docs")
    assert store.current("acme", "docs") == acme_build.manifest_id
    assert store.current("globex", "docs") is None
    assert store.list_manifests("globex", "docs") == []
    with pytest.raises(ManifestNotFound):
        store.read_manifest("globex", "docs", acme_build.manifest_id)
    with pytest.raises(ManifestNotFound):
        store.pin("globex", "docs", acme_build.manifest_id, actor="mallory", reason="steal")
    assert store.current("globex", "docs") is None
    assert store.list_indexes("acme") == ["docs"]
    assert store.list_indexes("initech") == []
    with pytest.raises(IndexNotFound, match="tenants/initech/indexes/docs"):
        store.documents("initech", "docs")


@pytest.mark.parametrize("tenant", ["..", "../acme", "a/b", "Acme", "1acme", "acme\n", "", "a" * 64, "ac_me"])
def test_bad_tenant_ids_raise(store: IndexStore, tenant: str) -> None:
    with pytest.raises(ValueError, match="tenant id"):
        store.put_document(tenant, "docs", make_doc("a", "x"))
    with pytest.raises(ValueError, match="tenant id"):
        store.list_indexes(tenant)
    with pytest.raises(ValueError, match="tenant id"):
        index_name(tenant, "docs")


@pytest.mark.parametrize("index", ["..", "docs/../x", "/abs", "Docs", "docs\n"])
def test_bad_index_ids_raise(store: IndexStore, tmp_path: Path, index: str) -> None:
    with pytest.raises(ValueError, match="index id"):
        store.put_document("acme", index, make_doc("a", "x"))
    with pytest.raises(ValueError, match="index id"):
        store.begin_build("acme", index)
    assert list(tmp_path.iterdir()) == []
    assert not Path("/abs").exists()


def test_bad_manifest_ids_raise(seeded: IndexStore) -> None:
    for bad in ("..", ".partial-x", "a/b", "UPPER"):
        with pytest.raises(ValueError, match="manifest id"):
            seeded.pin("acme", "docs", bad, actor="a", reason="r")
        with pytest.raises(ValueError, match="manifest id"):
            seeded.read_manifest("acme", "docs", bad)


def test_resource_names_round_trip_and_reject_garbage() -> None:
    assert index_name("acme", "docs") == "tenants/acme/indexes/docs"
    assert parse_index_name("tenants/acme/indexes/docs") == ("acme", "docs")
    name = manifest_name("acme", "docs", "20250102t030405000006z")
    assert name == "tenants/acme/indexes/docs/manifests/20250102t030405000006z"
    assert parse_manifest_name(name) == ("acme", "docs", "20250102t030405000006z")
    assert parse_tenant_name("tenants/acme") == "acme"
    for bad in (
        "tenants/acme/indexes",
        "tenants/acme/indexes/docs/",
        "/tenants/acme/indexes/docs",
        "tenants/acme/indices/docs",
        "tenants/../indexes/docs",
        "tenants/acme/indexes/docs/manifests/x",
        "tenants/ACME/indexes/docs",
        "",
    ):
        with pytest.raises(ValueError):
            parse_index_name(bad)
    for bad in (
        "tenants/acme/indexes/docs",
        "tenants/acme/indexes/docs/manifests/..",
        "tenants/acme/indexes/docs/builds/m1",
        "tenants/acme/indexes/docs/manifests/m1/extra",
    ):
        with pytest.raises(ValueError):
            parse_manifest_name(bad)


# --- records -----------------------------------------------------------------------------


def test_manifest_record_json_round_trip_and_inputs_hash() -> None:
    record = ManifestRecord(
        tenant="acme",
        index="docs",
        manifest_id="20250102t030405000006z",
        inputs=(("b", "2" * 64, 3), ("a", "1" * 64, 5)),  # type: ignore[arg-type]
        embedding_model="m",
        embedding_model_sha256="f" * 64,
        embedding_dimensions=384,
        parameters={"chunk_tokens": 128, "chunk_overlap": 16, "dense_kind": "hnsw"},
        counts=ManifestCounts(2, 8, 1, 900),
        create_time=datetime(2025, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
        build_seconds=1.25,
        files_sha256="e" * 64,
        files={"x.bin": "d" * 64},
    )
    assert [i.document_id for i in record.inputs] == ["a", "b"]
    assert record.name == "tenants/acme/indexes/docs/manifests/20250102t030405000006z"
    again = ManifestRecord.from_json(record.to_json())
    assert again == record
    assert again.create_time.tzinfo is UTC
    expected = hashlib.sha256(f"a\t{'1' * 64}\nb\t{'2' * 64}\n".encode()).hexdigest()
    assert inputs_sha256(record.inputs) == expected
    assert inputs_sha256([("b", "2" * 64), ("a", "1" * 64)]) == expected
    with pytest.raises(ValueError, match="malformed"):
        ManifestRecord.from_json(json.dumps({"tenant": "acme"}))


# --- builds ------------------------------------------------------------------------------


def test_commit_makes_build_current_and_visible(seeded: IndexStore, tmp_path: Path) -> None:
    assert seeded.current("acme", "docs") is None
    record = build(seeded)
    index_dir = tmp_path / "tenants/acme/indexes/docs"
    assert seeded.current("acme", "docs") == record.manifest_id
    assert (index_dir / "CURRENT").read_text() == f"{record.manifest_id}\n"
    assert [m.manifest_id for m in seeded.list_manifests("acme", "docs")] == [record.manifest_id]
    assert seeded.read_manifest("acme", "docs", record.manifest_id) == record
    assert record.inputs_sha256 == inputs_sha256([("a", sha("alpha text")), ("b", sha("beta text"))])
    assert record.files == {
        "dense.faiss": hashlib.sha256(b"vectors").hexdigest(),
        "sparse/bm25.json": hashlib.sha256(b'{"k1": 1.2}').hexdigest(),
    }
    assert record.parameters["chunk_tokens"] == 128
    folder = seeded.build_path("acme", "docs", record.manifest_id)
    assert folder == index_dir / "builds" / record.manifest_id
    assert (folder / "dense.faiss").read_bytes() == b"vectors"
    assert ManifestRecord.from_json((folder / "manifest.json").read_text()) == record
    assert [p.name for p in (index_dir / "builds").iterdir()] == [record.manifest_id]
    assert seeded.verify_build("acme", "docs", record.manifest_id) == record
    assert seeded.history("acme", "docs")[-1] | {"time": None} == {
        "time": None,
        "actor": "alice",
        "action": "build",
        "from": None,
        "to": record.manifest_id,
        "reason": "nightly",
    }


def test_manifest_ids_sort_by_time_and_are_unique(seeded: IndexStore) -> None:
    ids = [build(seeded).manifest_id for _ in range(4)]
    assert ids == sorted(ids) and len(set(ids)) == 4
    assert all(len(i) == 22 and i[8] == "t" and i.endswith("z") for i in ids)
    assert [m.manifest_id for m in seeded.list_manifests("acme", "docs")] == ids[::-1]


def test_failing_build_leaves_previous_current(seeded: IndexStore, tmp_path: Path) -> None:
    first = build(seeded)
    with pytest.raises(RuntimeError, match="embedder died"):
        with seeded.begin_build("acme", "docs") as writer:
            (writer.path / "dense.faiss").write_bytes(b"half")
            raise RuntimeError("embedder died")
    assert seeded.current("acme", "docs") == first.manifest_id
    assert [m.manifest_id for m in seeded.list_manifests("acme", "docs")] == [first.manifest_id]
    assert sorted(p.name for p in (tmp_path / "tenants/acme/indexes/docs/builds").iterdir()) == [first.manifest_id]
    # the lock was released: another build runs
    assert build(seeded).manifest_id > first.manifest_id


def test_bad_commit_aborts_and_releases(seeded: IndexStore) -> None:
    writer = seeded.begin_build("acme", "docs")
    (writer.path / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match="manifest.json"):
        writer.commit(record_for(seeded, writer))
    assert not writer.path.exists()
    other = seeded.begin_build("acme", "docs")
    with pytest.raises(ValueError, match="does not belong"):
        other.commit(record_for(seeded, writer))
    assert seeded.current("acme", "docs") is None
    with pytest.raises(RuntimeError, match="aborted"):
        other.commit(record_for(seeded, other))


def test_build_without_documents_or_index(store: IndexStore) -> None:
    with pytest.raises(IndexNotFound, match="tenants/acme/indexes/nope"):
        store.begin_build("acme", "nope")
    assert not store.index_exists("acme", "nope")


def test_concurrent_begin_build_in_one_process(seeded: IndexStore) -> None:
    with seeded.begin_build("acme", "docs"):
        with pytest.raises(BuildInProgress, match="tenants/acme/indexes/docs"):
            seeded.begin_build("acme", "docs")
        # a second store object (another replica's view) is refused too
        with pytest.raises(BuildInProgress):
            IndexStore(seeded.data_dir).begin_build("acme", "docs")
        # other indexes are not blocked
        seeded.put_document("acme", "other", make_doc("o", "other"))
        seeded.begin_build("acme", "other").abort()
    seeded.begin_build("acme", "docs").abort()


def _child(code: str, data_dir: Path, **kwargs: object) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(  # type: ignore[call-overload]
        [sys.executable, "-c", textwrap.dedent(code), str(data_dir)],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


def test_build_lock_held_by_another_process(seeded: IndexStore) -> None:
    child = _child(
        """
        import sys
        from pathlib import Path
        from services.retrieval.store import IndexStore
        writer = IndexStore(Path(sys.argv[1])).begin_build("acme", "docs")
        print("holding", flush=True)
        sys.stdin.readline()
        writer.abort()
        """,
        seeded.data_dir,
        stdin=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "holding"
        with pytest.raises(BuildInProgress):
            seeded.begin_build("acme", "docs")
        assert seeded.cleanup_partials() == []  # the live build's partial folder is left alone
    finally:
        _, err = child.communicate("go\n", timeout=60)
    assert child.returncode == 0, err
    seeded.begin_build("acme", "docs").abort()


def test_crash_mid_build_keeps_old_build_serving(seeded: IndexStore, tmp_path: Path) -> None:
    first = build(seeded)
    before = seeded.list_manifests("acme", "docs")
    child = _child(
        """
        import os, signal, sys
        from pathlib import Path
        from services.retrieval.store import IndexStore
        writer = IndexStore(Path(sys.argv[1])).begin_build("acme", "docs")
        (writer.path / "dense.faiss").write_bytes(b"x" * 100_000)
        print(writer.path, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """,
        tmp_path,
    )
    out, err = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, err
    leftover = Path(out.strip())
    assert leftover.is_dir() and leftover.name.startswith(".partial-")
    assert (leftover / "dense.faiss").stat().st_size == 100_000

    assert seeded.current("acme", "docs") == first.manifest_id
    assert seeded.list_manifests("acme", "docs") == before
    assert seeded.cleanup_partials() == [leftover]
    assert not leftover.exists()
    second = build(seeded)  # the lock died with the process
    assert seeded.current("acme", "docs") == second.manifest_id


def test_begin_build_sweeps_a_crashed_partial(seeded: IndexStore, tmp_path: Path) -> None:
    stale = tmp_path / "tenants/acme/indexes/docs/builds/.partial-20000101t000000000000z"
    stale.mkdir(parents=True)
    (stale / "junk").write_bytes(b"junk")
    with seeded.begin_build("acme", "docs") as writer:
        assert not stale.exists()
        assert writer.path.exists()


def test_cleanup_removes_temporary_files(seeded: IndexStore, tmp_path: Path) -> None:
    index_dir = tmp_path / "tenants/acme/indexes/docs"
    temps = [index_dir / "corpus/.a.json.dead.tmp", index_dir / ".CURRENT.dead.tmp"]
    for temp in temps:
        temp.write_text("torn")
    assert sorted(seeded.cleanup_partials()) == sorted(temps)
    assert not any(t.exists() for t in temps)
    assert seeded.document_count("acme", "docs") == 2


# --- pin, history, verify, prune ---------------------------------------------------------


def test_pin_rolls_back_and_forward_with_history(seeded: IndexStore) -> None:
    first = build(seeded, chunk_tokens=64)
    second = build(seeded, chunk_tokens=256)
    assert seeded.current("acme", "docs") == second.manifest_id
    assert seeded.pin("acme", "docs", first.manifest_id, actor="bob", reason="bad recall") == second.manifest_id
    assert seeded.current("acme", "docs") == first.manifest_id
    assert seeded.pin("acme", "docs", second.manifest_id, actor="carol", reason="fixed") == first.manifest_id
    assert seeded.current("acme", "docs") == second.manifest_id
    lines = [{k: v for k, v in line.items() if k != "time"} for line in seeded.history("acme", "docs")]
    assert lines == [
        {"actor": "alice", "action": "build", "from": None, "to": first.manifest_id, "reason": "nightly"},
        {"actor": "alice", "action": "build", "from": first.manifest_id, "to": second.manifest_id, "reason": "nightly"},
        {"actor": "bob", "action": "pin", "from": second.manifest_id, "to": first.manifest_id, "reason": "bad recall"},
        {"actor": "carol", "action": "pin", "from": first.manifest_id, "to": second.manifest_id, "reason": "fixed"},
    ]
    assert all(datetime.fromisoformat(line["time"]).tzinfo is not None for line in seeded.history("acme", "docs"))


def test_pin_of_missing_manifest_leaves_current(seeded: IndexStore) -> None:
    first = build(seeded)
    with pytest.raises(ManifestNotFound, match="tenants/acme/indexes/docs/manifests/20990101t000000000000z"):
        seeded.pin("acme", "docs", "20990101t000000000000z", actor="bob", reason="typo")
    partial = seeded.begin_build("acme", "docs")
    with pytest.raises(ManifestNotFound):  # a partial build cannot be pinned or read
        seeded.pin("acme", "docs", partial.manifest_id, actor="bob", reason="too early")
    with pytest.raises(ManifestNotFound):
        seeded.read_manifest("acme", "docs", partial.manifest_id)
    partial.abort()
    assert seeded.current("acme", "docs") == first.manifest_id
    assert [line["action"] for line in seeded.history("acme", "docs")] == ["build"]


def test_current_version_changes_on_switch(seeded: IndexStore) -> None:
    first = build(seeded)
    version = seeded.current_version("acme", "docs")
    assert version[0] == first.manifest_id and version[1] > 0
    assert seeded.current_version("acme", "docs") == version
    second = build(seeded)
    assert seeded.current_version("acme", "docs")[0] == second.manifest_id
    # another replica's store sees the switch too
    assert IndexStore(seeded.data_dir).current("acme", "docs") == second.manifest_id
    with pytest.raises(IndexNotFound):
        seeded.current_version("acme", "nope")


def test_verify_build_catches_corruption(seeded: IndexStore) -> None:
    record = build(seeded)
    folder = seeded.build_path("acme", "docs", record.manifest_id)
    seeded.verify_build("acme", "docs", record.manifest_id)

    (folder / "dense.faiss").write_bytes(b"vectorz")
    with pytest.raises(BuildCorrupted, match="changed: dense.faiss"):
        seeded.verify_build("acme", "docs", record.manifest_id)
    (folder / "dense.faiss").write_bytes(b"vectors")
    seeded.verify_build("acme", "docs", record.manifest_id)

    (folder / "sparse/bm25.json").unlink()
    (folder / "extra.bin").write_bytes(b"?")
    with pytest.raises(BuildCorrupted, match="missing: sparse/bm25.json; unexpected: extra.bin"):
        seeded.verify_build("acme", "docs", record.manifest_id)

    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(BuildCorrupted, match="manifest.json is unreadable"):
        seeded.read_manifest("acme", "docs", record.manifest_id)
    assert seeded.list_manifests("acme", "docs") == []


def test_prune_keeps_newest_and_current(seeded: IndexStore, tmp_path: Path) -> None:
    ids = [build(seeded).manifest_id for _ in range(5)]
    seeded.pin("acme", "docs", ids[0], actor="bob", reason="rollback")
    assert seeded.prune("acme", "docs", keep=2) == ids[1:3]
    assert [m.manifest_id for m in seeded.list_manifests("acme", "docs")] == [ids[4], ids[3], ids[0]]
    assert seeded.current("acme", "docs") == ids[0]
    assert sorted(p.name for p in (tmp_path / "tenants/acme/indexes/docs/builds").iterdir()) == [
        ids[0],
        ids[3],
        ids[4],
    ]
    assert seeded.prune("acme", "docs", keep=1) == [ids[3]]
    assert [m.manifest_id for m in seeded.list_manifests("acme", "docs")] == [ids[4], ids[0]]
    with pytest.raises(ValueError, match="keep"):
        seeded.prune("acme", "docs", keep=0)


def test_list_indexes_and_missing_index_errors(store: IndexStore) -> None:
    store.put_document("acme", "zeta", make_doc("a", "z"))
    store.put_document("acme", "alpha", make_doc("a", "a"))
    (store.data_dir / "tenants/acme/indexes/empty").mkdir()
    assert store.list_indexes("acme") == ["alpha", "zeta"]
    assert store.index_exists("acme", "alpha") and not store.index_exists("acme", "empty")
    for call in (
        lambda: store.list_manifests("acme", "empty"),
        lambda: store.read_manifest("acme", "empty", "m1"),
        lambda: store.history("acme", "empty"),
        lambda: store.document_count("acme", "empty"),
        lambda: store.corpus_inputs("acme", "empty"),
        lambda: store.prune("acme", "empty", keep=1),
        lambda: store.pin("acme", "empty", "m1", actor="a", reason="r"),
    ):
        with pytest.raises(IndexNotFound, match="tenants/acme/indexes/empty"):
            call()
