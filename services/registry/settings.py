"""Settings of the registry service."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from services.common.settings import ServiceSettings

DATABASE_FILE = "registry.db"
BACKENDS = ("sqlite", "postgresql")


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "servemesh" / "registry"


class RegistrySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SERVEMESH_REGISTRY_", env_nested_delimiter="__", extra="forbid")
    service_name: ClassVar[str] = "registry"

    port: int = Field(50052, ge=0, le=65535)
    #: folder of the default SQLite database (<data_dir>/registry.db); created if missing
    data_dir: Path = Field(default_factory=_default_data_dir)
    #: SQLAlchemy URL of the database, e.g. postgresql+psycopg://registry:pw@db:5432/registry;
    #: unset means the SQLite file in data_dir
    database_url: SecretStr | None = None
    #: mesh mode: the caller's identity is the URI of the last element of x-forwarded-client-cert,
    #: which the sidecar sets; off (--no-mesh), every caller is "anonymous" plus its address
    trust_forwarded_identity: bool = False
    #: SQLite only: how long a writer waits for another one's lock before failing, in seconds
    sqlite_busy_timeout_s: float = Field(5.0, gt=0, le=60)
    #: key of the HMAC-SHA256 the registry stores instead of each API key's secret; kept out of the
    #: database (in production from SERVEMESH_REGISTRY_API_KEY_PEPPER, a secret). Unset means an
    #: empty key. Changing it invalidates every existing API key.
    api_key_pepper: SecretStr | None = Field(None, min_length=16)

    @field_validator("database_url")
    @classmethod
    def _known_backend(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        try:
            backend = make_url(value.get_secret_value()).get_backend_name()
        except ArgumentError:
            raise ValueError("not a database URL (e.g. postgresql+psycopg://user:pw@host:5432/db)") from None
        if backend not in BACKENDS:
            raise ValueError(f"database {backend!r} is not supported; use one of {', '.join(BACKENDS)}")
        return value

    def pepper(self) -> bytes:
        return b"" if self.api_key_pepper is None else self.api_key_pepper.get_secret_value().encode()

    def resolved_database_url(self) -> str:
        """database_url, or the SQLite file in data_dir."""
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return f"sqlite+pysqlite:///{self.data_dir / DATABASE_FILE}"
