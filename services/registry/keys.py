"""API key secrets: their format, and the hash the registry keeps instead of them.

A secret is `sm_<key_id>_<random>`:

- `sm_` marks it as a servemesh key (secret scanners and people can tell what leaked);
- `key_id` is the key's public id, 16 characters of a-z and 2-7 (80 random bits): the
  registry finds the key by it with one primary-key lookup, and it is safe to log and show;
- `random` is 32 bytes from `secrets`, URL-safe base64 without padding (43 characters):
  the part that makes it a secret.

Why a keyed fast hash and not argon2/bcrypt/scrypt: those slow hashes exist to make
guessing *low-entropy* secrets (passwords) expensive after a database leak. Our secrets
carry 256 random bits; no amount of hashing speed makes guessing them feasible, so a slow
hash adds nothing there. What it would cost is real: argon2id at the parameters recommended
for passwords (RFC 9106 / OWASP: 19-64 MiB of memory, several passes) takes tens of
milliseconds per verification, on every cache miss of every gateway, against a gateway
budget of about 2 ms per request, and it would turn key verification into an easy
CPU/memory denial of service. HMAC-SHA256 of a secret takes about 2.5 microseconds here.
It is keyed with a pepper from the registry's settings (kept outside the database), so a
leaked database alone does not even let anyone check a candidate secret offline; without
a pepper it is HMAC with an empty key, i.e. as strong as SHA-256 of a 256-bit random
secret, which is still not invertible. Changing the pepper invalidates every existing key.

Comparison is constant-time (hmac.compare_digest), and a secret whose key id is unknown
is still hashed and compared against a dummy, so timing does not tell a guesser whether
a key id exists (key ids are not secret anyway: the random part is).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

SECRET_PREFIX = "sm_"
KEY_ID_CHARS = 16
RANDOM_BYTES = 32
#: the whole secret; group 1 is the key id
SECRET_RE = re.compile(rf"{SECRET_PREFIX}([a-z2-7]{{{KEY_ID_CHARS}}})_([A-Za-z0-9_-]{{43}})")
KEY_ID_RE = re.compile(rf"[a-z2-7]{{{KEY_ID_CHARS}}}")
SECRET_LENGTH = len(SECRET_PREFIX) + KEY_ID_CHARS + 1 + 43
#: longer presented secrets are refused without hashing them
MAX_PRESENTED_SECRET = 256
#: compared against when the key id is unknown, so both paths do the same work
_DUMMY_HASH = "0" * 64


def new_key_id() -> str:
    """16 characters of a-z and 2-7 (RFC 4648 base32, lower case): 80 random bits."""
    return base64.b32encode(secrets.token_bytes(10)).decode().lower()


def new_secret(key_id: str) -> str:
    return f"{SECRET_PREFIX}{key_id}_{secrets.token_urlsafe(RANDOM_BYTES)}"


def secret_prefix(key_id: str) -> str:
    """The public start of a key's secret: what list output shows instead of the secret."""
    return f"{SECRET_PREFIX}{key_id}_"


def key_id_of(secret: str) -> str | None:
    """The key id a presented secret names, or None if it is not shaped like a secret."""
    if len(secret) > MAX_PRESENTED_SECRET:
        return None
    match = SECRET_RE.fullmatch(secret)
    return match.group(1) if match else None


class SecretHasher:
    """HMAC-SHA256 of a secret under the registry's pepper (see the module docstring)."""

    def __init__(self, pepper: bytes = b"") -> None:
        self._pepper = pepper

    def hash(self, secret: str) -> str:
        """64 hex characters."""
        return hmac.new(self._pepper, secret.encode(), hashlib.sha256).hexdigest()

    def matches(self, secret: str, stored_hash: str | None) -> bool:
        """Constant-time check of `secret` against a stored hash; None (unknown key) never matches
        but costs the same."""
        digest = self.hash(secret)
        same = hmac.compare_digest(digest, stored_hash if stored_hash is not None else _DUMMY_HASH)
        return same and stored_hash is not None
