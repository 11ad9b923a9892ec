"""Who is calling: the sidecar-verified SPIFFE id of the immediate caller (mesh mode), plus the
signed-in user a console or CLI acts for. Used by services that record an actor for changes."""

from __future__ import annotations

import re
from collections.abc import Iterable

from services.common.errors import FieldViolation, InvalidArgument

XFCC_KEY = "x-forwarded-client-cert"
USER_KEY = "x-servemesh-user"
USER_RE = re.compile(r"[\x21-\x7e]([\x20-\x7e]{0,126}[\x21-\x7e])?")


def parse_xfcc(value: str) -> list[dict[str, str]]:
    """Elements of an x-forwarded-client-cert value, each as {key: value} (keys as sent).

    Elements are separated by ',', pairs by ';', key from value by '='; a value may be
    double-quoted (then it may hold , ; = and \\" escapes).
    """
    elements: list[dict[str, str]] = []
    element: dict[str, str] = {}
    key, buf, quoted, escaped, in_value = "", [], False, False, False
    for ch in value + ",":
        if quoted:
            if escaped:
                buf.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
            else:
                buf.append(ch)
        elif ch == '"' and in_value:
            quoted = True
        elif ch == "=" and not in_value:
            key, buf, in_value = "".join(buf).strip(), [], True
        elif ch in ";,":
            if in_value and key:
                element.setdefault(key, "".join(buf).strip())
            key, buf, in_value = "", [], False
            if ch == "," and element:
                elements.append(element)
                element = {}
        else:
            buf.append(ch)
    return elements


def caller_identity(
    metadata: Iterable[tuple[str, str | bytes]] | None, peer: str, *, trust_forwarded_identity: bool
) -> str:
    """The actor of a change: the sidecar-verified SPIFFE id (mesh mode) or "anonymous (peer)",
    plus " as <user>" when the caller acts for a signed-in user (x-servemesh-user).

    In mesh mode the sidecar appends the certificate it verified to x-forwarded-client-cert,
    so the URI of the *last* element is the immediate caller; earlier elements were added by
    hops further away (or forged by the caller) and are not trusted.
    """
    pairs = [(k.lower(), v.decode("utf-8", "replace") if isinstance(v, bytes) else v) for k, v in metadata or ()]
    who = ""
    if trust_forwarded_identity:
        xfcc = ",".join(v for k, v in pairs if k == XFCC_KEY)
        elements = parse_xfcc(xfcc) if xfcc else []
        who = elements[-1].get("URI", elements[-1].get("uri", "")) if elements else ""
    actor = who or f"anonymous ({peer or 'unknown peer'})"
    users = [v for k, v in pairs if k == USER_KEY]
    if users:
        user = users[-1]
        if not USER_RE.fullmatch(user):
            raise InvalidArgument(FieldViolation(USER_KEY, "must be 1-128 printable ASCII characters"))
        actor += f" as {user}"
    return actor
