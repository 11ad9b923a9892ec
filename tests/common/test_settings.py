"""ServiceSettings: YAML per APP_ENV < environment variables < kwargs, and readable errors."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
from pydantic import BaseModel, Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings, SettingsError, load_settings, service_config_dir


class EngineSettings(BaseModel):
    max_batch: int = Field(default=8, ge=1, le=256)


class InferenceSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SERVEMESH_INFERENCE_", env_nested_delimiter="__")
    service_name: ClassVar[str] = "inference"

    engine: EngineSettings = EngineSettings()


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    (tmp_path / "dev.yaml").write_text("port: 7001\nlog_level: DEBUG\n")
    (tmp_path / "prod.yaml").write_text("port: 9001\nmetrics_port: 9090\nengine:\n  max_batch: 64\n")
    return tmp_path


def test_yaml_is_chosen_by_app_env(config_dir):
    dev = load_settings(InferenceSettings, config_dir=config_dir, environ={})
    prod = load_settings(InferenceSettings, config_dir=config_dir, environ={"APP_ENV": "prod"})
    assert (dev.environment, dev.port, dev.log_level, dev.metrics_port) == ("dev", 7001, "DEBUG", None)
    assert (prod.environment, prod.port, prod.metrics_port, prod.engine.max_batch) == ("prod", 9001, 9090, 64)
    assert prod.log_level == "INFO"  # default, not in prod.yaml


def test_missing_yaml_means_defaults(config_dir):
    staging = load_settings(InferenceSettings, config_dir=config_dir, environ={"APP_ENV": "staging"})
    assert (staging.environment, staging.port, staging.grace_period_s) == ("staging", 0, 10.0)


def test_env_overrides_yaml_and_kwargs_override_env(config_dir):
    environ = {
        "APP_ENV": "prod",
        "SERVEMESH_INFERENCE_PORT": "9500",
        "SERVEMESH_INFERENCE_ENGINE__MAX_BATCH": "32",
        "SERVEMESH_GATEWAY_PORT": "1",  # another service's prefix: ignored
    }
    from_env = load_settings(InferenceSettings, config_dir=config_dir, environ=environ)
    assert (from_env.port, from_env.engine.max_batch, from_env.metrics_port) == (9500, 32, 9090)
    from_kwargs = load_settings(InferenceSettings, config_dir=config_dir, environ=environ, port=9600)
    assert (from_kwargs.port, from_kwargs.engine.max_batch) == (9600, 32)


def test_reads_os_environ_only_when_environ_not_given(config_dir, monkeypatch):
    monkeypatch.setenv("APP_ENV", "prod")
    monkeypatch.setenv("SERVEMESH_INFERENCE_PORT", "9700")
    assert load_settings(InferenceSettings, config_dir=config_dir).port == 9700
    injected = load_settings(InferenceSettings, config_dir=config_dir, environ={})
    assert (injected.environment, injected.port) == ("dev", 7001)


def test_direct_construction_uses_only_kwargs(monkeypatch):
    monkeypatch.setenv("SERVEMESH_INFERENCE_PORT", "9700")
    assert InferenceSettings(host="0.0.0.0").port == 0


def test_out_of_range_value_names_key_env_var_and_limit(config_dir):
    with pytest.raises(SettingsError) as err:
        load_settings(InferenceSettings, config_dir=config_dir, environ={"SERVEMESH_INFERENCE_PORT": "70000"})
    assert str(err.value) == (
        "inference settings invalid: port=70000: must be <= 65535 (key 'port', env SERVEMESH_INFERENCE_PORT)"
    )


def test_every_bad_key_is_reported(config_dir):
    (config_dir / "dev.yaml").write_text("grace_period_s: 0\nlog_level: TRACE\nengine:\n  max_batch: 1000\n")
    with pytest.raises(SettingsError) as err:
        load_settings(InferenceSettings, config_dir=config_dir, environ={}, metrics_port=-1)
    message = str(err.value)
    assert "grace_period_s=0: must be > 0" in message and "env SERVEMESH_INFERENCE_GRACE_PERIOD_S" in message
    assert "log_level=TRACE: must be one of 'DEBUG', 'INFO', 'WARNING' or 'ERROR'" in message
    assert (
        "engine.max_batch=1000: must be <= 256 (key 'engine.max_batch', env SERVEMESH_INFERENCE_ENGINE__MAX_BATCH)"
        in message
    )
    assert "metrics_port=-1: must be >= 0 (key 'metrics_port', env SERVEMESH_INFERENCE_METRICS_PORT)" in message


def test_bad_app_env_is_named(config_dir):
    with pytest.raises(SettingsError, match=r"APP_ENV='production': must be one of dev, staging, prod"):
        load_settings(InferenceSettings, config_dir=config_dir, environ={"APP_ENV": "production"})


def test_environment_only_comes_from_app_env(config_dir):
    with pytest.raises(SettingsError, match="APP_ENV"):
        load_settings(InferenceSettings, config_dir=config_dir, environ={}, environment="prod")


def test_unknown_yaml_key_is_an_error(config_dir):
    (config_dir / "dev.yaml").write_text("port: 7001\nmax_tokens: 5\n")
    with pytest.raises(SettingsError, match=r"max_tokens: unknown key") as err:
        load_settings(InferenceSettings, config_dir=config_dir, environ={})
    assert "allowed keys: host, port" in str(err.value)


def test_malformed_yaml_is_a_settings_error(config_dir):
    (config_dir / "dev.yaml").write_text("port: [unclosed\n")
    with pytest.raises(SettingsError, match="dev.yaml"):
        load_settings(InferenceSettings, config_dir=config_dir, environ={})


def test_settings_are_immutable():
    settings = InferenceSettings()
    with pytest.raises(ValueError):
        settings.port = 1  # type: ignore[misc]


def test_service_config_dir_is_next_to_the_package():
    path = service_config_dir("inference")
    assert path.parts[-3:] == ("services", "inference", "config")
    assert (path.parent.parent / "common" / "settings.py").is_file()
