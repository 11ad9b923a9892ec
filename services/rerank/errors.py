"""Domain errors of the rerank service.

Bad requests raise services.common.errors.InvalidArgument (mapped to INVALID_ARGUMENT with
BadRequest field violations by the common interceptor); this module holds what is specific here.
"""

from __future__ import annotations

from services.common.settings import SettingsError
from services.rerank.settings import ENV_PREFIX


class ScorerLoadError(SettingsError):
    """The configured scorer cannot be loaded at start (a missing or unloadable model folder...).

    The message names the setting, its value and its environment variable, like every other
    settings error, so `main()` can exit with it as is.
    """

    def __init__(self, key: str, value: object, reason: str) -> None:
        env = f"{ENV_PREFIX}{key}".upper()
        super().__init__(f"rerank settings invalid: {key}={value}: {reason} (key '{key}', env {env})")
        self.key = key
        self.reason = reason
