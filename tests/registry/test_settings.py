"""RegistrySettings: the shipped YAML per environment, the database URL and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.settings import ENVIRONMENTS, SettingsError, load_settings, service_config_dir
from services.registry.settings import RegistrySettings

CONFIG = service_config_dir("registry")


@pytest.mark.parametrize("environment", ENVIRONMENTS)
def test_shipped_yaml_loads_for_every_environment(environment):
    settings = load_settings(RegistrySettings, config_dir=CONFIG, environ={"APP_ENV": environment})
    assert settings.port == 50052 and settings.database_url is None
    assert settings.trust_forwarded_identity is (environment != "dev")  # behind a sidecar outside dev
    assert settings.metrics_port == (9152 if environment == "dev" else 9090)


def test_default_database_is_sqlite_in_data_dir(tmp_path):
    settings = load_settings(
        RegistrySettings, config_dir=CONFIG, environ={"SERVEMESH_REGISTRY_DATA_DIR": str(tmp_path)}
    )
    assert settings.resolved_database_url() == f"sqlite+pysqlite:///{tmp_path / 'registry.db'}"
    assert RegistrySettings().data_dir == Path.home() / ".local" / "share" / "servemesh" / "registry"


def test_database_url_from_the_environment_is_a_secret():
    url = "postgresql+psycopg://registry:s3cret@db:5432/registry"
    settings = load_settings(RegistrySettings, config_dir=CONFIG, environ={"SERVEMESH_REGISTRY_DATABASE_URL": url})
    assert settings.resolved_database_url() == url
    assert "s3cret" not in repr(settings)


@pytest.mark.parametrize(
    ("url", "problem"),
    [("mysql://u:p@h/db", "not supported"), ("not a url", "not a database URL")],
)
def test_bad_database_url_names_the_key_and_hides_the_value(url, problem):
    with pytest.raises(SettingsError) as err:
        load_settings(RegistrySettings, config_dir=CONFIG, environ={"SERVEMESH_REGISTRY_DATABASE_URL": url})
    message = str(err.value)
    assert "database_url" in message and "SERVEMESH_REGISTRY_DATABASE_URL" in message and problem in message
    assert "u:p" not in message
