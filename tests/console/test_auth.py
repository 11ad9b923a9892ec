"""Console users: hashes only on disk, roles from the file as it is now, and the lockout."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from console.auth import (
    Authenticator,
    Role,
    SignInError,
    UsersFileError,
    list_users,
    parse_users,
    remove_user,
    set_user,
)


def test_the_users_file_holds_argon2_hashes_never_the_password_and_is_private(tmp_path: Path) -> None:
    path = tmp_path / "console" / "users.yaml"
    set_user(path, "olivia", Role.OPERATOR, "correct horse battery")
    text = path.read_text()
    assert "correct horse battery" not in text and "$argon2id$" in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [(u.name, u.role) for u in list_users(path)] == [("olivia", Role.OPERATOR)]


def test_short_passwords_and_bad_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="password: must be 12-1024 characters; got 5"):
        set_user(tmp_path / "u.yaml", "olivia", Role.OPERATOR, "short")
    with pytest.raises(ValueError, match="name: must match"):
        set_user(tmp_path / "u.yaml", "Olivia Smith", Role.OPERATOR, "long enough password")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("users: [{name: a, role: admin, password_hash: $argon2id$x}]", "users[0].role: must be viewer or operator"),
        (
            "users: [{name: a, role: viewer, password_hash: hunter2hunter2}]",
            "users[0].password_hash: must be an argon2",
        ),
        ("users: [{name: 'A B', role: viewer, password_hash: $argon2id$x}]", "users[0].name: must match"),
        (
            "users: [{name: a, role: viewer, password_hash: $argon2id$x},"
            " {name: a, role: viewer, password_hash: $argon2id$y}]",
            "users[1].name: 'a' is listed twice",
        ),
        ("users: 3", "expected a mapping with a list `users`"),
    ],
)
def test_a_malformed_users_file_names_the_entry_and_field(text: str, words: str) -> None:
    with pytest.raises(UsersFileError, match=words.replace("[", r"\[").replace("]", r"\]").replace("$", r"\$")):
        parse_users(text)


def test_sign_in_lockout_and_role_changes_take_effect_without_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "users.yaml"
    set_user(path, "olivia", Role.OPERATOR, "correct horse battery")
    auth = Authenticator(path, max_failed=3, lockout_s=60)
    assert auth.sign_in("olivia", "correct horse battery", now=0).role is Role.OPERATOR
    for t in range(3):
        with pytest.raises(SignInError, match="wrong user name or password"):
            auth.sign_in("olivia", "wrong", now=t)
    with pytest.raises(SignInError, match="too many failed sign-ins"):
        auth.sign_in("olivia", "correct horse battery", now=10)
    assert auth.sign_in("olivia", "correct horse battery", now=63).name == "olivia"  # the lockout has passed
    with pytest.raises(SignInError, match="wrong user name or password"):  # same words as a wrong password
        auth.sign_in("nobody", "correct horse battery", now=64)
    set_user(path, "olivia", Role.VIEWER, "correct horse battery")
    assert auth.user("olivia").role is Role.VIEWER  # type: ignore[union-attr]
    assert remove_user(path, "olivia") and auth.user("olivia") is None
