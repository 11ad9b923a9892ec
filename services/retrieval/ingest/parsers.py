"""Turn an uploaded file (plain text, Markdown, HTML or PDF) into normalised plain text with sections.

Text is normalised the same way for every format: Unicode NFC, `\\n` line ends, no trailing spaces,
at most one blank line in a row, no leading or trailing blank lines. Section offsets are code-point
offsets into that final text. Anything wrong with a file raises BadFile with a sentence saying what.
"""

from __future__ import annotations

import io
import re
import unicodedata
from collections.abc import Iterator
from pathlib import PurePath

from bs4 import BeautifulSoup
from bs4.element import NavigableString, PageElement, PreformattedString, Tag
from markdown_it import MarkdownIt
from markdown_it.token import Token
from pypdf import PdfReader

from services.retrieval.errors import BadFile
from services.retrieval.models import MediaType, ParsedDocument, Section

MAX_TITLE_CHARS = 512

_EXTENSIONS: dict[str, MediaType] = {
    ".txt": MediaType.TEXT,
    ".text": MediaType.TEXT,
    ".md": MediaType.MARKDOWN,
    ".markdown": MediaType.MARKDOWN,
    ".html": MediaType.HTML,
    ".htm": MediaType.HTML,
    ".pdf": MediaType.PDF,
}
_PDF_MAGIC = b"%PDF-"
_UTF8_BOM = b"\xef\xbb\xbf"
_BLANK_RUNS = re.compile(r"\n{3,}")
_FRONT_MATTER = re.compile(r"\A---[ \t]*\n.*?\n(?:---|\.\.\.)[ \t]*(?:\n|\Z)", re.DOTALL)

# HTML: subtrees never indexed; header/footer only when page-level (see _dropped).
_HTML_DROPPED = frozenset({"script", "style", "noscript", "template", "nav", "aside", "form", "head", "title", "svg"})
_HTML_PAGE_CHROME = frozenset({"header", "footer"})
_HTML_CONTENT_ROOTS = frozenset({"article", "main", "section"})
_HTML_HEADINGS = {f"h{level}": level for level in range(1, 7)}
# Block elements start a new line; the "paragraph" ones also leave a blank line around them.
_HTML_PARAGRAPHS = frozenset({"p", "pre", "table", "blockquote", "ul", "ol", "dl", "figure", "section", "article"})
_HTML_BLOCKS = _HTML_PARAGRAPHS | frozenset(
    {
        "address", "body", "caption", "dd", "details", "dialog", "div", "dt", "fieldset", "figcaption",
        "hr", "html", "li", "main", "summary", "tbody", "tfoot", "thead", "tr",
    }
)  # fmt: skip


def guess_media_type(filename: str) -> MediaType:
    """The media type implied by the file's extension (case-insensitive)."""
    suffix = PurePath(filename).suffix.lower()
    media_type = _EXTENSIONS.get(suffix)
    if media_type is None:
        what = f"unsupported file extension {suffix!r}" if suffix else "the file name has no extension"
        raise BadFile(filename, f"{what}; supported extensions are {', '.join(sorted(_EXTENSIONS))}.")
    return media_type


def parse(data: bytes, filename: str, media_type: MediaType | None, *, max_bytes: int) -> ParsedDocument:
    """Parse one file; `media_type` None means guess it from the file name."""
    media_type = guess_media_type(filename) if media_type is None else MediaType(media_type)
    if not data:
        raise BadFile(filename, "the file is empty (0 bytes).")
    if len(data) > max_bytes:
        raise BadFile(
            filename,
            f"the file is {len(data):,} bytes, over the limit of {max_bytes:,} bytes ({max_bytes / 2**20:g} MiB).",
        )
    if media_type is MediaType.PDF:
        title, builder = _parse_pdf(data, filename)
    else:
        source = _decode_text(data, filename, media_type)
        if media_type is MediaType.MARKDOWN:
            title, builder = _parse_markdown(source)
        elif media_type is MediaType.HTML:
            title, builder = _parse_html(source)
        else:
            title, builder = "", _TextBuilder()
            builder.add(source)
    text, sections = builder.build()
    if not text:
        if media_type is MediaType.PDF:
            raise BadFile(filename, "no text could be extracted: the PDF has no text layer (a scanned document?).")
        raise BadFile(filename, "the file contains no text.")
    return ParsedDocument(title=_title(title) or _first_line(text), text=text, sections=sections, media_type=media_type)


