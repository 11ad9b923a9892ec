"""Settings of the gateway's response cache (a section of the gateway settings)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


class CacheConfig(BaseModel):
    """Answers to deterministic requests (temperature 0 or a fixed seed), kept per tenant,
    model and exact input for `ttl_s`; services.gateway.cache.policy says what the key holds.

    The store is the in-process LRU unless `redis_url` is set. (There is no separate
    switch: a URL that is set is used, so a forgotten switch cannot silently keep each
    replica on its own cache; and a cross-field check would echo the URL, password and all,
    in the settings error.)"""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    #: entries the in-process store keeps (the least recently used goes first); its
    #: worst-case memory is about max_entries * max_entry_bytes
    max_entries: int = Field(2048, ge=1, le=1_000_000)
    #: seconds an answer is served from the cache after it was stored (both stores)
    ttl_s: int = Field(3600, ge=1, le=7 * 24 * 3600)
    #: a larger answer (as stored: UTF-8 JSON) is relayed to the client but not kept
    max_entry_bytes: int = Field(65_536, ge=1024, le=4 * 1024 * 1024)
    #: redis://[[user]:password@]host:port/db, rediss://... (TLS) or unix:///path; unset = in-process
    redis_url: SecretStr | None = None
    #: prefix of every Redis key; the rest of the key is a sha256 hex digest
    key_prefix: str = Field("servemesh:gateway:cache:", pattern=r"^[A-Za-z0-9:_.\-]{0,64}$")
    #: bound on each Redis connect and command, in seconds
    redis_timeout_s: float = Field(0.1, gt=0, le=5)
    #: after a Redis failure, seconds during which Redis is not asked (counted as "unavailable")
    redis_cooldown_s: float = Field(1.0, ge=0, le=300)
    #: cache only engines that report the sha256 of their model card, so new weights under an
    #: old model id can never get the old answers
    require_card_hash: bool = True
    #: how often the engines' model ids and card hashes are read again (EngineIdentities), in seconds
    identity_refresh_s: float = Field(10.0, gt=0, le=600)

    @property
    def store(self) -> Literal["memory", "redis"]:
        return "redis" if self.redis_url is not None else "memory"
