"""A real English corpus from Debian documentation packages, reproducibly: no download from outside
the package archive (issue 14).

    python benchmarks/build_doc_corpus.py                          # -> data/doccorpus (git-ignored)
    python benchmarks/build_doc_corpus.py --out /shared/data/doccorpus --workers 8
    python benchmarks/build_doc_corpus.py --packages linux-doc-6.1=6.1.192-3,python3.11-doc
    python benchmarks/build_doc_corpus.py --deb debs/*.deb         # .deb files already at hand
    python benchmarks/build_doc_corpus.py --expect data/doccorpus/manifest.json --out /tmp/again

Steps, each recorded in ``<out>/manifest.json``:

1. ``apt-get download`` each package (``name`` or ``name=version``; default :data:`DEFAULT_PACKAGES`,
   the versions apt offers) into ``<work>/debs``; each file's SHA-256 is checked against the
   archive index (``apt-cache show``) and recorded with the package's name and version. Run
   ``apt-get update`` first if apt knows no candidate. A .deb already in ``<work>/debs`` with
   the index's digest is not downloaded again.
2. ``dpkg -x`` into ``<work>/extract/<package>`` (never into /; the tree is removed afterwards unless
   ``--keep-extracted``). Documents are files under ``usr/share/doc``, one document per file: the
   reST files outside Sphinx ``_sources`` folders (the kernel's ``Documentation/``) if the package
   has any, else the reST sources Sphinx copies to ``_sources/``, else the HTML pages; ``translations``,
   ``_static``, ``_modules``, ``_images``, ``_downloads`` folders and Sphinx index pages are skipped.
3. Markup stripped to English prose paragraphs (``monarch_megatron/data/doc_prose.py``). A paragraph
   that occurs verbatim more than once in the corpus is kept at its first occurrence only (so no
   validation paragraph is also a training one); documents with less than ``--min-doc-chars`` of
   prose are dropped.
4. Split BY DOCUMENT: a document is held out for validation when the first 8 bytes of
   SHA-256(``package:path``) fall below ``--valid-fraction`` of their range (stable under any
   change to other documents). ``<work>/corpus.jsonl`` holds the training documents, then the
   validation documents, each in package order then path order; ``<out>/documents.tsv`` lists them.
5. A sentencepiece tokenizer (``--vocab-size``, BERT's special tokens) trained on the training
   documents only, then ``launcher/preprocess.py``'s ``preprocess_corpus`` on the whole jsonl:
   ``<out>/corpus_text_document.{bin,idx}`` (GPT), ``<out>/corpus_text_sentence.{bin,idx}`` (BERT),
   ``<out>/corpus.model``.

**The held-out split in the trainer.** megatron-core's ``BlendedMegatronDatasetBuilder`` splits an
indexed dataset into contiguous index ranges: ``[round(w_train * N), ...)`` with the weights
normalised and ``N`` = the number of documents (BERT's ``numel_low_level_dataset`` counts documents;
GPT's counts sequences, which ``preprocess`` writes one per document). So ``data.split=[n_train,
n_valid]`` (the manifest's ``split``) puts the boundary exactly between the last training and the
first validation document: the trainer's validation set is the held-out documents, with no trainer
change. The manifest's ``overrides`` are the ``key=value`` arguments that point a run at the corpus.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # runnable from a checkout without `pip install -e .`

from monarch_megatron.data.doc_prose import prose_paragraphs  # noqa: E402

# Debian 12 (bookworm) names; on another release pass --packages (e.g. linux-doc-6.12,
# python3.13-doc, postgresql-doc-17, llvm-19-doc). About 30 MB of prose, 6.3M tokens at vocabulary 32768.
DEFAULT_PACKAGES = (
    "linux-doc-6.1",       # the Linux kernel's Documentation/*.rst (reST)
    "python3.11-doc",      # the Python manual (reST sources under html/_sources)
    "postgresql-doc-15",   # the PostgreSQL manual (DocBook HTML)
    "python-django-doc",   # the Django manual (Sphinx HTML)
    "llvm-15-doc",         # LLVM (reST sources)
    "clang-15-doc",        # Clang (reST sources)
)
PREFIX_NAME = "corpus"   # <out>/corpus_text_document.{bin,idx}, <out>/corpus.model
SKIPPED_DIRS = frozenset({"translations", "_static", "_modules", "_images", "_downloads"})
SKIPPED_PAGES = frozenset({"genindex.html", "search.html", "py-modindex.html", "modindex.html",
                           "bookindex.html", "genindex-all.html"})
RST_SUFFIXES = (".rst", ".rst.gz", ".rst.txt")


class BuildError(RuntimeError):
    """A step failed for a reason the user can act on; the message says which and how."""


@dataclass
class Package:
    """One documentation package: what was read, and what it gave."""

    package: str
    version: str
    deb: str
    sha256: str
    size: int
    format: str = ""            # rst | html
    root: str = ""              # the folder documents were read from, inside the package
    files: int = 0              # candidate documents found
    documents: int = 0          # documents kept (enough prose)
    prose_chars: int = 0


@dataclass
class Document:
    id: str                     # "<package>:<path under usr/share/doc>"
    paragraphs: list[str] = field(default_factory=list)

    @property
    def chars(self) -> int:
        return sum(len(p) for p in self.paragraphs)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- packages --------------------------------------------------------------------------------------
def _apt_index_record(spec: str) -> dict[str, str]:
    """``apt-cache show`` fields of the candidate (or the given ``name=version``)."""
    proc = subprocess.run(["apt-cache", "show", "--no-all-versions", spec], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise BuildError(f"apt knows no package {spec!r} ({proc.stderr.strip() or 'no record'}); run "
                         "`apt-get update`, or pick an available version (`apt-cache policy 'linux-doc*'`) "
                         "and pass it with --packages")
    record: dict[str, str] = {}
    for line in proc.stdout.split("\n\n")[0].splitlines():
        if ":" in line and not line.startswith(" "):
            key, value = line.split(":", 1)
            record[key] = value.strip()
    return record


def download(spec: str, debs_dir: str) -> str:
    """``apt-get download`` of ``spec`` into ``debs_dir`` (checked against the archive's SHA-256);
    returns the .deb path. A file already there with the right digest is reused."""
    record = _apt_index_record(spec)
    name, want = record["Package"], record["SHA256"]
    os.makedirs(debs_dir, exist_ok=True)
    for path in sorted(glob.glob(os.path.join(debs_dir, f"{name}_*.deb"))):
        if sha256_file(path) == want:
            return path
    staging = os.path.join(debs_dir, f".download{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        proc = subprocess.run(["apt-get", "download", f"{name}={record['Version']}"], cwd=staging,
                              capture_output=True, text=True)
        got = glob.glob(os.path.join(staging, "*.deb"))
        if proc.returncode != 0 or len(got) != 1:
            raise BuildError(f"apt-get download {name}={record['Version']} failed: {proc.stderr.strip()[-500:]}")
        if sha256_file(got[0]) != want:
            raise BuildError(f"{got[0]}: SHA-256 differs from the archive index's {want}")
        final = os.path.join(debs_dir, os.path.basename(got[0]))
        os.replace(got[0], final)
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def deb_info(path: str) -> Package:
    fields = {}
    for key in ("Package", "Version"):
        proc = subprocess.run(["dpkg-deb", "-f", path, key], capture_output=True, text=True, check=True)
        fields[key] = proc.stdout.strip()
    return Package(fields["Package"], fields["Version"], os.path.basename(path), sha256_file(path),
                   os.path.getsize(path))


def extract(deb: str, dest: str) -> str:
    """``dpkg -x`` into a fresh ``dest`` (a scratch folder: never /)."""
    dest = os.path.abspath(dest)
    if dest == "/":
        raise BuildError("refusing to extract into /")
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    subprocess.run(["dpkg", "-x", deb, dest], check=True)
    return dest


# -- documents ------------------------------------------------------------------------------------
def find_documents(tree: str) -> tuple[str, list[str]]:
    """(format, sorted paths relative to ``tree``) of the documents of one package's files; the
    choice between reST, Sphinx's reST copies and HTML is the module docstring's (step 2)."""
    rst, sources, html = [], [], []
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS]
        rel_dir = os.path.relpath(dirpath, tree)
        parts = rel_dir.split(os.sep)
        for name in filenames:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if "_sources" in parts:
                if name.endswith((".rst.txt", ".txt", ".rst")):
                    sources.append(rel)
            elif name.endswith(RST_SUFFIXES):
                rst.append(rel)
            elif name.endswith(".html") and name not in SKIPPED_PAGES:
                html.append(rel)
    for fmt, found in (("rst", rst), ("rst", sources), ("html", html)):
        if found:
            return fmt, sorted(found)
    return "rst", []


def read_text(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.read()


def _prose_of(job: tuple[str, str]) -> list[str]:
    path, fmt = job
    return prose_paragraphs(read_text(path), fmt)


def collect_documents(trees: Sequence[tuple[str, str]],
                      workers: int = 1) -> tuple[list[Document], dict[str, tuple[str, str, int]]]:
    """Prose documents of each ``(package, tree)`` in the given order, paths sorted within a package.

    Returns (documents before deduplication, {package: (format, folder, candidate files)}).
    """
    jobs, ids, found = [], [], {}
    for package, tree in trees:
        fmt, rels = find_documents(tree)
        common = os.path.commonpath([os.path.dirname(r) or "." for r in rels]) if rels else ""
        found[package] = (fmt, common, len(rels))
        jobs += [(os.path.join(tree, rel), fmt) for rel in rels]
        ids += [f"{package}:{rel}" for rel in rels]
    if workers > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            prose = pool.map(_prose_of, jobs, chunksize=16)
    else:
        prose = list(map(_prose_of, jobs))
    return [Document(i, p) for i, p in zip(ids, prose)], found


def deduplicate(documents: Iterable[Document], min_doc_chars: int) -> list[Document]:
    """Keep each paragraph at its first occurrence only; drop documents left with less than
    ``min_doc_chars`` characters of prose. Order is kept."""
    seen: set[str] = set()
    out = []
    for doc in documents:
        kept = []
        for p in doc.paragraphs:
            if p not in seen:
                seen.add(p)
                kept.append(p)
        if sum(map(len, kept)) >= min_doc_chars:
            out.append(Document(doc.id, kept))
    return out


def is_validation(doc_id: str, valid_fraction: float) -> bool:
    """Held out: the first 8 bytes of SHA-256(doc_id), as a fraction of 2**64, below ``valid_fraction``."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big")
    return h < valid_fraction * 2**64


