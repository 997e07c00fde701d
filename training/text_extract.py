"""Text extraction for the corpus builder: raw package files -> clean UTF-8 documents.

Pure functions on strings and bytes, no network: UTF-8 decoding and cleanup, the
normalized-text hash that de-duplicates documents, Project Gutenberg header/footer
stripping, HTML to text with the standard library's `html.parser` (scripts, styles and
page chrome dropped, paragraph breaks kept), SWORD zText modules and OSIS markup to one
document per Bible book, and fortune(6) files to one document per entry.
`training/corpus.py` decides which package files go through which extractor.
"""

from __future__ import annotations

import hashlib
import re
import struct
import unicodedata
import zlib
from dataclasses import dataclass
from html.parser import HTMLParser


@dataclass(frozen=True)
class Document:
    name: str
    text: str


# --------------------------------------------------------------------------- text cleanup

_BLANK_RUNS = re.compile(r"\n{3,}")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_WHITESPACE = re.compile(r"\s+")


def decode_text(raw: bytes) -> str:
    """UTF-8 (BOM dropped); old cp1252/latin-1 files are decoded rather than refused."""
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1")


def clean_text(text: str) -> str:
    """`\\n` line ends, no control chars but tab, no trailing spaces, <=1 blank line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    text = _CONTROL.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANK_RUNS.sub("\n\n", text).strip()


def normalize_for_hash(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())


def document_id(text: str) -> str:
    """sha256 hex of the normalized text: the dedup key and the split key."""
    return hashlib.sha256(normalize_for_hash(text).encode("utf-8")).hexdigest()


_GUTENBERG_START = re.compile(
    r"^\s*(\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG E-?(BOOK|TEXT)"
    r"|\*END\*THE SMALL PRINT!).*$", re.I | re.M)
_GUTENBERG_END = re.compile(
    r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG E-?(BOOK|TEXT)"
    r"|End of (the )?Project Gutenberg'?s?\b).*$", re.I | re.M)


def strip_gutenberg(text: str) -> str:
    """Cut Project Gutenberg's license header and footer; text without them is returned as is."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return text


# --------------------------------------------------------------------------- HTML -> text

_VOID_TAGS = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link",
                        "meta", "param", "source", "track", "wbr"})
_SKIP_TAGS = frozenset({"script", "style", "noscript", "template", "svg", "math", "nav", "head",
                        "button", "iframe", "object", "canvas", "select", "footer"})
_PARAGRAPH_TAGS = frozenset({"p", "div", "section", "article", "main", "header", "aside", "h1",
                             "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "table", "ul",
                             "ol", "dl", "figure", "figcaption", "details", "summary", "hr",
                             "address", "fieldset"})
_LINE_TAGS = frozenset({"br", "li", "tr", "dt", "dd", "caption"})
# Page chrome in Sphinx/DocBook/rustdoc/mdbook output that sits outside <nav>.
DEFAULT_DROP_CLASSES = frozenset({"navheader", "navfooter", "sidebar", "rightside", "srclink",
                                  "since", "hideme", "headerlink", "sphinxsidebar", "related",
                                  "anchor", "warning-no-js", "tooltip", "out-of-band",
                                  "test-arrow"})


