"""Parsing uploaded files into normalised text with sections, and refusing bad files by name."""

from __future__ import annotations

import io
import unicodedata

import pytest
from fpdf import FPDF
from pypdf import PdfWriter

from services.retrieval.errors import BadFile
from services.retrieval.ingest.parsers import guess_media_type, parse
from services.retrieval.models import MediaType, ParsedDocument

MiB = 2**20


def parsed(data: bytes | str, filename: str, media_type: MediaType | None = None) -> ParsedDocument:
    raw = data.encode() if isinstance(data, str) else data
    doc = parse(raw, filename, media_type, max_bytes=MiB)
    assert_well_formed(doc)
    return doc


def assert_well_formed(doc: ParsedDocument) -> None:
    """Normalised text; sections in order, non-overlapping, covering every non-whitespace character."""
    text = doc.text
    assert unicodedata.is_normalized("NFC", text)
    assert "\r" not in text and "\n\n\n" not in text
    assert all(line == line.rstrip() for line in text.split("\n"))
    assert text == text.strip("\n") and text.strip()
    covered = 0
    for section in doc.sections:
        assert covered <= section.start < section.end <= len(text)
        assert not text[covered : section.start].strip()
        covered = section.end
    assert not text[covered:].strip()


def section_texts(doc: ParsedDocument) -> list[tuple[tuple[str, ...], str]]:
    return [(s.headings, doc.text[s.start : s.end]) for s in doc.sections]


def make_pdf(pages: list[str], *, title: str | None = None) -> bytes:
    pdf = FPDF()
    if title is not None:
        pdf.set_title(title)
    pdf.set_font("helvetica", size=12)
    for page in pages:
        pdf.add_page()
        pdf.multi_cell(0, 10, page)
    return bytes(pdf.output())


# media types


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("notes.txt", MediaType.TEXT),
        ("NOTES.TEXT", MediaType.TEXT),
        ("readme.md", MediaType.MARKDOWN),
        ("dir/guide.markdown", MediaType.MARKDOWN),
        ("page.html", MediaType.HTML),
        ("page.HTM", MediaType.HTML),
        ("paper.pdf", MediaType.PDF),
    ],
)
def test_media_type_comes_from_the_extension(filename: str, expected: MediaType) -> None:
    assert guess_media_type(filename) is expected


@pytest.mark.parametrize("filename", ["sheet.xlsx", "Makefile", "archive.tar.gz"])
def test_an_unknown_extension_is_a_bad_file_naming_the_supported_ones(filename: str) -> None:
    with pytest.raises(BadFile) as caught:
        parse(b"hello", filename, None, max_bytes=MiB)
    assert caught.value.filename == filename
    assert filename in str(caught.value)
    for extension in (".txt", ".text", ".md", ".markdown", ".html", ".htm", ".pdf"):
        assert extension in caught.value.reason


# plain text


def test_text_is_normalised_and_is_one_section_titled_by_its_first_line() -> None:
    raw = "\ufeff\r\n   \r\n  Wing   theory  \r\nThe lift of a cafe\u0301.\t \r\n\r\n\r\n\r\n\r\nLast line\r\n\r\n"
    doc = parsed(raw, "notes.txt")
    assert doc.media_type is MediaType.TEXT
    assert doc.text == "  Wing   theory\nThe lift of a café.\n\nLast line"
    assert doc.title == "Wing theory"
    assert doc.sections == (doc.sections[0],) and doc.sections[0].headings == ()
    assert doc.text[doc.sections[0].start : doc.sections[0].end] == doc.text


def test_a_text_title_is_at_most_512_characters() -> None:
    doc = parsed("x" * 600 + "\nbody", "long.txt")
    assert doc.title == "x" * 512


def test_the_given_media_type_wins_over_the_extension() -> None:
    doc = parsed("# Heading\n\nbody", "upload.bin", MediaType.MARKDOWN)
    assert doc.media_type is MediaType.MARKDOWN and doc.title == "Heading"
    assert "#" not in doc.text


# Markdown

MARKDOWN = """---
title: front matter is not text
---
Intro before any heading.

# Wings *and* lift

Lift depends on [the angle](https://example.com/angle "tip") and `alpha`.
Second line.

## Boundary layers

- laminar
- turbulent
  - transition

### Separation

Flow separates.

## Tables

| name | value |
|------|-------|
| Re   | 1e6   |

```python
print("code kept")
```
"""


