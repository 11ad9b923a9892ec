"""On-disk store of the retrieval service: per-tenant corpora and immutable, versioned index builds.

Layout under `data_dir`, per index (`tenants/<tenant>/indexes/<index>/`):

    corpus/<document_id>.json   one document per file (every Document field)
    corpus-hashes/<sha256>      content hash -> id of the document holding it (O(1) dedupe)
    builds/<manifest_id>/       a finished build: manifest.json plus the builder's files
    builds/.partial-<id>/       a build being written; invisible to every reader
    builds/.deleting-<id>/      a pruned build being removed; invisible
    CURRENT                     the current manifest id, one line
    history.jsonl               one JSON line per build commit and pin
    .lock                       flock held for the whole of a build (one build per index)
    .current.lock               flock held while CURRENT and history change (commit, pin, prune)
    .corpus.lock                flock held while a document is written

Files are written under a temporary name, fsynced and renamed into place, so a reader (in
this process or in another replica sharing `data_dir`) sees the old or the new version,
never a mix. The kernel releases a flock when its process dies, so a crashed build never
blocks the next one; its partial folder is swept by the next build of the index or by
`cleanup_partials()`. `data_dir` must be a local filesystem (flock, atomic rename).

Every method does blocking file I/O and may wait briefly on a lock: call from a worker
thread in async code. Names are validated before any path is built, so no argument can
reach outside `data_dir` (ValueError names the bad part).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, NamedTuple

from services.retrieval.errors import (
    BuildCorrupted,
    BuildInProgress,
    EmptyCorpus,
    IndexNotFound,
    ManifestNotFound,
)
from services.retrieval.models import Document, MediaType, Section

_log = logging.getLogger(__name__)

TENANT_ID = re.compile(r"[a-z][a-z0-9-]{0,62}")
INDEX_ID = re.compile(r"[a-z][a-z0-9-]{0,62}")
DOCUMENT_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
#: Manifest ids are generated as `%Y%m%dt%H%M%S` + microseconds + `z` (UTC), so they sort by time.
MANIFEST_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")

MANIFEST_FILE = "manifest.json"
_ID_FORMAT = "%Y%m%dt%H%M%S%fz"
_PARTIAL = ".partial-"
_DELETING = ".deleting-"
_TMP_SUFFIX = ".tmp"
#: Start of every stored document file (compact JSON, these two keys first); lets
#: corpus_inputs() read a document's hash from its first bytes.
_DOC_PREFIX = re.compile(rb'\{"document_id":"([A-Za-z0-9._-]{1,128})","content_sha256":"([0-9a-f]{64})"')
_MANIFEST_CACHE_SIZE = 256

IngestOutcome = Literal["ingested", "duplicate"]


# --- names -------------------------------------------------------------------------------


def _check(kind: str, value: str, pattern: re.Pattern[str]) -> str:
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        raise ValueError(f"invalid {kind} {value!r}: must match ^{pattern.pattern}$")
    return value


def check_tenant_id(tenant: str) -> str:
    """Returns `tenant`, or raises ValueError naming it."""
    return _check("tenant id", tenant, TENANT_ID)


def check_index_id(index: str) -> str:
    """Returns `index`, or raises ValueError naming it."""
    return _check("index id", index, INDEX_ID)


def check_document_id(document_id: str) -> str:
    """Returns `document_id`, or raises ValueError naming it ("." and ".." are refused)."""
    if document_id in (".", ".."):
        raise ValueError(f"invalid document id {document_id!r}: '.' and '..' are reserved")
    return _check("document id", document_id, DOCUMENT_ID)


def check_manifest_id(manifest_id: str) -> str:
    """Returns `manifest_id`, or raises ValueError naming it."""
    return _check("manifest id", manifest_id, MANIFEST_ID)


def tenant_name(tenant: str) -> str:
    return f"tenants/{check_tenant_id(tenant)}"


def index_name(tenant: str, index: str) -> str:
    return f"tenants/{check_tenant_id(tenant)}/indexes/{check_index_id(index)}"


def manifest_name(tenant: str, index: str, manifest_id: str) -> str:
    return f"{index_name(tenant, index)}/manifests/{check_manifest_id(manifest_id)}"


def _split_name(name: str, literals: Sequence[str], pattern: str) -> list[str]:
    parts = name.split("/") if isinstance(name, str) else []
    if len(parts) != 2 * len(literals) or any(parts[2 * n] != lit for n, lit in enumerate(literals)):
        raise ValueError(f"invalid resource name {name!r}: expected {pattern}")
    return parts[1::2]


def parse_tenant_name(name: str) -> str:
    """`tenants/{tenant}` -> tenant."""
    (tenant,) = _split_name(name, ("tenants",), "tenants/{tenant}")
    return check_tenant_id(tenant)


def parse_index_name(name: str) -> tuple[str, str]:
    """`tenants/{tenant}/indexes/{index}` -> (tenant, index)."""
    tenant, index = _split_name(name, ("tenants", "indexes"), "tenants/{tenant}/indexes/{index}")
    return check_tenant_id(tenant), check_index_id(index)


def parse_manifest_name(name: str) -> tuple[str, str, str]:
    """`tenants/{tenant}/indexes/{index}/manifests/{manifest}` -> (tenant, index, manifest_id)."""
    tenant, index, manifest_id = _split_name(
        name, ("tenants", "indexes", "manifests"), "tenants/{tenant}/indexes/{index}/manifests/{manifest}"
    )
    return check_tenant_id(tenant), check_index_id(index), check_manifest_id(manifest_id)


# --- manifests ---------------------------------------------------------------------------


class ManifestInput(NamedTuple):
    """An input document of a build."""

    document_id: str
    content_sha256: str
    chunks: int


@dataclass(frozen=True, slots=True)
class ManifestCounts:
    documents: int
    chunks: int
    duplicate_chunks: int
    tokens: int


def inputs_sha256(inputs: Iterable[Sequence[Any]]) -> str:
    """sha256 (hex) over the sorted lines "document_id\\tcontent_sha256\\n" of (id, hash, ...) tuples."""
    digest = hashlib.sha256()
    for line in sorted(f"{item[0]}\t{item[1]}\n" for item in inputs):
        digest.update(line.encode())
    return digest.hexdigest()


def files_sha256(files: Mapping[str, str]) -> str:
    """sha256 (hex) over the sorted lines "relative/path\\tfile_sha256\\n" of a build's files."""
    digest = hashlib.sha256()
    for line in sorted(f"{path}\t{sha}\n" for path, sha in files.items()):
        digest.update(line.encode())
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class ManifestRecord:
    """A build's manifest as stored in its manifest.json; mirrors the proto Manifest.

    `parameters` holds every build setting (chunk_tokens, chunk_overlap, dense_kind, ...).
    `files` maps each file of the build (relative path) to its sha256; `files_sha256` and
    `inputs_sha256` are filled in by BuildWriter.commit(). Inputs are kept ordered by id.
    """

    tenant: str
    index: str
    manifest_id: str
    inputs: tuple[ManifestInput, ...]
    embedding_model: str
    embedding_model_sha256: str
    embedding_dimensions: int
    parameters: Mapping[str, Any]
    counts: ManifestCounts
    create_time: datetime
    build_seconds: float
    inputs_sha256: str = ""
    files_sha256: str = ""
    files: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_tenant_id(self.tenant)
        check_index_id(self.index)
        check_manifest_id(self.manifest_id)
        if self.create_time.tzinfo is None:
            raise ValueError("create_time must be timezone-aware")
        inputs = sorted((ManifestInput(*item) for item in self.inputs), key=lambda item: item.document_id)
        object.__setattr__(self, "inputs", tuple(inputs))
        object.__setattr__(self, "parameters", dict(self.parameters))
        object.__setattr__(self, "files", dict(sorted(self.files.items())))
        object.__setattr__(self, "create_time", self.create_time.astimezone(UTC))

    @property
    def name(self) -> str:
        return manifest_name(self.tenant, self.index, self.manifest_id)

    def to_json(self) -> str:
        data = {
            "format": 1,
            "name": self.name,
            "tenant": self.tenant,
            "index": self.index,
            "manifest_id": self.manifest_id,
            "inputs": [i._asdict() for i in self.inputs],
            "inputs_sha256": self.inputs_sha256,
            "embedding_model": self.embedding_model,
            "embedding_model_sha256": self.embedding_model_sha256,
            "embedding_dimensions": self.embedding_dimensions,
            "parameters": dict(self.parameters),
            "counts": asdict(self.counts),
            "create_time": self.create_time.isoformat(),
            "build_seconds": self.build_seconds,
            "files_sha256": self.files_sha256,
            "files": dict(self.files),
        }
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> ManifestRecord:
        """Parses to_json() output; ValueError if it is malformed."""
        try:
            data = json.loads(text)
            return cls(
                tenant=data["tenant"],
                index=data["index"],
                manifest_id=data["manifest_id"],
                inputs=tuple(
                    ManifestInput(str(i["document_id"]), str(i["content_sha256"]), int(i["chunks"]))
                    for i in data["inputs"]
                ),
                inputs_sha256=str(data["inputs_sha256"]),
                embedding_model=str(data["embedding_model"]),
                embedding_model_sha256=str(data["embedding_model_sha256"]),
                embedding_dimensions=int(data["embedding_dimensions"]),
                parameters=dict(data["parameters"]),
                counts=ManifestCounts(**{k: int(v) for k, v in data["counts"].items()}),
                create_time=datetime.fromisoformat(data["create_time"]),
                build_seconds=float(data["build_seconds"]),
                files_sha256=str(data["files_sha256"]),
                files={str(k): str(v) for k, v in data["files"].items()},
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed manifest: {exc!r}") from exc


# --- file helpers ------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(path: Path) -> None:
    """mkdir -p, fsyncing the parent of every folder it creates."""
    missing: list[Path] = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        _fsync_dir(folder.parent)


def _write_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Writes `data` to a temporary file beside `path` and renames it over `path`.

    `durable` fsyncs the file before the rename and the folder after it.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{_TMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def _append_line(path: Path, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_tree(root: Path, *, fsync: bool) -> dict[str, str]:
    """sha256 of every file under `root` except the top-level manifest.json, by relative path.

    With `fsync`, also fsyncs every file and folder. ValueError on anything but plain files and folders.
    """
    files: dict[str, str] = {}
    folders: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        folders.append(dirpath)
        for name in dirnames:
            if os.path.islink(os.path.join(dirpath, name)):
                raise ValueError(f"{os.path.relpath(os.path.join(dirpath, name), root)}: a symlink")
        for name in filenames:
            path = os.path.join(dirpath, name)
            rel = Path(os.path.relpath(path, root)).as_posix()
            if rel == MANIFEST_FILE:
                continue
            if os.path.islink(path) or not os.path.isfile(path):
                raise ValueError(f"{rel}: not a regular file")
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
                if fsync:
                    os.fsync(f.fileno())
            files[rel] = digest.hexdigest()
    if fsync:
        for folder in reversed(folders):
            _fsync_dir(Path(folder))
    return dict(sorted(files.items()))


def _describe_difference(expected: Mapping[str, str], actual: Mapping[str, str]) -> str:
    def first(names: list[str]) -> str:
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")

    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    changed = sorted(p for p in set(expected) & set(actual) if expected[p] != actual[p])
    parts = [
        f"{label}: {first(names)}"
        for label, names in (("changed", changed), ("missing", missing), ("unexpected", extra))
        if names
    ]
    return "; ".join(parts)


@contextmanager
def _flock(path: Path) -> Iterator[None]:
    """Holds an exclusive flock on `path` (created if absent), waiting for it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _try_flock(path: Path) -> IO[bytes] | None:
    """An open file holding an exclusive flock on `path`, or None if another holder has it.

    The lock belongs to this open file: closing it (or the process dying) releases it.
    """
    f = open(path, "ab")  # returned open: the caller closes it to release the lock
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    except BaseException:
        f.close()
        raise
    return f


# --- documents on disk -------------------------------------------------------------------


def _document_bytes(doc: Document) -> bytes:
    data = {  # document_id and content_sha256 first: see _DOC_PREFIX
        "document_id": doc.document_id,
        "content_sha256": doc.content_sha256,
        "filename": doc.filename,
        "title": doc.title,
        "media_type": MediaType(doc.media_type).value,
        "metadata": dict(doc.metadata),
        "sections": [{"headings": list(s.headings), "start": s.start, "end": s.end} for s in doc.sections],
        "text": doc.text,
    }
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def _parse_document(raw: bytes) -> Document:
    data = json.loads(raw)
    return Document(
        document_id=data["document_id"],
        filename=data["filename"],
        title=data["title"],
        text=data["text"],
        sections=tuple(Section(tuple(s["headings"]), int(s["start"]), int(s["end"])) for s in data["sections"]),
        media_type=MediaType(data["media_type"]),
        content_sha256=data["content_sha256"],
        metadata=dict(data["metadata"]),
    )


def _sha_of(raw_prefix: bytes, path: str) -> str | None:
    """A stored document's content hash, from its first bytes (whole file parsed as a fallback)."""
    match = _DOC_PREFIX.match(raw_prefix)
    if match is not None:
        return match.group(2).decode()
    try:
        with open(path, "rb") as f:
            sha = json.loads(f.read()).get("content_sha256")
    except (OSError, ValueError):
        return None
    return sha if isinstance(sha, str) and SHA256_HEX.fullmatch(sha) else None


_StatKey = tuple[int, int, int]


def _stat_key(st: os.stat_result) -> _StatKey:
    return (st.st_ino, st.st_mtime_ns, st.st_size)


@dataclass(frozen=True, slots=True)
class _IndexPaths:
    root: Path

    @property
    def corpus(self) -> Path:
        return self.root / "corpus"

    @property
    def hashes(self) -> Path:
        return self.root / "corpus-hashes"

    @property
    def builds(self) -> Path:
        return self.root / "builds"

    @property
    def current(self) -> Path:
        return self.root / "CURRENT"

    @property
    def history(self) -> Path:
        return self.root / "history.jsonl"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def current_lock(self) -> Path:
        return self.root / ".current.lock"

    @property
    def corpus_lock(self) -> Path:
        return self.root / ".corpus.lock"

    def document(self, document_id: str) -> Path:
        return self.corpus / f"{document_id}.json"


# --- builds ------------------------------------------------------------------------------


class BuildWriter:
    """A build being written into `path` (a partial folder no reader sees) under the index's build lock.

    Write the build's files into `path`, then commit() a ManifestRecord (tenant, index and
    manifest_id must be this writer's); commit makes the build current. As a context manager,
    leaving the block without a commit (an exception, or just no commit) aborts.
    """

    def __init__(
        self,
        store: IndexStore,
        tenant: str,
        index: str,
        manifest_id: str,
        path: Path,
        lock: IO[bytes],
        *,
        actor: str,
        reason: str,
    ) -> None:
        self.tenant = tenant
        self.index = index
        self.manifest_id = manifest_id
        self.path = path
        self.actor = actor
        self.reason = reason
        self._store = store
        self._lock: IO[bytes] | None = lock
        self._state: Literal["open", "committed", "aborted"] = "open"

    @property
    def name(self) -> str:
        return manifest_name(self.tenant, self.index, self.manifest_id)

    def commit(self, record: ManifestRecord) -> ManifestRecord:
        """Seals the build and makes it current; returns the record with files and hashes filled in.

        ValueError if the record names another build, its inputs_sha256 (when set) does not match
        its inputs, or the folder holds a manifest.json or anything but files and folders. On any
        failure the build is aborted.
        """
        if self._state != "open":
            raise RuntimeError(f"build {self.name} is already {self._state}")
        try:
            final = self._store._commit(self, record)
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        self._release()
        return final

    def abort(self) -> None:
        """Removes the partial folder and releases the build lock; a no-op once committed or aborted."""
        if self._state != "open":
            return
        self._state = "aborted"
        try:
            shutil.rmtree(self.path, ignore_errors=True)
        finally:
            self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> BuildWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.abort()


# --- the store ---------------------------------------------------------------------------


class IndexStore:
    """Per-tenant corpora and versioned builds under `data_dir`; safe for several processes sharing it."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self._cache_lock = threading.Lock()
        # per index root: document id -> (stat key of its file, content sha256)
        self._hash_cache: dict[Path, dict[str, tuple[_StatKey, str]]] = {}
        # manifest.json path -> (stat key, parsed record); builds are immutable, the key catches tampering
        self._manifests: OrderedDict[Path, tuple[_StatKey, ManifestRecord]] = OrderedDict()

    # paths and existence

    def _paths(self, tenant: str, index: str) -> _IndexPaths:
        check_tenant_id(tenant)
        check_index_id(index)
        return _IndexPaths(self.data_dir / "tenants" / tenant / "indexes" / index)

    def _existing(self, tenant: str, index: str) -> _IndexPaths:
        paths = self._paths(tenant, index)
        if not self._exists(paths):
            raise IndexNotFound(index_name(tenant, index))
        return paths

    def _exists(self, paths: _IndexPaths) -> bool:
        return self._has_documents(paths) or bool(self._finished_ids(paths))

    @staticmethod
    def _has_documents(paths: _IndexPaths) -> bool:
        try:
            with os.scandir(paths.corpus) as entries:
                return any(e.name.endswith(".json") for e in entries)
        except FileNotFoundError:
            return False

    @staticmethod
    def _finished_ids(paths: _IndexPaths) -> list[str]:
        """Ids of finished builds (folders with a manifest.json), oldest first."""
        try:
            with os.scandir(paths.builds) as entries:
                names = [e.name for e in entries if MANIFEST_ID.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return []
        return sorted(n for n in names if (paths.builds / n / MANIFEST_FILE).is_file())

    def index_exists(self, tenant: str, index: str) -> bool:
        """True once the index has a corpus document or a build."""
        return self._exists(self._paths(tenant, index))

    def list_indexes(self, tenant: str) -> list[str]:
        """The tenant's index ids, sorted."""
        root = self.data_dir / "tenants" / check_tenant_id(tenant) / "indexes"
        try:
            with os.scandir(root) as entries:
                names = [e.name for e in entries if INDEX_ID.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return []
        return sorted(n for n in names if self._exists(_IndexPaths(root / n)))

    # corpus

    def put_document(self, tenant: str, index: str, doc: Document) -> tuple[IngestOutcome, str]:
        """Stores `doc` (creating the index) and returns ("ingested", its id).

        If a document of the index already has the same content_sha256, nothing is stored and
        ("duplicate", that document's id) is returned. The same id with other content replaces it.
        """
        paths = self._paths(tenant, index)
        check_document_id(doc.document_id)
        sha = _check("content_sha256", doc.content_sha256, SHA256_HEX)
        raw = _document_bytes(doc)
        _makedirs_durable(paths.corpus)
        _makedirs_durable(paths.hashes)
        with _flock(paths.corpus_lock):
            owner = self._hash_owner(paths, sha)
            if owner is not None:
                return "duplicate", owner
            previous = self._stored_sha(paths, doc.document_id)
            # hash entry first: a crash before the document lands leaves a stale entry, which
            # _hash_owner() ignores; the other order could leave a document no entry points to.
            # Not fsynced: losing it to a power cut only lets one later duplicate in (the build
            # still dedupes its chunks), and a torn entry reads as absent. Halves the fsyncs.
            _write_atomic(paths.hashes / sha, doc.document_id.encode(), durable=False)
            _write_atomic(paths.document(doc.document_id), raw)
            if previous is not None and previous != sha and self._hash_target(paths, previous) == doc.document_id:
                (paths.hashes / previous).unlink(missing_ok=True)
        return "ingested", doc.document_id

    @staticmethod
    def _hash_target(paths: _IndexPaths, sha: str) -> str | None:
        try:
            target = (paths.hashes / sha).read_bytes().decode("ascii", errors="replace")
        except FileNotFoundError:
            return None
        return target if DOCUMENT_ID.fullmatch(target) and target not in (".", "..") else None

    def _hash_owner(self, paths: _IndexPaths, sha: str) -> str | None:
        """Id of the stored document whose content hash is `sha` (entries left stale by a crash are ignored)."""
        target = self._hash_target(paths, sha)
        return target if target is not None and self._stored_sha(paths, target) == sha else None

    @staticmethod
    def _stored_sha(paths: _IndexPaths, document_id: str) -> str | None:
        path = str(paths.document(document_id))
        try:
            with open(path, "rb") as f:
                prefix = f.read(512)
        except FileNotFoundError:
            return None
        return _sha_of(prefix, path)

    @staticmethod
    def _document_ids(paths: _IndexPaths) -> list[str]:
        try:
            with os.scandir(paths.corpus) as entries:
                ids = [e.name[:-5] for e in entries if e.name.endswith(".json")]
        except FileNotFoundError:
            return []
        return sorted(i for i in ids if DOCUMENT_ID.fullmatch(i) and i not in (".", ".."))

    def documents(self, tenant: str, index: str) -> Iterator[Document]:
        """The corpus's documents, ordered by id (read one at a time)."""
        paths = self._existing(tenant, index)
        return self._read_documents(paths, self._document_ids(paths))

    @staticmethod
    def _read_documents(paths: _IndexPaths, ids: list[str]) -> Iterator[Document]:
        for document_id in ids:
            try:
                raw = paths.document(document_id).read_bytes()
            except FileNotFoundError:
                continue
            yield _parse_document(raw)

    def document_count(self, tenant: str, index: str) -> int:
        return len(self._document_ids(self._existing(tenant, index)))

    def corpus_inputs(self, tenant: str, index: str) -> list[tuple[str, str]]:
        """(document_id, content_sha256) of every corpus document, ordered by id.

        Hashes are cached per file version (inode, mtime, size), so a repeat call costs one stat
        per document plus a short read for each document written since.
        """
        paths = self._existing(tenant, index)
        with self._cache_lock:
            cache = self._hash_cache.get(paths.root, {})
        fresh: dict[str, tuple[_StatKey, str]] = {}
        with os.scandir(paths.corpus) as entries:
            for entry in entries:
                document_id = entry.name[:-5]
                if not entry.name.endswith(".json") or not DOCUMENT_ID.fullmatch(document_id):
                    continue
                try:
                    key = _stat_key(entry.stat(follow_symlinks=False))
                    hit = cache.get(document_id)
                    if hit is not None and hit[0] == key:
                        fresh[document_id] = hit
                        continue
                    with open(entry.path, "rb") as f:  # fstat + read of one inode: key and hash agree
                        key = _stat_key(os.fstat(f.fileno()))
                        prefix = f.read(512)
                except FileNotFoundError:
                    continue
                sha = _sha_of(prefix, entry.path)
                if sha is not None:
                    fresh[document_id] = (key, sha)
        with self._cache_lock:
            self._hash_cache[paths.root] = fresh
        return sorted((document_id, sha) for document_id, (_, sha) in fresh.items())

    # builds

    def begin_build(self, tenant: str, index: str, *, actor: str = "", reason: str = "") -> BuildWriter:
        """Takes the index's build lock and opens a new partial build.

        IndexNotFound, EmptyCorpus, or BuildInProgress when another build of the index (in any
        process) holds the lock. `actor` and `reason` go into the history line of the commit.
        """
        paths = self._existing(tenant, index)
        if not self._has_documents(paths):
            raise EmptyCorpus(index_name(tenant, index))
        lock = _try_flock(paths.lock)
        if lock is None:
            raise BuildInProgress(index_name(tenant, index))
        try:
            self._sweep(paths.builds, _PARTIAL)  # left by a crashed build: nobody else holds the lock
            manifest_id = self._next_manifest_id(paths)
            partial = paths.builds / f"{_PARTIAL}{manifest_id}"
            _makedirs_durable(partial)
        except BaseException:
            lock.close()
            raise
        return BuildWriter(self, tenant, index, manifest_id, partial, lock, actor=actor, reason=reason)

    def _next_manifest_id(self, paths: _IndexPaths) -> str:
        """A new id after every existing one (even if the clock went back), formatted from UTC now."""
        moment = datetime.now(UTC)
        latest: datetime | None = None
        for name in self._finished_ids(paths):
            try:
                taken = datetime.strptime(name, _ID_FORMAT).replace(tzinfo=UTC)
            except ValueError:
                continue
            latest = taken if latest is None or taken > latest else latest
        if latest is not None and moment <= latest:
            moment = latest + timedelta(microseconds=1)
        return moment.strftime(_ID_FORMAT)

    def _commit(self, writer: BuildWriter, record: ManifestRecord) -> ManifestRecord:
        if (record.tenant, record.index, record.manifest_id) != (writer.tenant, writer.index, writer.manifest_id):
            raise ValueError(f"record {record.name} does not belong to build {writer.name}")
        computed_inputs = inputs_sha256(record.inputs)
        if record.inputs_sha256 and record.inputs_sha256 != computed_inputs:
            raise ValueError(f"inputs_sha256 of {record.name} does not match its inputs")
        if (writer.path / MANIFEST_FILE).exists():
            raise ValueError(f"the builder wrote {MANIFEST_FILE} into {writer.name}; it is the store's")
        files = _hash_tree(writer.path, fsync=True)
        final = replace(record, inputs_sha256=computed_inputs, files=files, files_sha256=files_sha256(files))
        with open(writer.path / MANIFEST_FILE, "wb") as f:
            f.write(final.to_json().encode())
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(writer.path)
        paths = self._paths(writer.tenant, writer.index)
        with _flock(paths.current_lock):
            os.rename(writer.path, paths.builds / writer.manifest_id)
            _fsync_dir(paths.builds)
            previous = self._read_current(paths)[0]
            self._switch(paths, writer.manifest_id, previous, action="build", actor=writer.actor, reason=writer.reason)
        return final

    def _switch(
        self, paths: _IndexPaths, to: str, previous: str | None, *, action: str, actor: str, reason: str
    ) -> None:
        """Points CURRENT at `to` and records it; the caller holds the current lock."""
        _write_atomic(paths.current, f"{to}\n".encode())
        line = {
            "time": datetime.now(UTC).isoformat(),
            "actor": actor,
            "action": action,
            "from": previous,
            "to": to,
            "reason": reason,
        }
        _append_line(paths.history, json.dumps(line, ensure_ascii=False))

    @staticmethod
    def _sweep(folder: Path, prefix: str) -> list[Path]:
        try:
            with os.scandir(folder) as entries:
                doomed = [Path(e.path) for e in entries if e.name.startswith(prefix)]
        except FileNotFoundError:
            return []
        for path in doomed:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return doomed

    def cleanup_partials(self) -> list[Path]:
        """Removes what crashed writers left (partial builds, half-pruned builds, temporary files)
        in every index whose corresponding lock is free; returns the removed paths. Run at start-up."""
        removed: list[Path] = []
        try:
            with os.scandir(self.data_dir / "tenants") as entries:
                tenants = [e.name for e in entries if TENANT_ID.fullmatch(e.name)]
        except FileNotFoundError:
            return removed
        for tenant in sorted(tenants):
            root = self.data_dir / "tenants" / tenant / "indexes"
            try:
                with os.scandir(root) as entries:
                    indexes = [e.name for e in entries if INDEX_ID.fullmatch(e.name) and e.is_dir()]
            except FileNotFoundError:
                continue
            for index in sorted(indexes):
                paths = _IndexPaths(root / index)
                for lock_path, sweeps in (
                    (paths.lock, [(paths.builds, _PARTIAL)]),
                    (paths.current_lock, [(paths.builds, _DELETING), (paths.root, ".CURRENT.")]),
                    (paths.corpus_lock, [(paths.corpus, "."), (paths.hashes, ".")]),
                ):
                    lock = _try_flock(lock_path)
                    if lock is None:
                        continue
                    try:
                        for folder, prefix in sweeps:
                            removed += self._sweep_matching(folder, prefix)
                    finally:
                        lock.close()
        if removed:
            _log.info("removed %d leftovers of interrupted writes", len(removed))
        return removed

    def _sweep_matching(self, folder: Path, prefix: str) -> list[Path]:
        if prefix in (_PARTIAL, _DELETING):
            return self._sweep(folder, prefix)
        try:  # temporary files of _write_atomic: ".<name>.<hex>.tmp"
            with os.scandir(folder) as entries:
                doomed = [
                    Path(e.path)
                    for e in entries
                    if e.name.startswith(prefix) and e.name.endswith(_TMP_SUFFIX) and e.is_file(follow_symlinks=False)
                ]
        except FileNotFoundError:
            return []
        for path in doomed:
            path.unlink(missing_ok=True)
        return doomed

    # reading builds

    def _read_current(self, paths: _IndexPaths) -> tuple[str | None, int]:
        """(CURRENT's manifest id, its st_mtime_ns), read from one open file; (None, 0) without one."""
        try:
            with open(paths.current, "rb") as f:
                mtime = os.fstat(f.fileno()).st_mtime_ns
                content = f.read(256).decode("ascii", errors="replace").strip()
        except FileNotFoundError:
            return None, 0
        if MANIFEST_ID.fullmatch(content) is None:
            raise BuildCorrupted(f"{paths.root.relative_to(self.data_dir).as_posix()}/CURRENT", f"holds {content!r}")
        return content, mtime

    def current(self, tenant: str, index: str) -> str | None:
        """The current manifest id, or None before the first build."""
        return self.current_version(tenant, index)[0]

    def current_version(self, tenant: str, index: str) -> tuple[str | None, int]:
        """(current manifest id, CURRENT's st_mtime_ns) from one read; cheap enough to call per search.

        Builds are immutable, so an unchanged id means an unchanged build.
        """
        paths = self._paths(tenant, index)
        version = self._read_current(paths)
        if version[0] is None and not self._exists(paths):
            raise IndexNotFound(index_name(tenant, index))
        return version

    def build_path(self, tenant: str, index: str, manifest_id: str) -> Path:
        """Folder of a finished build; ManifestNotFound if there is none."""
        paths = self._existing(tenant, index)
        folder = paths.builds / check_manifest_id(manifest_id)
        if not (folder / MANIFEST_FILE).is_file():
            raise ManifestNotFound(manifest_name(tenant, index, manifest_id))
        return folder

    def read_manifest(self, tenant: str, index: str, manifest_id: str) -> ManifestRecord:
        """A finished build's manifest. ManifestNotFound if absent; BuildCorrupted if unreadable."""
        paths = self._existing(tenant, index)
        name = manifest_name(tenant, index, manifest_id)
        path = paths.builds / manifest_id / MANIFEST_FILE
        try:
            with open(path, "rb") as f:
                key = _stat_key(os.fstat(f.fileno()))
                with self._cache_lock:
                    hit = self._manifests.get(path)
                if hit is not None and hit[0] == key:
                    return hit[1]
                raw = f.read()
        except (FileNotFoundError, NotADirectoryError):
            raise ManifestNotFound(name) from None
        try:
            record = ManifestRecord.from_json(raw)
        except ValueError as exc:
            raise BuildCorrupted(name, f"{MANIFEST_FILE} is unreadable ({exc})") from exc
        if record.name != name:
            raise BuildCorrupted(name, f"{MANIFEST_FILE} describes {record.name}")
        with self._cache_lock:
            self._manifests[path] = (key, record)
            self._manifests.move_to_end(path)
            while len(self._manifests) > _MANIFEST_CACHE_SIZE:
                self._manifests.popitem(last=False)
        return record

    def list_manifests(self, tenant: str, index: str) -> list[ManifestRecord]:
        """Manifests of the finished builds, newest first (a build with an unreadable manifest is skipped)."""
        paths = self._existing(tenant, index)
        records: list[ManifestRecord] = []
        for manifest_id in reversed(self._finished_ids(paths)):
            try:
                records.append(self.read_manifest(tenant, index, manifest_id))
            except ManifestNotFound:
                continue  # pruned meanwhile
            except BuildCorrupted as exc:
                _log.warning("skipping build: %s", exc.message)
        return records

    def verify_build(self, tenant: str, index: str, manifest_id: str) -> ManifestRecord:
        """Rehashes a build's files against its manifest; BuildCorrupted naming what differs."""
        record = self.read_manifest(tenant, index, manifest_id)
        name = record.name
        if files_sha256(record.files) != record.files_sha256:
            raise BuildCorrupted(name, "its manifest's file list does not match files_sha256")
        try:
            files = _hash_tree(self.build_path(tenant, index, manifest_id), fsync=False)
        except (ValueError, OSError) as exc:
            raise BuildCorrupted(name, str(exc)) from exc
        if files_sha256(files) != record.files_sha256:
            raise BuildCorrupted(name, _describe_difference(record.files, files) or "files_sha256 differs")
        return record

    # switching, history, pruning

    def pin(self, tenant: str, index: str, manifest_id: str, *, actor: str, reason: str) -> str | None:
        """Makes a finished build current; returns the previous current id.

        ManifestNotFound (CURRENT unchanged) if there is no such build.
        """
        paths = self._existing(tenant, index)
        check_manifest_id(manifest_id)
        with _flock(paths.current_lock):
            if not (paths.builds / manifest_id / MANIFEST_FILE).is_file():
                raise ManifestNotFound(manifest_name(tenant, index, manifest_id))
            previous = self._read_current(paths)[0]
            self._switch(paths, manifest_id, previous, action="pin", actor=actor, reason=reason)
        return previous

    def history(self, tenant: str, index: str) -> list[dict[str, Any]]:
        """History lines, oldest first: time, actor, action ("build" or "pin"), from, to, reason."""
        paths = self._existing(tenant, index)
        try:
            lines = paths.history.read_text().splitlines()
        except FileNotFoundError:
            return []
        out: list[dict[str, Any]] = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:  # a line torn by a crash mid-append
                continue
        return out

    def prune(self, tenant: str, index: str, keep: int) -> list[str]:
        """Removes the oldest finished builds beyond the newest `keep` (>= 1), never the current one.

        Returns the removed manifest ids. A pruned folder is first renamed out of sight, then deleted.
        """
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        paths = self._existing(tenant, index)
        with _flock(paths.current_lock):
            current = self._read_current(paths)[0]
            finished = self._finished_ids(paths)
            doomed = [m for m in finished[: max(len(finished) - keep, 0)] if m != current]
            for manifest_id in doomed:
                os.rename(paths.builds / manifest_id, paths.builds / f"{_DELETING}{manifest_id}")
            if doomed:
                _fsync_dir(paths.builds)
        for manifest_id in doomed:
            shutil.rmtree(paths.builds / f"{_DELETING}{manifest_id}", ignore_errors=True)
        return doomed