class _TextWriter:
    """Accumulates text with pending paragraph/line breaks; whitespace collapsed outside <pre>."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.pending_break = 0
        self.space_before_word = False

    def soft_space(self) -> None:
        """A space before the next chunk if it starts a word (markup removed between words)."""
        self.space_before_word = True

    def newline(self, count: int) -> None:
        self.pending_break = max(self.pending_break, count)

    def write(self, text: str, verbatim: bool = False) -> None:
        chunk = text.replace("\xa0", " ")
        if not verbatim:
            chunk = _WHITESPACE.sub(" ", chunk)
        if not chunk:
            return
        if self.space_before_word and self.parts and not self.parts[-1][-1:].isspace() and (
                chunk[0].isalnum() or chunk[0] in "\"'(“‘"):
            chunk = " " + chunk
        self.space_before_word = False
        if self.pending_break:
            if not verbatim:
                chunk = chunk.lstrip(" ")
                if not chunk:
                    return
            if self.parts:
                self.parts.append("\n" * self.pending_break)
            self.pending_break = 0
        elif not verbatim and chunk.startswith(" ") and (
                not self.parts or self.parts[-1].endswith((" ", "\n"))):
            chunk = chunk[1:]
            if not chunk:
                return
        self.parts.append(chunk)

    def text(self) -> str:
        return clean_text("".join(self.parts))


class _HTMLText(HTMLParser):
    def __init__(self, drop_classes: frozenset[str], main_only: bool) -> None:
        super().__init__(convert_charrefs=True)
        self.drop_classes = drop_classes
        self.main_only = main_only
        self.out = _TextWriter()
        self.stack: list[tuple[str, bool]] = []  # (tag, opened a skipped subtree)
        self.skip_depth = 0
        self.main_depth = 0
        self.pre_depth = 0
        self.row_cells: list[int] = []  # cells seen in each open <tr>

    def _visible(self) -> bool:
        return self.skip_depth == 0 and (not self.main_only or self.main_depth > 0)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID_TAGS:
            if self._visible():
                if tag == "br":
                    self.out.newline(1)
                elif tag == "hr":
                    self.out.newline(2)
            return
        classes = set()
        for key, value in attrs:
            if key == "class" and value:
                classes.update(value.split())
        skip = tag in _SKIP_TAGS or bool(classes & self.drop_classes)
        self.stack.append((tag, skip))
        self.skip_depth += skip
        self.main_depth += tag == "main"
        self.pre_depth += tag == "pre"
        if tag == "tr":
            self.row_cells.append(0)
        if not self._visible():
            return
        if tag in _PARAGRAPH_TAGS:
            self.out.newline(2)
        elif tag in _LINE_TAGS:
            self.out.newline(1)
        elif tag in ("td", "th"):
            if self.row_cells and self.row_cells[-1]:
                self.out.write(" | ")
            if self.row_cells:
                self.row_cells[-1] += 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in _VOID_TAGS:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if not any(open_tag == tag for open_tag, _ in self.stack):
            return  # stray end tag
        while self.stack:
            open_tag, skip = self.stack.pop()
            if self._visible() and (open_tag in _PARAGRAPH_TAGS or open_tag in _LINE_TAGS):
                self.out.newline(2 if open_tag in _PARAGRAPH_TAGS else 1)
            self.skip_depth -= skip
            self.main_depth -= open_tag == "main"
            self.pre_depth -= open_tag == "pre"
            if open_tag == "tr" and self.row_cells:
                self.row_cells.pop()
            if open_tag == tag:
                break

    def handle_data(self, data: str) -> None:
        if self._visible():
            self.out.write(data, verbatim=self.pre_depth > 0)


def html_to_text(html: str, drop_classes: frozenset[str] = DEFAULT_DROP_CLASSES) -> str:
    """Visible text of an HTML page: scripts, styles, nav and chrome dropped, entities decoded,
    paragraph breaks kept, <pre> verbatim. If the page has a <main>, only its content counts."""
    parser = _HTMLText(drop_classes, main_only="<main" in html.lower())
    parser.feed(html)
    parser.close()
    return parser.out.text()


# --------------------------------------------------------------------------- SWORD / OSIS

def read_sword_ztext(files: dict[str, bytes]) -> str:
    """Concatenated OSIS markup of a SWORD zText module, in versification order.

    `files` maps "ot.bzs", "ot.bzv", "ot.bzz" (and nt.*) to their bytes. bzs is the
    block index (offset, size, uncompressed size: 3 x u32 LE), bzz the zlib blocks,
    bzv the verse index (block, offset, size: u32, u32, u16 LE) into a block."""
    verses: list[str] = []
    for testament in ("ot", "nt"):
        if f"{testament}.bzs" not in files:
            continue
        bzs, bzv, bzz = (files[f"{testament}.{ext}"] for ext in ("bzs", "bzv", "bzz"))
        blocks = [zlib.decompress(bzz[offset:offset + size])
                  for offset, size, _ in struct.iter_unpack("<III", bzs)]
        for block, offset, size in struct.iter_unpack("<IIH", bzv):
            if size and block < len(blocks):
                verses.append(blocks[block][offset:offset + size].decode("utf-8", "replace"))
    return " ".join(verses)


class _OSISBooks(HTMLParser):
    """Splits OSIS verse markup into one text per `<div type="book">`; notes dropped."""

    RCDATA_CONTENT_ELEMENTS = ()  # newer html.parser treats <title> as RCDATA; OSIS titles hold markup

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.books: list[tuple[str, _TextWriter]] = [("front", _TextWriter())]
        self.note_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        out = self.books[-1][1]
        if tag == "note":
            self.note_depth += 1
        elif tag == "div" and attr.get("type") == "book" and "sid" in attr:
            self.books.append((attr.get("osisid") or f"book{len(self.books)}", _TextWriter()))
        elif tag == "chapter" and attr.get("n"):
            out.newline(2)
            out.write(f"Chapter {attr['n']}")
            out.newline(2)
        elif tag in ("div", "lg", "title", "p", "list", "speaker"):
            out.newline(2)
        elif tag in ("l", "lb", "item"):
            out.newline(2 if attr.get("type") == "x-p" else 1)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag == "note":
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag == "note":
            self.note_depth = max(0, self.note_depth - 1)
            # WEB puts footnotes between words with no space: "God<note>..</note>created"
            self.books[-1][1].soft_space()
        elif tag in ("title", "lg", "p", "div", "list", "speaker"):
            self.books[-1][1].newline(2)
        elif tag in ("l", "item"):
            self.books[-1][1].newline(1)

    def handle_data(self, data: str) -> None:
        if not self.note_depth:
            self.books[-1][1].write(data)


def osis_to_books(osis: str) -> list[Document]:
    """One Document per Bible book (front matter before the first book is "front")."""
    parser = _OSISBooks()
    parser.feed(osis)
    parser.close()
    return [Document(name, out.text()) for name, out in parser.books]


def split_fortunes(text: str) -> list[Document]:
    """A fortune(6) file -> one Document per `%`-separated entry, ANSI colors removed."""
    entries = re.split(r"^%\s*$", _ANSI.sub("", text), flags=re.M)
    return [Document(f"#{i}", clean_text(entry)) for i, entry in enumerate(entries)]
