"""Domain errors of the retrieval service (mapped to gRPC status by services.common.interceptors)."""

from __future__ import annotations

from services.common.errors import Code, FailedPrecondition, NotFound, ServiceError


class BadFile(ServiceError):
    """One uploaded file cannot be ingested. Reported per file in IngestDocuments (the rest
    of the batch still ingests); `reason` says what is wrong, naming the limit if one was hit."""

    code = Code.INVALID_ARGUMENT

    def __init__(self, filename: str, reason: str) -> None:
        super().__init__(f"{filename}: {reason}", metadata={"filename": filename})
        self.filename = filename
        self.reason = reason


class IndexNotFound(NotFound):
    def __init__(self, name: str) -> None:
        super().__init__(f"{name} does not exist", metadata={"resource": name})


class ManifestNotFound(NotFound):
    def __init__(self, name: str) -> None:
        super().__init__(f"{name} does not exist", metadata={"resource": name})


class NoCurrentBuild(FailedPrecondition):
    def __init__(self, name: str) -> None:
        super().__init__(f"{name} has no build yet: run BuildIndex first", metadata={"resource": name})


class BuildInProgress(FailedPrecondition):
    def __init__(self, name: str) -> None:
        super().__init__(f"a build of {name} is already running", metadata={"resource": name})


class EmptyCorpus(FailedPrecondition):
    def __init__(self, name: str) -> None:
        super().__init__(f"{name} has no documents: ingest some first", metadata={"resource": name})


class BuildCorrupted(ServiceError):
    """A finished build's files no longer match its manifest (changed, missing or extra files,
    or an unreadable manifest.json). The build must not be served; pin another one."""

    code = Code.DATA_LOSS

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"{name} is corrupted: {detail}", metadata={"resource": name})
        self.detail = detail
