"""Typed service settings: per-environment YAML, then environment variables, then kwargs.

Each service subclasses ServiceSettings once::

    class InferenceSettings(ServiceSettings):
        model_config = SettingsConfigDict(env_prefix="SERVEMESH_INFERENCE_", env_nested_delimiter="__")
        service_name: ClassVar[str] = "inference"

and main() calls ``load_settings(InferenceSettings, config_dir=service_config_dir("inference"))``.
Constructing a settings class directly uses only its keyword arguments and defaults (no
YAML, no environment), which is what tests want.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import Field, SecretBytes, SecretStr, ValidationError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)
from pydantic_settings import SettingsError as _PydanticSettingsError
from pydantic_settings.sources.utils import parse_env_vars

ENVIRONMENTS: tuple[str, ...] = ("dev", "staging", "prod")
APP_ENV = "APP_ENV"


class SettingsError(Exception):
    """Settings could not be loaded; the message names every bad key and its env var."""


class ServiceSettings(BaseSettings):
    """Settings every service has. Subclasses add their own fields and env_prefix."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True, env_nested_delimiter="__")

    service_name: ClassVar[str] = "service"

    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535, description="gRPC port; 0 picks a free port.")
    #: listen on this Unix socket instead of host:port (behind a sidecar on one machine:
    #: only the mesh's user can connect, so nothing local skips the sidecar's mTLS and RBAC)
    unix_socket: Path | None = None
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="Prometheus HTTP port; None disables, 0 picks a free port."
    )
    grace_period_s: float = Field(default=10.0, gt=0, le=300, description="Drain time on shutdown.")
    otlp_endpoint: str | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    environment: Literal["dev", "staging", "prod"] = "dev"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """kwargs > environment > YAML inside load_settings(); kwargs only otherwise."""
        inputs = _load_inputs.get()
        if inputs is None:
            return (init_settings,)
        return (
            init_settings,
            _MappingEnvSource(settings_cls, inputs.environ),
            YamlConfigSettingsSource(settings_cls, yaml_file=inputs.yaml_file),
        )


S = TypeVar("S", bound=ServiceSettings)


@dataclass(frozen=True, slots=True)
class _LoadInputs:
    yaml_file: Path
    environ: Mapping[str, str]


# Set only for the duration of one load_settings() call, so the sources can be injected
# without reading os.environ at import time or mutating the class.
_load_inputs: ContextVar[_LoadInputs | None] = ContextVar("servemesh_settings_inputs", default=None)


class _MappingEnvSource(EnvSettingsSource):
    """EnvSettingsSource reading an injected mapping instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


def load_settings(
    cls: type[S],
    *,
    config_dir: Path,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> S:
    """Load `cls` for environ["APP_ENV"]: <config_dir>/<env>.yaml < env vars < overrides."""
    if "environment" in overrides:
        raise SettingsError(f"{cls.service_name} settings: environment comes from {APP_ENV}, not a keyword")
    env = dict(os.environ) if environ is None else dict(environ)
    environment = env.get(APP_ENV, "dev")
    if environment not in ENVIRONMENTS:
        raise SettingsError(
            f"{cls.service_name} settings invalid: {APP_ENV}={environment!r}: must be one of {', '.join(ENVIRONMENTS)}"
        )
    yaml_file = Path(config_dir) / f"{environment}.yaml"
    token = _load_inputs.set(_LoadInputs(yaml_file=yaml_file, environ=env))
    try:
        return cls(**{**overrides, "environment": environment})
    except ValidationError as exc:
        raise SettingsError(_format_validation_error(cls, exc)) from None
    except (_PydanticSettingsError, yaml.YAMLError) as exc:
        raise SettingsError(f"{cls.service_name} settings invalid ({yaml_file}): {exc}") from exc
    finally:
        _load_inputs.reset(token)


def service_config_dir(service: str) -> Path:
    """services/<service>/config: where dev.yaml, staging.yaml and prod.yaml live."""
    return Path(__file__).resolve().parent.parent / service / "config"


_CONSTRAINTS: dict[str, str] = {
    "less_than_equal": "must be <= {le}",
    "less_than": "must be < {lt}",
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "literal_error": "must be one of {expected}",
    "enum": "must be one of {expected}",
    "string_too_short": "must have at least {min_length} character(s)",
    "string_too_long": "must have at most {max_length} character(s)",
    "too_short": "must have at least {min_length} item(s)",
    "too_long": "must have at most {max_length} item(s)",
    "string_pattern_mismatch": "must match {pattern}",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_parsing": "must be a number",
    "bool_parsing": "must be a boolean",
    "missing": "is required",
}


def _format_validation_error(cls: type[ServiceSettings], exc: ValidationError) -> str:
    problems = [_describe_error(cls, error) for error in exc.errors(include_url=False)]
    return f"{cls.service_name} settings invalid: " + "; ".join(problems)


def _describe_error(cls: type[ServiceSettings], error: Any) -> str:
    path = [str(part) for part in error["loc"] if _is_key(part)]
    key = ".".join(path)
    if error["type"] == "extra_forbidden":
        allowed = ", ".join(cls.model_fields)
        return f"{key}: unknown key (key '{key}'; allowed keys: {allowed})"
    template = _CONSTRAINTS.get(error["type"])
    reason = template.format(**error.get("ctx", {})) if template else error["msg"]
    shown = "" if error["type"] == "missing" else f"={_show(cls, path, error.get('input'))}"
    return f"{key}{shown}: {reason} (key '{key}', env {_env_var_name(cls, path)})"


def _is_key(part: str | int) -> bool:
    """Drop pydantic's union-member labels such as 'int' or 'constrained-int' from a loc."""
    return isinstance(part, int) or (part.isidentifier() and part not in {"int", "float", "str", "bool"})


def _env_var_name(cls: type[ServiceSettings], path: list[str]) -> str:
    prefix = cls.model_config.get("env_prefix") or ""
    delimiter = cls.model_config.get("env_nested_delimiter") or ""
    parts = path if delimiter else path[:1]
    return (prefix + (delimiter or "").join(parts)).upper()


def _show(cls: type[ServiceSettings], path: list[str], value: Any) -> str:
    field = cls.model_fields.get(path[0]) if path else None
    if field is not None and any(t in repr(field.annotation) for t in (SecretStr.__name__, SecretBytes.__name__)):
        return "***"
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
