"""PII redaction: each type found only when it validates, typed and consistent placeholders."""

from __future__ import annotations

import pytest

from services.gateway.redaction import PiiType, Redaction, Redactor

R = Redactor()

FOUND = [
    ("mail jane.doe+x@example.co.uk today", PiiType.EMAIL, "jane.doe+x@example.co.uk"),
    ("card 4111 1111 1111 1111 please", PiiType.CARD, "4111 1111 1111 1111"),
    ("card 5500-0000-0000-0004.", PiiType.CARD, "5500-0000-0000-0004"),
    ("pay to DE89 3704 0044 0532 0130 00 now", PiiType.IBAN, "DE89 3704 0044 0532 0130 00"),
    ("iban GB82WEST12345698765432", PiiType.IBAN, "GB82WEST12345698765432"),
    ("ssn 536-90-4399 on file", PiiType.NATIONAL_ID, "536-90-4399"),
    ("dni 12345678Z here", PiiType.NATIONAL_ID, "12345678Z"),
    ("cf RSSMRA85T10A562S here", PiiType.NATIONAL_ID, "RSSMRA85T10A562S"),
    ("from 192.168.10.20 and", PiiType.IP, "192.168.10.20"),
    ("v6 2001:db8::8a2e:370:7334 ok", PiiType.IP, "2001:db8::8a2e:370:7334"),
    ("call +44 20 7946 0958 soon", PiiType.PHONE, "+44 20 7946 0958"),
    ("call (415) 555-2671 soon", PiiType.PHONE, "(415) 555-2671"),
    ("key sk-proj-abcdefghijklmnopqrstuvwx123 x", PiiType.SECRET, "sk-proj-abcdefghijklmnopqrstuvwx123"),
    ("aws AKIAIOSFODNN7EXAMPLE x", PiiType.SECRET, "AKIAIOSFODNN7EXAMPLE"),
    ("token 9fQ2xLr7ZpA1bT6vKc3WmN8yHd4sJe0G here", PiiType.SECRET, "9fQ2xLr7ZpA1bT6vKc3WmN8yHd4sJe0G"),
]


@pytest.mark.parametrize(("text", "kind", "value"), FOUND)
def test_finds_each_type(text: str, kind: PiiType, value: str) -> None:
    spans = R.find(text)
    assert [(s.type, text[s.start : s.end]) for s in spans] == [(kind, value)]


NOT_PII = [
    "card 4111 1111 1111 1112 fails Luhn",
    "iban DE89 3704 0044 0532 0130 01 has bad check digits",
    "ssn 000-12-3456 is never issued",
    "dni 12345678A has the wrong letter",
    "version 1.2.3 and 300.1.1.1 are not addresses",
    "the number 12345 and the year 2026",
    "a long but plain identifier this_is_a_perfectly_ordinary_identifier_name",
    "an email-like thing user@localhost without a domain",
]


@pytest.mark.parametrize("text", NOT_PII)
def test_leaves_look_alikes_alone(text: str) -> None:
    assert R.find(text) == []


def test_placeholders_are_typed_numbered_and_consistent_across_texts() -> None:
    red = Redaction(R)
    first = red("a@example.com wrote to b@example.com")
    second = red("reply to a@example.com, card 4111111111111111")
    assert first == "[EMAIL_1] wrote to [EMAIL_2]"
    assert second == "reply to [EMAIL_1], card [CARD_1]"
    assert red.counts == {PiiType.EMAIL: 3, PiiType.CARD: 1}


def test_only_configured_types_are_redacted() -> None:
    red = Redaction(Redactor(types=[PiiType.EMAIL]))
    assert red("a@example.com from 10.0.0.1") == "[EMAIL_1] from 10.0.0.1"


def test_overlapping_candidates_keep_the_earlier_longer_one() -> None:
    # digits of a card inside an IBAN-looking run, an IP inside a URL-ish token: one placeholder each
    text = "GB82WEST12345698765432"
    assert [s.type for s in R.find(text)] == [PiiType.IBAN]
