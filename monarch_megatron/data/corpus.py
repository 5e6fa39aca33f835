"""Reading raw corpora (jsonl or plain text) into documents, and splitting them into sentences.

Formats:
    *.jsonl / *.json   one JSON object per line with a string field ``text`` (one document each);
                       blank lines are skipped; anything else is an error naming the line.
    anything else      plain UTF-8 text; documents are paragraphs separated by blank lines.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterator


class CorpusFormatError(ValueError):
    """A malformed corpus line; the message names the file and the 1-based line number."""


def is_jsonl(path: str) -> bool:
    return path.endswith((".jsonl", ".json", ".jsonl.txt"))


def iter_documents(path: str, text_key: str = "text") -> Iterator[str]:
    """Yield the documents of ``path`` in file order (whitespace-stripped, empty ones skipped).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorpusFormatError: a jsonl line is not a JSON object with a string ``text_key`` field.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file not found: {path}")
    if is_jsonl(path):
        yield from _iter_jsonl(path, text_key)
    else:
        yield from _iter_paragraphs(path)


def _iter_jsonl(path: str, text_key: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusFormatError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                raise CorpusFormatError(
                    f"{path}:{lineno}: expected a JSON object with a string field '{text_key}'"
                )
            text = record[text_key].strip()
            if text:
                yield text


def _iter_paragraphs(path: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        lines: list[str] = []
        for line in f:
            if line.strip():
                lines.append(line.strip())
            elif lines:
                yield " ".join(lines)
                lines = []
        if lines:
            yield " ".join(lines)


# A sentence ends at . ! or ? (optionally followed by closing quotes/brackets), then whitespace,
# then something that can start a sentence. Requiring the capital/digit/quote keeps "e.g. the"
# and "i.e. a" together; NLTK's punkt would do slightly better but is not a dependency here.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    """Split a document into sentences. Whitespace runs are collapsed and every split is at a
    space, so ``" ".join(split_sentences(t)) == " ".join(t.split())`` exactly."""
    text = " ".join(text.split())
    out: list[str] = []
    start = 0
    for m in _SENTENCE_END.finditer(text):
        # Keep trailing quotes/brackets with the sentence they close.
        end = m.start() + len(m.group(0).rstrip())
        out.append(text[start:end].strip())
        start = m.end()
    out.append(text[start:].strip())
    return [s for s in out if s]
