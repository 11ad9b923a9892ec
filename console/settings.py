"""Settings of the console: where it listens, whom it lets in, where the mesh is."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings

CONFIG_DIR = Path(__file__).resolve().parent / "config"


class ConsoleSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="SERVEMESH_CONSOLE_", env_nested_delimiter="__", extra="forbid", frozen=True
    )
    service_name: ClassVar[str] = "console"

    #: the console's HTTP port (loopback by default: on-call reaches it through an SSH tunnel or an
    #: ingress with TLS; it never serves plaintext beyond this machine unless told to)
    port: int = Field(8090, ge=0, le=65535)
    #: a `servemesh up` data directory: the mesh's addresses and certificates (run/mesh.json)
    home: Path
    #: console users: name, role (viewer | operator) and an argon2 hash each (`servemesh console
    #: user add`); re-read when it changes; None: <home>/console/users.yaml
    users_file: Path | None = None
    #: a signed-in session ends this long after sign-in, seconds
    session_ttl_s: float = Field(8 * 3600, gt=0, le=7 * 24 * 3600)
    #: failed sign-ins of one user name in a row before it must wait `lockout_s`
    max_failed_logins: int = Field(5, ge=1, le=100)
    lockout_s: float = Field(60.0, gt=0, le=3600)
    #: how often pages refresh and history is sampled, seconds
    refresh_s: float = Field(2.0, ge=0.5, le=60)
    #: how much history the charts keep, seconds
    history_s: float = Field(3600.0, ge=60, le=24 * 3600)
    #: the secret that signs session cookies (a 0600 file, made on first start);
    #: None: <home>/secrets/console-session-key
    session_key_file: Path | None = None

    @property
    def users_path(self) -> Path:
        return self.users_file or self.home / "console" / "users.yaml"

    @property
    def session_key_path(self) -> Path:
        return self.session_key_file or self.home / "secrets" / "console-session-key"