def test_markdown_headings_start_sections_with_their_heading_path() -> None:
    doc = parsed(MARKDOWN, "guide.md")
    assert doc.media_type is MediaType.MARKDOWN
    assert doc.title == "Wings and lift"
    assert section_texts(doc) == [
        ((), "Intro before any heading."),
        (("Wings and lift",), "Wings and lift\n\nLift depends on the angle and alpha.\nSecond line."),
        (("Wings and lift", "Boundary layers"), "Boundary layers\n\nlaminar\nturbulent\ntransition"),
        (("Wings and lift", "Boundary layers", "Separation"), "Separation\n\nFlow separates."),
        (("Wings and lift", "Tables"), 'Tables\n\nname\tvalue\nRe\t1e6\n\nprint("code kept")'),
    ]


def test_markdown_text_has_no_markup_and_no_urls() -> None:
    doc = parsed(MARKDOWN, "guide.md")
    for markup in ("#", "*", "`", "](", "https://", "example.com", "|", "---", "front matter"):
        assert markup not in doc.text


def test_a_new_markdown_heading_replaces_its_level_and_drops_deeper_ones() -> None:
    doc = parsed("# A\n\n## B\n\n### C\n\ntext c\n\n## D\n\ntext d\n\n# E\n\ntext e", "h.md")
    assert [s.headings for s in doc.sections] == [("A",), ("A", "B"), ("A", "B", "C"), ("A", "D"), ("E",)]
    assert section_texts(doc)[3] == (("A", "D"), "D\n\ntext d")


def test_markdown_without_headings_is_titled_by_its_first_line() -> None:
    doc = parsed("\n\n**Bold** opening line\nmore", "plain.md")
    assert doc.title == "Bold opening line"
    assert doc.text == "Bold opening line\nmore"


# HTML

HTML = """<!doctype html>
<html><head><title>  Aero   notes </title><style>body { color: red }</style>
<script>var hidden = "script text";</script></head>
<body>
<header>Site banner</header>
<nav><a href="/">Home</a> <a href="/about">About</a></nav>
<noscript>enable javascript</noscript>
<p>Opening &amp; overview with <b>bold</b> and <a href="https://x.example/">a link</a>.<br>After break.</p>
<!-- a comment -->
<h1>Lift</h1>
<div>Lift is a force.<div>Nested block.</div></div>
<h2>Drag</h2>
<ul><li>form drag</li><li>skin friction</li></ul>
<table><tr><th>Re</th><th>Cd</th></tr><tr><td>1e5</td><td>0.4</td></tr></table>
<h3>Induced</h3>
<pre>  code   stays
    indented</pre>
<h2>Stall</h2>
<p>Flow separates.</p>
<aside>Related links</aside>
<form><label>Search</label><input name="q"></form>
<template><p>template text</p></template>
<footer>Copyright</footer>
</body></html>
"""


def test_html_drops_chrome_and_scripts_and_splits_sections_at_headings() -> None:
    doc = parsed(HTML, "notes.html")
    assert doc.media_type is MediaType.HTML
    assert doc.title == "Aero notes"
    assert section_texts(doc) == [
        ((), "Opening & overview with bold and a link.\nAfter break."),
        (("Lift",), "Lift\n\nLift is a force.\nNested block."),
        (("Lift", "Drag"), "Drag\n\nform drag\nskin friction\n\nRe Cd\n1e5 0.4"),
        (("Lift", "Drag", "Induced"), "Induced\n\n  code   stays\n    indented"),
        (("Lift", "Stall"), "Stall\n\nFlow separates."),
    ]
    for dropped in ("script text", "color", "Site banner", "Home", "About", "enable javascript", "comment"):
        assert dropped not in doc.text
    for dropped in ("Related links", "Search", "template text", "Copyright", "x.example"):
        assert dropped not in doc.text


def test_an_article_header_is_content_not_chrome() -> None:
    html = "<body><header>Banner</header><article><header><h1>Post</h1></header><p>Body.</p></article></body>"
    doc = parsed(html, "post.html")
    assert section_texts(doc) == [(("Post",), "Post\n\nBody.")]