class _TextBuilder:
    """Appends normalised blocks of text, tracking which section each belongs to."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._size = 0
        self._gap: str | None = None
        self._headings: tuple[str, ...] = ()
        self._path: list[tuple[int, str]] = []
        self._open: tuple[int, int] | None = None  # (start, end) of the section being filled
        self._sections: list[Section] = []
        self.headings_seen: list[tuple[int, str]] = []

    def gap(self, *, blank: bool) -> None:
        """Separate the next block by a newline, or by a blank line if `blank` (the wider request wins)."""
        if blank or self._gap is None:
            self._gap = "\n\n" if blank else "\n"

    def add(self, block: str) -> None:
        block = normalise_text(block)
        if not block:
            return
        if self._size:
            gap = self._gap or "\n"
            self._parts.append(gap)
            self._size += len(gap)
        self._gap = None
        start = self._size
        self._parts.append(block)
        self._size += len(block)
        self._open = (start if self._open is None else self._open[0], self._size)

    def start_section(self, headings: tuple[str, ...]) -> None:
        self._close()
        self._headings = headings

    def heading(self, level: int, text: str) -> None:
        """A heading of `level` (1 = outermost): starts a section under the new heading path."""
        text = _one_line(text)
        if not text:
            return
        while self._path and self._path[-1][0] >= level:
            self._path.pop()
        self._path.append((level, text))
        self.headings_seen.append((level, text))
        self.start_section(tuple(h for _, h in self._path))
        self.gap(blank=True)
        self.add(text)
        self.gap(blank=True)

    def build(self) -> tuple[str, tuple[Section, ...]]:
        self._close()
        return "".join(self._parts), tuple(self._sections)

    def _close(self) -> None:
        if self._open is not None:
            self._sections.append(Section(headings=self._headings, start=self._open[0], end=self._open[1]))
            self._open = None


def normalise_text(text: str) -> str:
    """NFC, `\\n` line ends, no trailing spaces, at most one blank line in a row, no outer blank lines."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANK_RUNS.sub("\n\n", text).strip("\n")


def _one_line(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())


def _title(text: str | None) -> str:
    return _one_line(text or "")[:MAX_TITLE_CHARS].rstrip()


def _first_line(text: str) -> str:
    return next((_title(line) for line in text.split("\n") if line.strip()), "")


def _decode_text(data: bytes, filename: str, media_type: MediaType) -> str:
    if data.startswith(_PDF_MAGIC):
        raise BadFile(
            filename, f"the file is a PDF (it starts with %PDF-), not {media_type.value}; upload it as a PDF."
        )
    if b"\x00" in data:
        raise BadFile(filename, f"the file contains NUL bytes, so it is binary data, not {media_type.value}.")
    bom = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = bom + exc.start
        raise BadFile(
            filename, f"the file is not valid UTF-8 text (byte 0x{data[offset]:02x} at offset {offset})."
        ) from exc


# Markdown


def _parse_markdown(source: str) -> tuple[str, _TextBuilder]:
    source = _FRONT_MATTER.sub("", source, count=1)
    builder = _TextBuilder()
    heading_level: int | None = None
    cells: list[str] | None = None
    lists = 0  # nesting depth of lists: a nested list follows its item's text on the next line
    for token in MarkdownIt("commonmark").enable("table").parse(source):
        kind = token.type
        if kind == "heading_open":
            heading_level = int(token.tag[1:])
        elif kind == "heading_close":
            heading_level = None
        elif kind == "inline":
            text = _markdown_inline(token)
            if heading_level is not None:
                builder.heading(heading_level, text)
            elif cells is not None:
                cells.append(_one_line(text))
            else:
                builder.add(text)
        elif kind == "paragraph_open":
            builder.gap(blank=not token.hidden)  # hidden: a paragraph of a tight list item
        elif kind in ("list_item_open", "tr_open"):
            builder.gap(blank=False)
            if kind == "tr_open":
                cells = []
        elif kind == "tr_close" and cells is not None:
            builder.add("\t".join(cell for cell in cells if cell))
            cells = None
        elif kind in ("bullet_list_open", "ordered_list_open"):
            builder.gap(blank=lists == 0)
            lists += 1
        elif kind in ("bullet_list_close", "ordered_list_close"):
            lists -= 1
        elif kind in ("blockquote_open", "table_open", "hr"):
            builder.gap(blank=True)
        elif kind in ("fence", "code_block", "html_block"):
            builder.gap(blank=True)
            builder.add(token.content if kind != "html_block" else _html_fragment_text(token.content))
            builder.gap(blank=True)
    title = builder.headings_seen[0][1] if builder.headings_seen else ""
    return title, builder


