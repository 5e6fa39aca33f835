"""A demo corpus built from text that ships with every Python installation; no download.

Sources, in a fixed order: the language-reference topics of ``pydoc_data.topics`` (the text
behind ``help("if")`` etc., split at section headings) and the docstrings of a fixed list of
standard-library modules and their public classes, functions and methods (sorted by name). Each
source text is cleaned to prose: code examples, signatures, tables, headings and very short
paragraphs are dropped and line wraps are joined. The result (about 1 MB) depends only on the
Python version, which is what "deterministic" can mean for it.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import inspect
import json
import os
import re
import warnings
from typing import Iterator

from monarch_megatron.data.preprocess import indexed_prefix, preprocess_corpus

CORPUS_NAME = "demo_corpus.jsonl"

# Pure-Python modules with substantial prose docstrings; import failures are skipped (e.g. a
# Python built without sqlite3), keeping the rest in order.
DEMO_MODULES: tuple[str, ...] = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs",
    "collections", "concurrent.futures", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "doctest", "email", "enum", "filecmp",
    "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "graphlib",
    "gzip", "hashlib", "heapq", "hmac", "html.parser", "http.client", "imaplib", "inspect", "io",
    "ipaddress", "itertools", "json", "locale", "logging", "lzma", "mailbox", "math",
    "multiprocessing", "numbers", "operator", "optparse", "os", "pathlib", "pdb", "pickle",
    "pkgutil", "platform", "plistlib", "poplib", "pprint", "queue", "random", "re", "reprlib",
    "sched", "secrets", "selectors", "shlex", "shutil", "smtplib", "socket", "sqlite3",
    "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "traceback", "types", "typing", "unittest",
    "urllib.request", "uuid", "warnings", "weakref", "xml.etree.ElementTree", "zipfile",
    # Packages re-export classes defined in submodules, which the __module__ filter skips there.
    "asyncio.base_events", "asyncio.events", "asyncio.futures", "asyncio.locks",
    "asyncio.queues", "asyncio.streams", "asyncio.subprocess", "asyncio.tasks",
    "concurrent.futures._base", "concurrent.futures.process", "concurrent.futures.thread",
    "email.message", "email.utils", "email.parser", "email.policy", "http.cookiejar",
    "http.server", "importlib.metadata", "importlib.resources", "logging.handlers",
    "multiprocessing.managers", "multiprocessing.pool", "multiprocessing.queues",
    "unittest.case", "unittest.loader", "unittest.mock", "unittest.runner", "urllib.parse",
    "xml.dom.minidom", "xml.sax.handler", "zipfile._path",
)

_HEADING_UNDERLINE = re.compile(r"^\s*([*=\-~^\"'#])\1{3,}\s*$")
_MIN_PARAGRAPH_CHARS = 60


def _is_prose(paragraph: str) -> bool:
    """Heuristic: wrapped sentences of mostly letters, not code, tables or signatures."""
    lines = paragraph.splitlines()
    if any(l.lstrip().startswith((">>>", "...", "$ ", "+--", "|")) for l in lines):
        return False
    if any(_HEADING_UNDERLINE.match(l) for l in lines):
        return False
    text = " ".join(paragraph.split())
    if len(text) < _MIN_PARAGRAPH_CHARS:
        return False
    starts_sentence = text[0].isupper() or text[0] in "\"*'"
    if not starts_sentence or text[-1] not in ".:!?":
        return False
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return letters / len(text) > 0.8 and text.count("(") <= 8 and "=" not in text


def _paragraphs(text: str) -> list[str]:
    """Blank-line-separated paragraphs; indented blocks (code in reST) dropped."""
    out = []
    for para in re.split(r"\n\s*\n", text.expandtabs()):
        lines = para.splitlines()
        if not lines:
            continue
        # reST/pydoc code samples and definition bodies are indented relative to prose.
        indent = min(len(l) - len(l.lstrip()) for l in lines if l.strip()) if para.strip() else 0
        if indent >= 4 or not _is_prose(para):
            continue
        out.append(" ".join(para.split()))
    return out


def _topic_sections(text: str) -> Iterator[str]:
    """Split a pydoc topic at its headings (a line followed by an underline)."""
    lines = text.splitlines()
    section: list[str] = []
    for i, line in enumerate(lines):
        if i + 1 < len(lines) and _HEADING_UNDERLINE.match(lines[i + 1]) and section:
            yield "\n".join(section)
            section = []
        section.append(line)
    if section:
        yield "\n".join(section)


def _docstring_sources() -> Iterator[str]:
    with warnings.catch_warnings():
        # Touching deprecated aliases (typing.re, ...) warns; their docstrings are harmless.
        warnings.simplefilter("ignore", DeprecationWarning)
        yield from list(_docstrings())


def _docstrings() -> Iterator[str]:
    seen: set[int] = set()
    for name in DEMO_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        objects = [module]
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            objects.append(obj)
            if inspect.isclass(obj):
                objects.extend(
                    m for a, m in sorted(vars(obj).items())
                    if not a.startswith("_") and callable(m)
                )
        for obj in objects:
            doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
            if doc and id(obj) not in seen:
                seen.add(id(obj))
                yield inspect.cleandoc(doc)


def iter_demo_documents() -> Iterator[str]:
    """The demo documents in their fixed order (each has at least one prose paragraph)."""
    from pydoc_data.topics import topics

    sources: list[str] = []
    for key in sorted(topics):
        sources.extend(_topic_sections(topics[key]))
    for text in sources + list(_docstring_sources()):
        paragraphs = _paragraphs(text)
        if paragraphs:
            yield " ".join(paragraphs)


def build_demo_corpus(out_dir: str) -> str:
    """Write ``<out_dir>/demo_corpus.jsonl`` (``text`` field) unless present; return its path."""
    path = os.path.join(out_dir, CORPUS_NAME)
    if os.path.isfile(path):
        return path
    os.makedirs(out_dir, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in iter_demo_documents():
            f.write(json.dumps({"text": doc}) + "\n")
    os.replace(tmp, path)  # atomic: a concurrent reader sees all of it or nothing
    return path


def prepare_demo_data(out_dir: str, vocab_size: int = 4096) -> tuple[str, str]:
    """Build the demo corpus, a tokenizer trained on it and its indexed datasets, once.

    Returns:
        (data_prefix, tokenizer_model): ``<out_dir>/demo`` for ``build_pretraining_datasets``
        and ``<out_dir>/demo.model``. A stamp file records what was built; a call with another
        vocab size rebuilds. Safe to call from several processes at once (file lock).
    """
    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, "demo")
    model = prefix + ".model"
    stamp_path = prefix + ".json"
    with open(os.path.join(out_dir, ".prepare.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        corpus = build_demo_corpus(out_dir)
        with open(corpus, "rb") as f:
            stamp = {"vocab_size": vocab_size, "corpus_md5": hashlib.md5(f.read()).hexdigest()}
        outputs = [
            indexed_prefix(prefix, k) + ext for k in ("bert", "gpt") for ext in (".bin", ".idx")
        ]
        if os.path.isfile(stamp_path) and all(map(os.path.isfile, outputs + [model])):
            with open(stamp_path) as f:
                recorded = json.load(f)
                if {k: recorded.get(k) for k in stamp} == stamp:
                    return prefix, model
        summary = preprocess_corpus(
            corpus, prefix, vocab_size=vocab_size, workers=1, progress=False
        )
        with open(stamp_path + ".tmp", "w") as f:
            json.dump({**stamp, "summary": summary.line()}, f)
        os.replace(stamp_path + ".tmp", stamp_path)
    return prefix, model