def test_html_title_falls_back_to_the_first_h1_then_the_first_line() -> None:
    assert parsed("<p>intro</p><h2>Two</h2><h1>One</h1><p>x</p>", "a.html").title == "One"
    assert parsed("<title> </title><div>First  line</div><div>second</div>", "b.html").title == "First line"


def test_deeply_nested_html_does_not_exhaust_the_stack() -> None:
    doc = parsed("<div>" * 5000 + "deep text" + "</div>" * 5000, "deep.htm")
    assert doc.text == "deep text"


# PDF


def test_a_pdf_is_one_section_per_page_separated_by_a_blank_line() -> None:
    data = make_pdf(["Boundary layer notes\nFirst page about wings.", "Second page about flaps."])
    doc = parsed(data, "paper.pdf")
    assert doc.media_type is MediaType.PDF
    assert doc.title == "Boundary layer notes"
    assert doc.text == "Boundary layer notes\nFirst page about wings.\n\nSecond page about flaps."
    assert section_texts(doc) == [
        ((), "Boundary layer notes\nFirst page about wings."),
        ((), "Second page about flaps."),
    ]


def test_a_pdf_title_comes_from_its_metadata() -> None:
    doc = parsed(make_pdf(["Body text only."], title="Report on Stall"), "report.pdf")
    assert doc.title == "Report on Stall"
    assert doc.text == "Body text only."


# bad files


def encrypted_pdf(user_password: str) -> bytes:
    writer = PdfWriter(clone_from=io.BytesIO(make_pdf(["Secret text."])))
    writer.encrypt(user_password=user_password, owner_password="owner")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def scanned_pdf() -> bytes:
    pdf = FPDF()
    pdf.add_page()
    pdf.rect(20, 20, 100, 60, style="F")
    return bytes(pdf.output())


BAD_FILES = [
    ("empty.txt", b"", "empty"),
    ("text.pdf", b"This is plain text, not a PDF.", "%PDF-"),
    ("disguised.txt", make_pdf(["hello"]), "is a PDF"),
    ("disguised.md", b"%PDF-1.7\n# not markdown", "is a PDF"),
    ("latin1.txt", "caf\xe9".encode("latin-1"), "not valid UTF-8"),
    ("binary.html", b"<p>text\x00\x01</p>", "NUL"),
    ("locked.pdf", encrypted_pdf("secret"), "encrypted"),
    ("empty-password.pdf", encrypted_pdf(""), "encrypted"),
    ("corrupt.pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog", "cannot be read"),
    ("truncated.pdf", make_pdf(["some text"])[:300], "cannot be read"),
    ("scan.pdf", scanned_pdf(), "no text layer"),
    ("blank.txt", b" \r\n\t\n   \n", "no text"),
    ("blank.md", b"#\n\n---\n\n<!-- only a comment -->\n", "no text"),
    ("chrome.html", b"<nav>menu</nav><script>x()</script><p>   </p>", "no text"),
]


@pytest.mark.parametrize(("filename", "data", "expected"), BAD_FILES, ids=[f for f, _, _ in BAD_FILES])
def test_bad_files_are_refused_naming_the_file_and_the_problem(filename: str, data: bytes, expected: str) -> None:
    with pytest.raises(BadFile) as caught:
        parse(data, filename, None, max_bytes=MiB)
    assert caught.value.filename == filename
    assert str(caught.value).startswith(f"{filename}: ")
    assert expected in caught.value.reason
    assert caught.value.reason.endswith(".")


def test_a_file_over_the_limit_is_refused_naming_the_limit() -> None:
    limit = 2 * MiB
    with pytest.raises(BadFile) as caught:
        parse(b"a" * (limit + 1), "big.txt", None, max_bytes=limit)
    assert caught.value.filename == "big.txt"
    assert "2,097,152 bytes" in caught.value.reason and "2 MiB" in caught.value.reason
    assert "2,097,153" in caught.value.reason
    assert parse(b"a" * limit, "big.txt", None, max_bytes=limit).text == "a" * limit


def test_invalid_utf8_names_the_offending_byte_and_offset() -> None:
    with pytest.raises(BadFile) as caught:
        parse(b"\xef\xbb\xbfok \xff", "bad.txt", None, max_bytes=MiB)
    assert "0xff at offset 6" in caught.value.reason