def split_documents(documents: Sequence[Document], valid_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, valid), each in the input order."""
    valid = [d for d in documents if is_validation(d.id, valid_fraction)]
    held = {d.id for d in valid}
    return [d for d in documents if d.id not in held], valid


def write_jsonl(path: str, documents: Iterable[Document]) -> str:
    """One JSON object per document (``text``: paragraphs separated by blank lines, ``id``),
    written atomically; returns its SHA-256."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in documents:
            f.write(json.dumps({"text": "\n\n".join(doc.paragraphs), "id": doc.id}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return sha256_file(path)


# -- tokenization ---------------------------------------------------------------------------------
def tokenize(corpus: str, train_docs: Sequence[Document], out_prefix: str, vocab_size: int, workers: int,
             progress: bool = True) -> dict:
    """Train the tokenizer on the training documents, then preprocess the whole corpus; returns the
    counts read back from the indexed datasets (documents and tokens per split)."""
    from monarch_megatron.data.corpus import split_sentences
    from monarch_megatron.data.preprocess import indexed_prefix, preprocess_corpus
    from monarch_megatron.data.tokenizer import train_tokenizer

    t0 = time.perf_counter()
    sentences = (s for doc in train_docs for p in doc.paragraphs for s in split_sentences(p))
    train_tokenizer(sentences, out_prefix, vocab_size, num_threads=workers)
    t1 = time.perf_counter()
    summary = preprocess_corpus(corpus, out_prefix, tokenizer_model=out_prefix + ".model", workers=workers,
                                progress=progress)
    t2 = time.perf_counter()

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    gpt = IndexedDataset(indexed_prefix(out_prefix, "gpt"))
    bert = IndexedDataset(indexed_prefix(out_prefix, "bert"))
    return {"gpt_lengths": [int(n) for n in gpt.sequence_lengths],
            "bert_documents": len(bert.document_indices) - 1, "summary": summary.line(),
            "tokenizer_seconds": t1 - t0, "preprocess_seconds": t2 - t1}


# -- the build ------------------------------------------------------------------------------------
def git_commit() -> str | None:
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:  # no git
        return None
    return proc.stdout.strip() or None


def build(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    out, work = os.path.abspath(args.out), os.path.abspath(args.work_dir)
    os.makedirs(out, exist_ok=True)
    os.makedirs(work, exist_ok=True)

    t = time.perf_counter()
    if args.deb:
        debs = [os.path.abspath(p) for p in args.deb]
    else:
        debs = [download(spec, os.path.join(work, "debs")) for spec in args.packages.split(",") if spec]
    seconds["download"] = time.perf_counter() - t
    packages = [deb_info(p) for p in debs]
    names = [p.package for p in packages]
    if len(set(names)) != len(names):
        raise BuildError(f"a package is given twice: {names}")

    t = time.perf_counter()
    trees = [(p.package, os.path.join(extract(deb, os.path.join(work, "extract", p.package)), "usr", "share", "doc"))
             for p, deb in zip(packages, debs)]
    seconds["extract"] = time.perf_counter() - t

    t = time.perf_counter()
    raw, found = collect_documents(trees, args.workers)
    documents = deduplicate(raw, args.min_doc_chars)
    for p in packages:
        p.format, p.root, p.files = found[p.package]
        mine = [d for d in documents if d.id.startswith(p.package + ":")]
        p.documents, p.prose_chars = len(mine), sum(d.chars for d in mine)
        if p.files == 0:
            raise BuildError(f"{p.deb}: no reST or HTML documents under usr/share/doc")
    train, valid = split_documents(documents, args.valid_fraction)
    if not train or not valid:
        raise BuildError(f"{len(documents)} documents give {len(train)} training and {len(valid)} validation "
                         "documents: use more packages or another --valid-fraction")
    corpus = os.path.join(work, "corpus.jsonl")
    corpus_sha = write_jsonl(corpus, train + valid)
    seconds["prose"] = time.perf_counter() - t
    if not args.keep_extracted:
        shutil.rmtree(os.path.join(work, "extract"), ignore_errors=True)

    prefix = os.path.join(out, PREFIX_NAME)
    counts = tokenize(corpus, train, prefix, args.vocab_size, args.workers, progress=not args.no_progress)
    seconds["tokenizer"], seconds["preprocess"] = counts["tokenizer_seconds"], counts["preprocess_seconds"]
    lengths = counts["gpt_lengths"]
    n_train, n_valid = len(train), len(valid)
    if len(lengths) != n_train + n_valid or counts["bert_documents"] != n_train + n_valid:
        raise BuildError(f"the indexed datasets hold {len(lengths)} (GPT) / {counts['bert_documents']} (BERT) "
                         f"documents, the corpus {n_train + n_valid}: the split would not fall between documents")
    tokens = {"train": sum(lengths[:n_train]) - n_train, "valid": sum(lengths[n_train:]) - n_valid}  # without [EOD]
    tokens["total"] = tokens["train"] + tokens["valid"]

    with open(os.path.join(out, "documents.tsv"), "w", encoding="utf-8") as f:
        f.write("index\tsplit\tid\tparagraphs\tchars\ttokens\n")
        for i, doc in enumerate(train + valid):
            side = "train" if i < n_train else "valid"
            f.write(f"{i}\t{side}\t{doc.id}\t{len(doc.paragraphs)}\t{doc.chars}\t{lengths[i] - 1}\n")

    import sentencepiece

    seconds["total"] = time.perf_counter() - t_start
    rel_prefix = os.path.relpath(prefix, ROOT) if prefix.startswith(ROOT + os.sep) else prefix
    manifest = {
        "packages": [asdict(p) for p in packages],
        "documents": {"train": n_train, "valid": n_valid, "total": n_train + n_valid,
                      "candidates": len(raw), "dropped": len(raw) - n_train - n_valid},
        "tokens": tokens,
        "gpt_tokens_with_eod": {"train": sum(lengths[:n_train]), "valid": sum(lengths[n_train:])},
        "prose_chars": {"train": sum(d.chars for d in train), "valid": sum(d.chars for d in valid)},
        "split": [n_train, n_valid],
        "valid_fraction": args.valid_fraction,
        "min_doc_chars": args.min_doc_chars,
        "vocab_size": args.vocab_size,
        "corpus_jsonl": {"path": corpus, "sha256": corpus_sha, "bytes": os.path.getsize(corpus)},
        "outputs": {os.path.basename(p): sha256_file(p) for p in sorted(glob.glob(prefix + "*"))
                    if os.path.isfile(p) and p.endswith((".bin", ".idx", ".model", ".vocab"))},
        "prefix": prefix,
        "overrides": ["data.source=indexed", f"data.prefix={rel_prefix}", f"data.tokenizer_model={rel_prefix}.model",
                      f"data.vocab_size={args.vocab_size}", f"data.split=[{n_train},{n_valid}]"],
        "preprocess": counts["summary"],
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "workers": args.workers,
        "code": {"git_commit": git_commit(), "doc_prose_sha256": sha256_file(
            os.path.join(ROOT, "monarch_megatron", "data", "doc_prose.py"))},
        "environment": {"python": platform.python_version(), "sentencepiece": sentencepiece.__version__,
                        "os": platform.platform()},
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
    }
    tmp = os.path.join(out, f"manifest.json.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(out, "manifest.json"))
    return manifest


def compare(manifest: dict, expected: dict) -> list[str]:
    """What differs between a build and a recorded one: packages (name, version, digest), the corpus
    jsonl's digest, document and token counts, the tokenizer's pieces (``.vocab``: the ``.model``
    file also records the path it was trained at) and the datasets' digests."""
    diffs = []
    key = lambda m: [(p["package"], p["version"], p["sha256"]) for p in m["packages"]]  # noqa: E731
    outputs = lambda m: {k: v for k, v in m["outputs"].items() if not k.endswith(".model")}  # noqa: E731
    for what, get in (("packages", key), ("corpus.jsonl sha256", lambda m: m["corpus_jsonl"]["sha256"]),
                      ("documents", lambda m: m["documents"]), ("tokens", lambda m: m["tokens"]),
                      ("split", lambda m: m["split"]), ("tokenizer pieces and datasets", outputs)):
        if get(manifest) != get(expected):
            diffs.append(f"{what}: {get(manifest)} != expected {get(expected)}")
    return diffs


def summary_line(m: dict) -> str:
    pk = ", ".join(f"{p['package']} {p['version']} ({p['documents']} docs)" for p in m["packages"])
    return (f"corpus: {m['documents']['total']} documents ({m['documents']['train']} train, "
            f"{m['documents']['valid']} valid), {m['tokens']['total']:,} tokens ({m['tokens']['train']:,} train, "
            f"{m['tokens']['valid']:,} valid), vocab {m['vocab_size']}, {m['seconds']['total']:.0f} s; from {pk}\n"
            f"corpus.jsonl sha256 {m['corpus_jsonl']['sha256']}\n"
            f"train with: {' '.join(m['overrides'])}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/doccorpus", help="tokenizer, indexed datasets, manifest (default %(default)s)")
    p.add_argument("--work-dir", default=None, help="debs, extraction, corpus.jsonl (default <out>_build)")
    p.add_argument("--packages", default=",".join(DEFAULT_PACKAGES),
                   help="comma-separated apt packages, name or name=version (default %(default)s)")
    p.add_argument("--deb", nargs="+", default=None, help="use these .deb files instead of downloading")
    p.add_argument("--valid-fraction", type=float, default=0.05, help="share of documents held out (default %(default)s)")
    p.add_argument("--min-doc-chars", type=int, default=200, help="drop documents with less prose (default %(default)s)")
    p.add_argument("--vocab-size", type=int, default=32768, help="sentencepiece pieces (default %(default)s)")
    p.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    p.add_argument("--keep-extracted", action="store_true", help="keep <work>/extract")
    p.add_argument("--expect", metavar="MANIFEST", help="exit 1 unless this build reproduces a recorded manifest")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.work_dir = args.work_dir or args.out.rstrip("/") + "_build"
    if not 0 < args.valid_fraction < 1:
        p.error("--valid-fraction must be in (0, 1)")
    try:
        manifest = build(args)
    except BuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary_line(manifest))
    if args.expect:
        with open(args.expect) as f:
            diffs = compare(manifest, json.load(f))
        for d in diffs:
            print(f"differs from {args.expect}: {d}", file=sys.stderr)
        if diffs:
            return 1
        print(f"reproduces {args.expect}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