def _markdown_inline(token: Token) -> str:
    """An inline token's text without markup: link text but not URLs, image alt text, code spans."""
    parts: list[str] = []
    for child in token.children or ():
        if child.type in ("text", "code_inline", "image"):
            parts.append(child.content)
        elif child.type in ("softbreak", "hardbreak"):
            parts.append("\n")
    return "".join(parts)


# HTML


def _parse_html(source: str) -> tuple[str, _TextBuilder]:
    soup = BeautifulSoup(source, "html.parser")
    builder = _TextBuilder()
    line: list[str] = []

    def flush() -> None:
        builder.add(_one_line("".join(line)))
        line.clear()

    # Iterative walk (a deeply nested file must not exhaust the stack); True marks leaving a block.
    stack: list[tuple[PageElement, bool]] = [(soup, False)]
    while stack:
        node, leaving = stack.pop()
        if isinstance(node, NavigableString):
            if not isinstance(node, PreformattedString):  # comments, doctypes, CDATA, PIs
                line.append(str(node))
            continue
        if not isinstance(node, Tag):
            continue
        name = node.name
        if leaving:
            flush()
            builder.gap(blank=name in _HTML_PARAGRAPHS)
        elif _dropped(node):
            continue
        elif name in _HTML_HEADINGS:
            flush()
            builder.heading(_HTML_HEADINGS[name], "".join(_html_strings(node)))
        elif name == "pre":
            flush()
            builder.gap(blank=True)
            builder.add("".join(_html_strings(node)))
            builder.gap(blank=True)
        elif name == "br":
            flush()
        else:
            if name in ("td", "th"):
                line.append(" ")
            elif name in _HTML_BLOCKS:
                flush()
                builder.gap(blank=name in _HTML_PARAGRAPHS)
                stack.append((node, True))
            stack.extend((child, False) for child in reversed(node.contents))
    flush()
    return _html_title(soup, builder), builder


def _html_title(soup: BeautifulSoup, builder: _TextBuilder) -> str:
    for tag in soup.find_all("title"):
        if tag.find_parent("svg") is None and (title := _one_line(tag.get_text())):
            return title
    return next((text for level, text in builder.headings_seen if level == 1), "")


def _dropped(tag: Tag) -> bool:
    if tag.name in _HTML_DROPPED:
        return True
    # A page-level header/footer is site chrome; one inside an article or section belongs to it.
    return tag.name in _HTML_PAGE_CHROME and tag.find_parent(_HTML_CONTENT_ROOTS) is None


def _html_strings(root: Tag) -> Iterator[str]:
    """The text under `root` in document order, skipping dropped subtrees and comments."""
    stack: list[PageElement] = list(reversed(root.contents))
    while stack:
        node = stack.pop()
        if isinstance(node, NavigableString):
            if not isinstance(node, PreformattedString):
                yield str(node)
        elif isinstance(node, Tag) and not _dropped(node):
            if node.name == "br":
                yield "\n"
            stack.extend(reversed(node.contents))


def _html_fragment_text(html: str) -> str:
    soup = BeautifulSoup(html, "html.parser")
    return _one_line("".join(_html_strings(soup)))


# PDF


def _parse_pdf(data: bytes, filename: str) -> tuple[str, _TextBuilder]:
    if not data.startswith(_PDF_MAGIC):
        raise BadFile(filename, "the file is not a PDF: it does not start with %PDF-.")
    try:
        reader = PdfReader(io.BytesIO(data))
        encrypted = reader.is_encrypted
    except Exception as exc:  # pypdf raises many types on malformed input
        raise BadFile(filename, f"the PDF cannot be read, it may be corrupt or truncated ({_describe(exc)}).") from exc
    if encrypted:
        raise BadFile(filename, "the PDF is encrypted (password-protected); upload an unencrypted copy.")
    builder = _TextBuilder()
    try:
        for page in reader.pages:
            builder.start_section(())
            builder.gap(blank=True)
            builder.add((page.extract_text() or "").replace("\x00", ""))
    except Exception as exc:
        raise BadFile(filename, f"the PDF cannot be read, it may be corrupt or truncated ({_describe(exc)}).") from exc
    return _pdf_title(reader), builder


def _pdf_title(reader: PdfReader) -> str:
    """The document info /Title, or "" (also when the info dictionary is broken: the text is what counts)."""
    try:
        metadata = reader.metadata
        return str(metadata.title or "") if metadata is not None else ""
    except Exception:
        return ""


def _describe(exc: Exception) -> str:
    message = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
