"""Documentation (reStructuredText or HTML) -> English prose paragraphs, for training corpora.

Used by ``benchmarks/build_doc_corpus.py`` on Debian documentation packages (the Linux kernel's
``Documentation/*.rst``, the reST sources of Sphinx manuals, DocBook or Sphinx HTML). The goal is
running text a language model can learn from, not a faithful rendering: whatever is not prose is
dropped, and a paragraph that survives is one line of text. Both functions are pure functions of
their input; docutils and an HTML library are not dependencies (a line-based pass for reST, the
standard library's ``html.parser`` for HTML).

reST (:func:`rst_paragraphs`) drops:

* section titles: a line of one repeated punctuation character (under- or overline) and the title
  it underlines;
* literal blocks: after a paragraph that ends with ``::`` (or a lone ``::``), every following line
  indented deeper than that paragraph's text, blank lines included;
* directives in :data:`SKIPPED_DIRECTIVES` with their bodies (code, tables, figures, includes,
  ``kernel-doc``, ``toctree``, ...); comments, targets, substitution definitions and footnotes
  (``..`` followed by anything else) with their bodies. Other directives (admonitions, object
  descriptions such as ``function::`` or ``c:function::``) lose their marker line (a signature or
  a title) and keep their body; for :data:`INLINE_PROSE_DIRECTIVES` (``note::``,
  ``versionchanged::``, ...) the text after ``::`` is kept too;
* tables (grid ``+---+`` / ``| ... |`` lines, simple ``=====  ====`` borders), line blocks
  (``| ``), doctest lines (``>>>``), field lists (``:Author: ...``).

List items become paragraphs of their own (marker removed). Inline markup is reduced to its text
(:func:`strip_inline`): ``:ref:`text <target>``` -> ``text``, ````code```` -> ``code``,
```link <url>`_`` -> ``link``, ``**bold**`` -> ``bold``; a paragraph's closing ``::`` -> ``:``.

HTML (:func:`html_paragraphs`): the text of block elements (``p``, ``li``, ``dd``, ``div``, ...),
with ``pre``, tables, headings, navigation, scripts and styles dropped.

Either way, :func:`is_prose` then keeps only paragraphs that read as English sentences.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

# Directives whose text after ``::`` on the marker line is prose too (admonitions, version notes).
INLINE_PROSE_DIRECTIVES = frozenset({
    "note", "warning", "attention", "caution", "danger", "error", "hint", "important", "tip",
    "seealso", "versionadded", "versionchanged", "deprecated", "deprecated-removed", "epigraph",
    "highlights", "pull-quote", "impl-detail",
})
# Directives dropped with their whole body: code, tables, figures, includes, generated content.
SKIPPED_DIRECTIVES = frozenset({
    "code-block", "code", "sourcecode", "literalinclude", "include", "parsed-literal", "highlight",
    "doctest", "testcode", "testsetup", "testcleanup", "testoutput", "productionlist", "math",
    "raw", "image", "figure", "graphviz", "ditaa", "kernel-figure", "kernel-render", "svg",
    "table", "list-table", "flat-table", "csv-table", "tabularcolumns", "toctree", "contents",
    "sectnum", "index", "autosummary", "kernel-doc", "kernel-feat", "kernel-abi", "kernel-include",
    "moduleauthor", "sectionauthor", "codeauthor", "audit-event", "audit-event-table",
    "availability", "program", "cmdoption", "option", "envvar", "opcode", "pdbcommand",
    "2to3fixer", "default-role", "role", "cssclass", "container", "line-block", "youtube",
})

_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([A-Za-z][\w:.+-]*)\s*::(.*)$")
_EXPLICIT = re.compile(r"^(\s*)\.\.(\s|$)")        # comment, target, substitution, footnote
_SECTION_LINE = re.compile(r"^\s*([=\-~^\"'`#*+<>_.:!$%&(),/;?@\[\]{}|])\1{2,}\s*$")
_GRID_TABLE = re.compile(r"^\s*(\+[-=+]+\+|\|.*\|)\s*$")
_SIMPLE_TABLE = re.compile(r"^\s*=+(\s+=+)+\s*$|^\s*-+(\s+-+)+\s*$")
_LINE_BLOCK = re.compile(r"^\s*\|(\s|$)")
_FIELD = re.compile(r"^\s*:[^:`\s][^:`]*:(\s|$)")
_BULLET = re.compile(r"^(\s*)([-*+\u2022]|#\.|\d{1,3}[.)]|\(?[a-zA-Z0-9]{1,3}\)|[a-zA-Z][.)])\s+(?=\S)")
_VERSION_PREFIX = re.compile(r"^[\w.]+(,\s*[\w.]+)?\s*")

_ROLE = re.compile(r"(?::[\w.+-]+)+:`([^`]*)`")
_LINK = re.compile(r"`([^`<]*?)\s*<[^`>]*>`__?")
_REF = re.compile(r"`([^`]+)`__?")
_LITERAL = re.compile(r"``(.+?)``")
_DEFAULT_ROLE = re.compile(r"`([^`]+)`")
_STRONG = re.compile(r"\*\*(\S(?:.*?\S)?)\*\*")
_EMPHASIS = re.compile(r"(?<![\w*])\*(\S(?:[^*]*?\S)?)\*(?![\w*])")
_FOOTNOTE_REF = re.compile(r"\s*\[(?:#[\w-]*|\*|\d+|[\w-]+)\]_")
_SUBSTITUTION = re.compile(r"\|([^|\s][^|]*?)\|_{0,2}")
_ROLE_TEXT_TARGET = re.compile(r"^(.*?)\s*<[^<>]*>$")
_SENTENCE_END = re.compile(r"[.!?:][\"'\u2019\u201d)\]]*$")
_PLAIN_WORD = re.compile(r"[(\"'\u2018\u201c]?[A-Za-z][a-z'\u2019-]*[)\"'\u2019\u201d,.;:!?]*")
_SPACE = re.compile(r"\s+")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _role_text(m: re.Match) -> str:
    text = m.group(1)
    t = _ROLE_TEXT_TARGET.match(text)
    if t and t.group(1):
        text = t.group(1)
    return text.lstrip("~!")


def strip_inline(text: str) -> str:
    """Inline reST markup of one paragraph -> its text; whitespace collapsed to single spaces."""
    text = _SPACE.sub(" ", text).strip()
    if text.endswith(" ::"):
        text = text[:-3]
    elif text.endswith("::"):
        text = text[:-1]
    text = _FOOTNOTE_REF.sub("", text)
    text = _ROLE.sub(_role_text, text)
    text = _LITERAL.sub(r"\1", text)
    text = _LINK.sub(lambda m: m.group(1), text)
    text = _REF.sub(r"\1", text)
    text = _DEFAULT_ROLE.sub(r"\1", text)
    text = _STRONG.sub(r"\1", text)
    text = _EMPHASIS.sub(r"\1", text)
    text = _SUBSTITUTION.sub(r"\1", text)
    text = re.sub(r"\\(.)", r"\1", text)  # reST escapes
    return _SPACE.sub(" ", text).strip()


def is_prose(paragraph: str, *, min_words: int = 8, min_chars: int = 40) -> bool:
    """Heuristic on a markup-free paragraph: running English sentences, not code, lists or tables.

    Needs ``min_words`` words and ``min_chars`` characters, a sentence-like ending (. ! ? : with
    optional closing quotes or brackets), at least 75% letters among the non-space characters, at
    least 60% plain words (letters, with at most surrounding punctuation), no more than 2% non-ASCII
    letters (which drops translations) and at most two of ``{ } ;`` (code).
    """
    words = paragraph.split()
    if len(words) < min_words or len(paragraph) < min_chars:
        return False
    if not _SENTENCE_END.search(paragraph):
        return False
    chars = [c for c in paragraph if not c.isspace()]
    if sum(c.isalpha() for c in chars) < 0.75 * len(chars):
        return False
    if sum(c.isalpha() and not c.isascii() for c in chars) > 0.02 * len(chars):
        return False
    if sum(bool(_PLAIN_WORD.fullmatch(w)) for w in words) < 0.6 * len(words):
        return False
    return paragraph.count("{") + paragraph.count("}") + paragraph.count(";") <= 2


# -- reStructuredText ------------------------------------------------------------------------------
def _drop_markup_lines(lines: list[str]) -> list[str]:
    """Remove section titles with their under/overlines, table lines, line blocks, doctest lines
    and field-list lines (blank lines stay: they separate paragraphs)."""
    keep = [True] * len(lines)
    for i, line in enumerate(lines):
        if _SECTION_LINE.match(line):
            keep[i] = False
            # The title: the non-blank line just above an underline (or just below an overline).
            if i > 0 and lines[i - 1].strip() and not _SECTION_LINE.match(lines[i - 1]):
                keep[i - 1] = False
            if i + 2 < len(lines) and _SECTION_LINE.match(lines[i + 2]) and lines[i + 1].strip():
                keep[i + 1] = False
        elif (_SIMPLE_TABLE.match(line) or _GRID_TABLE.match(line) or _LINE_BLOCK.match(line)
              or line.strip().startswith((">>>", "... ")) or _FIELD.match(line)):
            keep[i] = False
    return [line for line, k in zip(lines, keep) if k]


def _blocks(lines: list[str]) -> list[list[str]]:
    """Lines -> raw paragraphs: runs of non-blank lines; a line with a list marker, or a line less
    indented than the one before, starts a new paragraph."""
    out: list[list[str]] = []
    cur: list[str] = []
    for line in lines:
        if not line.strip():
            if cur:
                out.append(cur)
            cur = []
            continue
        if cur and (_BULLET.match(line) or _indent(line) < _indent(cur[-1])):
            out.append(cur)
            cur = []
        cur.append(line)
    if cur:
        out.append(cur)
    return out


def _rst_body_lines(text: str) -> list[str]:
    """The lines of ``text`` outside literal blocks, skipped directives and comments; blank
    lines where a construct was removed, so paragraphs stay apart."""
    kept: list[str] = []
    skip_deeper_than: int | None = None   # inside a skipped construct: drop lines indented deeper
    literal_after: int | None = None      # the previous line ended with '::' (text at this indent)
    prev_blank = True
    for line in (raw.rstrip() for raw in text.expandtabs(8).splitlines()):
        if not line.strip():
            kept.append("")
            prev_blank = True
            continue
        ind = _indent(line)
        if skip_deeper_than is not None:
            if ind > skip_deeper_than:
                continue
            skip_deeper_than = None
        if literal_after is not None:
            text_indent, literal_after = literal_after, None
            if ind > text_indent:
                skip_deeper_than = text_indent
                continue
        m = _DIRECTIVE.match(line)
        if m:
            name = m.group(2).lower().rsplit(":", 1)[-1]  # c:function -> function
            if name in SKIPPED_DIRECTIVES:
                skip_deeper_than = ind
            else:  # marker line dropped, body kept (deeper: a paragraph of its own)
                kept.append("")
                rest = m.group(3).strip()
                if name in INLINE_PROSE_DIRECTIVES and rest:
                    if name.startswith(("version", "deprecated")):
                        rest = _VERSION_PREFIX.sub("", rest)
                    kept.append(" " * (ind + 3) + rest)
            prev_blank = False
            continue
        if _EXPLICIT.match(line):
            skip_deeper_than = ind
            prev_blank = False
            continue
        if line.strip() == "::":
            literal_after = ind
            kept.append("")
            prev_blank = True
            continue
        if line.endswith("::"):
            # The literal block is indented relative to this paragraph's text (a list item's text
            # starts after its marker).
            b = _BULLET.match(line) if prev_blank else None
            literal_after = len(b.group(0)) - 1 if b else ind
        kept.append(line)
        prev_blank = False
    return kept


def rst_paragraphs(text: str) -> list[str]:
    """Every paragraph of a reST document with block markup removed and inline markup stripped,
    prose or not (:func:`prose_paragraphs` filters them)."""
    paragraphs = []
    for block in _blocks(_drop_markup_lines(_rst_body_lines(text))):
        first = _BULLET.sub(r"\1", block[0], count=1)
        paragraph = strip_inline(" ".join([first, *block[1:]]))
        if paragraph:
            paragraphs.append(paragraph)
    return paragraphs


# -- HTML ----------------------------------------------------------------------------------------
_HTML_BLOCK = frozenset({
    "p", "li", "dd", "dt", "div", "blockquote", "td", "th", "tr", "table", "ul", "ol", "dl", "h1",
    "h2", "h3", "h4", "h5", "h6", "pre", "body", "section", "article", "aside", "br", "hr",
    "caption", "figure", "figcaption", "header", "footer", "nav", "form", "main",
})
_HTML_SKIPPED = frozenset({
    "pre", "script", "style", "head", "title", "table", "nav", "h1", "h2", "h3", "h4", "h5", "h6",
    "header", "footer", "form", "button", "select", "textarea", "svg", "math", "aside",
})


class _ProseHTMLParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._text: list[str] = []
        self._skipping: list[str] = []   # open skipped elements, innermost last

    def _flush(self) -> None:
        if not self._skipping:
            paragraph = _SPACE.sub(" ", "".join(self._text)).strip()
            if paragraph:
                self.paragraphs.append(paragraph)
        self._text = []

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in _HTML_BLOCK:
            self._flush()
        if tag in _HTML_SKIPPED:
            self._skipping.append(tag)

    def handle_startendtag(self, tag: str, attrs) -> None:
        if tag in _HTML_BLOCK:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if tag in _HTML_BLOCK:
            self._flush()
        if tag in self._skipping:  # close it (and anything left open inside it)
            del self._skipping[len(self._skipping) - 1 - self._skipping[::-1].index(tag):]
            self._text = []

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self._text.append(data)


def html_paragraphs(text: str) -> list[str]:
    """The text of every block element of an HTML page outside skipped elements, prose or not."""
    parser = _ProseHTMLParser()
    parser.feed(text)
    parser.close()
    parser._flush()
    return parser.paragraphs


FORMATS = {"rst": rst_paragraphs, "html": html_paragraphs}


def prose_paragraphs(text: str, fmt: str = "rst") -> list[str]:
    """The prose paragraphs of a ``fmt`` ("rst" | "html") document, in order."""
    return [p for p in FORMATS[fmt](text) if is_prose(p)]


__all__ = [
    "FORMATS", "INLINE_PROSE_DIRECTIVES", "SKIPPED_DIRECTIVES", "html_paragraphs", "is_prose",
    "prose_paragraphs", "rst_paragraphs", "strip_inline",
]
