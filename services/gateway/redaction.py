"""PII redaction: find personal data and secrets in text, replace each with a typed placeholder.

Candidates are found by pattern and kept only if they validate: card numbers must pass
Luhn, IBANs their check digits (python-stdnum), phone numbers libphonenumber's validity
rules, national ids (US SSN, Spanish DNI, Italian codice fiscale) their check digits, IP
addresses the ipaddress module. Secrets are recognised by well-known key formats or as
long, high-entropy tokens.

The same value gets the same placeholder within one request ("[EMAIL_1]" twice), so a
model can still tell two people apart, and nothing of the value survives.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import phonenumbers
from stdnum import iban, luhn
from stdnum.es import dni
from stdnum.it import codicefiscale
from stdnum.us import ssn


class PiiType(enum.StrEnum):
    EMAIL = "EMAIL"
    PHONE = "PHONE"
    CARD = "CARD"
    IBAN = "IBAN"
    NATIONAL_ID = "NATIONAL_ID"
    IP = "IP"
    SECRET = "SECRET"


@dataclass(frozen=True, order=True)
class Span:
    start: int
    end: int
    type: PiiType = field(compare=False)


_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*\.[A-Za-z]{2,24}\b")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_SSN = re.compile(r"\b\d{3}-\d{2}-\d{4}\b")
_DNI = re.compile(r"\b\d{8}-?[A-Z]\b")
_CODICE_FISCALE = re.compile(r"\b[A-Z]{6}\d{2}[A-Z]\d{2}[A-Z]\d{3}[A-Z]\b")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_KNOWN_SECRETS = re.compile(
    r"\b(?:"
    r"sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"  # OpenAI / Anthropic style
    r"|AKIA[0-9A-Z]{16}"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{36,}"  # GitHub tokens
    r"|xox[abprs]-[A-Za-z0-9-]{10,}"  # Slack tokens
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API keys
    r"|eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"  # JWTs
    r")"
)
_PHONE_CANDIDATE = re.compile(r"\+?\(?\d[\d ().\-/]{5,24}\d")
_TOKEN = re.compile(r"(?<![A-Za-z0-9_+/=-])[A-Za-z0-9_+/=-]{32,}(?![A-Za-z0-9_+/=-])")
#: bits per character above which a long token is treated as a secret; English words and
#: identifiers stay well below, random base64/hex keys above
SECRET_ENTROPY = 3.5


def _entropy(token: str) -> float:
    counts = Counter(token)
    return -sum(c / len(token) * math.log2(c / len(token)) for c in counts.values())


def _digits(s: str) -> str:
    return re.sub(r"\D", "", s)


def _valid_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
    except ValueError:
        return False
    return True


def _looks_secret(token: str) -> bool:
    classes = sum(bool(re.search(p, token)) for p in (r"[a-z]", r"[A-Z]", r"\d"))
    return classes >= 2 and _entropy(token) >= SECRET_ENTROPY


class Redactor:
    """Finds PII in text. `phone_regions` are the regions whose national phone formats count
    (numbers written with a leading + are recognised whatever the region)."""

    def __init__(self, types: Iterable[PiiType] = tuple(PiiType), phone_regions: Sequence[str] = ("US", "GB")) -> None:
        self.types = frozenset(types)
        self.phone_regions = tuple(phone_regions)

    def find(self, text: str) -> list[Span]:
        """Non-overlapping spans, in order; of two overlapping candidates the earlier, then longer, wins."""
        candidates = sorted(self._candidates(text), key=lambda s: (s.start, -(s.end - s.start)))
        out: list[Span] = []
        for span in candidates:
            if not out or span.start >= out[-1].end:
                out.append(span)
        return out

    def _candidates(self, text: str) -> Iterator[Span]:
        t = self.types
        if PiiType.SECRET in t:
            for m in _KNOWN_SECRETS.finditer(text):
                yield Span(m.start(), m.end(), PiiType.SECRET)
            for m in _TOKEN.finditer(text):
                if _looks_secret(m.group()):
                    yield Span(m.start(), m.end(), PiiType.SECRET)
        if PiiType.EMAIL in t:
            for m in _EMAIL.finditer(text):
                yield Span(m.start(), m.end(), PiiType.EMAIL)
        if PiiType.CARD in t:
            for m in _CARD.finditer(text):
                if luhn.is_valid(_digits(m.group())):
                    yield Span(m.start(), m.end(), PiiType.CARD)
        if PiiType.IBAN in t:
            for m in _IBAN.finditer(text):
                if iban.is_valid(m.group()):
                    yield Span(m.start(), m.end(), PiiType.IBAN)
        if PiiType.NATIONAL_ID in t:
            for m in _SSN.finditer(text):
                if ssn.is_valid(m.group()):
                    yield Span(m.start(), m.end(), PiiType.NATIONAL_ID)
            for pattern, module in ((_DNI, dni), (_CODICE_FISCALE, codicefiscale)):
                for m in pattern.finditer(text):
                    if module.is_valid(m.group()):
                        yield Span(m.start(), m.end(), PiiType.NATIONAL_ID)
        if PiiType.IP in t:
            for pattern in (_IPV4, _IPV6):
                for m in pattern.finditer(text):
                    if _valid_ip(m.group()):
                        yield Span(m.start(), m.end(), PiiType.IP)
        if PiiType.PHONE in t:
            # libphonenumber's matcher is thorough but slow (~0.7 ms per KB): run it only on
            # stretches that could hold a number (7+ digits with separators), with a little context
            seen: set[tuple[int, int]] = set()
            for cand in _PHONE_CANDIDATE.finditer(text):
                if sum(c.isdigit() for c in cand.group()) < 7:
                    continue
                lo, hi = max(0, cand.start() - 2), min(len(text), cand.end() + 2)
                for region in (None, *self.phone_regions):
                    matcher = phonenumbers.PhoneNumberMatcher(text[lo:hi], region, leniency=phonenumbers.Leniency.VALID)
                    for match in matcher:
                        span = (lo + match.start, lo + match.end)
                        if span not in seen:
                            seen.add(span)
                            yield Span(*span, PiiType.PHONE)


@dataclass
class Redaction:
    """Placeholders of one request: the same value keeps its placeholder across texts."""

    redactor: Redactor
    placeholders: dict[tuple[PiiType, str], str] = field(default_factory=dict)
    counts: Counter[PiiType] = field(default_factory=Counter)

    def __call__(self, text: str) -> str:
        spans = self.redactor.find(text)
        if not spans:
            return text
        parts, pos = [], 0
        for span in spans:
            value = text[span.start : span.end]
            key = (span.type, value)
            if key not in self.placeholders:
                n = sum(1 for t, _ in self.placeholders if t == span.type) + 1
                self.placeholders[key] = f"[{span.type.value}_{n}]"
            self.counts[span.type] += 1
            parts += [text[pos : span.start], self.placeholders[key]]
            pos = span.end
        parts.append(text[pos:])
        return "".join(parts)
