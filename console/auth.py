"""Console users: roles, argon2 password hashes in a YAML file, sign-in with lockout, sessions.

The users file holds hashes only (`servemesh console user add` writes it, 0600); it is re-read
when it changes, so adding or removing a user needs no restart. A sign-in of an unknown name
costs as much as a wrong password, so timing does not tell which names exist.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import yaml
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

NAME_RE = re.compile(r"[a-z][a-z0-9._-]{0,63}")
MIN_PASSWORD_CHARS = 12
MAX_PASSWORD_CHARS = 1024
_hasher = PasswordHasher()
#: verified against when the name is unknown, so that costs what a wrong password costs
_DUMMY_HASH = _hasher.hash("not a password of anyone")


class Role(StrEnum):
    VIEWER = "viewer"  # looks
    OPERATOR = "operator"  # looks and changes


@dataclass(frozen=True)
class User:
    name: str
    role: Role

    @property
    def can_change(self) -> bool:
        return self.role is Role.OPERATOR


class UsersFileError(ValueError):
    """The users file is malformed; the message names the entry and the field."""


def hash_password(password: str) -> str:
    if not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        raise ValueError(f"password: must be {MIN_PASSWORD_CHARS}-{MAX_PASSWORD_CHARS} characters; got {len(password)}")
    return _hasher.hash(password)


@dataclass(frozen=True)
class _Entry:
    user: User
    password_hash: str


def parse_users(text: str, source: str = "users file") -> dict[str, _Entry]:
    doc = yaml.safe_load(text) or {}
    if not isinstance(doc, dict) or not isinstance(doc.get("users", []), list):
        raise UsersFileError(f"{source}: expected a mapping with a list `users`")
    out: dict[str, _Entry] = {}
    for i, item in enumerate(doc.get("users") or []):
        where = f"{source}: users[{i}]"
        if not isinstance(item, dict):
            raise UsersFileError(f"{where}: expected a mapping with name, role and password_hash")
        name, role, hashed = item.get("name"), item.get("role"), item.get("password_hash")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise UsersFileError(f"{where}.name: must match {NAME_RE.pattern}; got {name!r}")
        if role not in {r.value for r in Role}:
            raise UsersFileError(f"{where}.role: must be viewer or operator; got {role!r}")
        if not isinstance(hashed, str) or not hashed.startswith("$argon2"):
            raise UsersFileError(f"{where}.password_hash: must be an argon2 hash (`servemesh console user add`)")
        if name in out:
            raise UsersFileError(f"{where}.name: {name!r} is listed twice")
        out[name] = _Entry(User(name, Role(role)), hashed)
    return out


def dump_users(entries: dict[str, _Entry]) -> str:
    users = [
        {"name": e.user.name, "role": e.user.role.value, "password_hash": e.password_hash}
        for e in sorted(entries.values(), key=lambda e: e.user.name)
    ]
    return (
        "# Console users (`servemesh console user add|remove`): argon2 hashes only, never passwords.\n"
        + yaml.safe_dump({"users": users}, sort_keys=False)
    )


def set_user(path: Path, name: str, role: Role, password: str) -> None:
    """Add a user or replace one's role and password in the users file (written 0600, atomically)."""
    if not NAME_RE.fullmatch(name):
        raise ValueError(f"name: must match {NAME_RE.pattern}; got {name!r}")
    entries = parse_users(path.read_text(), str(path)) if path.exists() else {}
    entries[name] = _Entry(User(name, role), hash_password(password))
    _write_private(path, dump_users(entries))


def remove_user(path: Path, name: str) -> bool:
    entries = parse_users(path.read_text(), str(path)) if path.exists() else {}
    if entries.pop(name, None) is None:
        return False
    _write_private(path, dump_users(entries))
    return True


def list_users(path: Path) -> list[User]:
    entries = parse_users(path.read_text(), str(path)) if path.exists() else {}
    return [e.user for e in sorted(entries.values(), key=lambda e: e.user.name)]


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class SignInError(Exception):
    """Why a sign-in failed, in words fit for the page (never which of name or password was wrong)."""


class Authenticator:
    """Checks names and passwords against the users file, with a lockout after repeated failures."""

    def __init__(self, path: Path, *, max_failed: int = 5, lockout_s: float = 60.0) -> None:
        self._path = path
        self._max_failed, self._lockout_s = max_failed, lockout_s
        self._entries: dict[str, _Entry] = {}
        self._stamp: tuple[int, int] | None = None
        self._failed: dict[str, tuple[int, float]] = {}  # name -> (failures in a row, time of the last)
        self._lock = threading.Lock()

    def _users(self) -> dict[str, _Entry]:
        try:
            st = self._path.stat()
        except FileNotFoundError:
            self._entries, self._stamp = {}, None
            return self._entries
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._entries, self._stamp = parse_users(self._path.read_text(), str(self._path)), stamp
        return self._entries

    def has_users(self) -> bool:
        return bool(self._users())

    def user(self, name: str) -> User | None:
        """The user as the file says now (a removed user or a changed role takes effect at once)."""
        entry = self._users().get(name)
        return entry.user if entry else None

    def sign_in(self, name: str, password: str, now: float | None = None) -> User:
        now = time.monotonic() if now is None else now
        name = name.strip()
        with self._lock:
            count, last = self._failed.get(name, (0, 0.0))
            if count >= self._max_failed and now - last < self._lockout_s:
                raise SignInError(f"too many failed sign-ins: try again in {self._lockout_s - (now - last):.0f} s")
        entry = self._users().get(name)
        ok = False
        try:
            ok = _hasher.verify(entry.password_hash if entry else _DUMMY_HASH, password[:MAX_PASSWORD_CHARS])
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            ok = False
        with self._lock:
            if not ok or entry is None:
                count, last = self._failed.get(name, (0, 0.0))
                count = 1 if now - last >= self._lockout_s else count + 1
                self._failed[name] = (count, now)
                raise SignInError("wrong user name or password")
            self._failed.pop(name, None)
        return entry.user
