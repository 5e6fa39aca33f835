"""Issue 14 on CPU: documentation -> prose, the by-document corpus build and its reproducibility
(benchmarks/build_doc_corpus.py, a .deb built here: no apt-get), megatron's split falling exactly
between training and held-out documents, and the time-to-quality summary
(benchmarks/time_to_quality.py) on synthetic metrics.jsonl files."""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from monarch_megatron.data.doc_prose import html_paragraphs, is_prose, prose_paragraphs, rst_paragraphs, strip_inline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


corpus_mod = _load("build_doc_corpus")
ttq = _load("time_to_quality")

RST = """\
.. SPDX-License-Identifier: GPL-2.0

.. _kref-doc:

===================================
Adding reference counters to objects
===================================

:Author: Somebody <a@b.c>

krefs allow you to add reference counters to your objects.  If you have
objects that are used in multiple places, see :ref:`the rules <kref-rules>` and
the ``kref_get()`` function, or `the paper <http://example.org/p.pdf>`_ for **more**.

To use a kref, add one to your data structures like::

        struct my_data {
                struct kref refcount;
        };

    Still part of the literal block, however indented.

The kref can occur anywhere within the data structure, as *you* like it.

.. code-block:: c

   kref_init(&data->refcount);

.. note::
   Never call kref_put() on an object you did not get a reference to first.

.. c:function:: void kref_get(struct kref *kref)

   Increment the reference count of the object that the kref is embedded in.

.. kernel-doc:: include/linux/kref.h
   :internal:

Rules
-----

- If you make a non-temporary copy of a pointer, you must increment the refcount.
- When you are done with a pointer, you must call the put function on it.

+-------+-------+
| col a | col b |
+-------+-------+

=====  =====
a      b
=====  =====

.. This comment has a body
   that is not part of the document at all, whatever it says.

>>> print("this doctest line is not prose either, not at all")
"""


def test_rst_to_prose():
    paragraphs = prose_paragraphs(RST, "rst")
    assert paragraphs == [
        "krefs allow you to add reference counters to your objects. If you have objects that are used in "
        "multiple places, see the rules and the kref_get() function, or the paper for more.",
        "To use a kref, add one to your data structures like:",
        "The kref can occur anywhere within the data structure, as you like it.",
        "Never call kref_put() on an object you did not get a reference to first.",
        "Increment the reference count of the object that the kref is embedded in.",
        "If you make a non-temporary copy of a pointer, you must increment the refcount.",
        "When you are done with a pointer, you must call the put function on it.",
    ]
    everything = " ".join(rst_paragraphs(RST))
    for absent in ("struct my_data", "Still part", "kref_init", "Adding reference", "Author", "col a",
                   "comment", "doctest", "internal", "Rules", "SPDX", "void kref_get"):
        assert absent not in everything, absent


def test_inline_markup_and_prose_filter():
    assert strip_inline(":c:func:`~kref_put` and :doc:`text <target>` with ``x`` and `y`__ and [#]_ |sub|::") == \
        "kref_put and text with x and y and sub:"
    assert strip_inline("Example: ::") == "Example:"
    assert is_prose("This is an ordinary English sentence about memory management in the kernel.")
    assert not is_prose("Too short to be a paragraph.")
    assert not is_prose("for (i = 0; i < n; i++) { total += a[i]; } is what the loop does here.")
    assert not is_prose("这是一个中文句子，它不应该被当作英文散文来处理，因为它不是英文的内容。这是第二句。")
    assert not is_prose("A list item that does not end like a sentence and goes on for a while")


HTML = """<html><head><title>T</title><style>p {color: red}</style></head><body>
<div class="navheader"><table><tr><td><a href="x.html">Prev</a></td></tr></table></div>
<h2>Synopsis</h2><pre class="synopsis">CREATE TABLE name ( column type );</pre>
<p>CREATE TABLE will create a new, initially empty table in the current database. The table
will be owned by the user issuing the command.</p>
<ul><li><p>Temporary tables are automatically dropped at the end of a session, as documented.</p></li>
<li>Short item.</li></ul>
<script>var notProse = "this script text must never reach the corpus, no matter how long it is.";</script>
</body></html>"""


def test_html_to_prose():
    assert prose_paragraphs(HTML, "html") == [
        "CREATE TABLE will create a new, initially empty table in the current database. The table will be "
        "owned by the user issuing the command.",
        "Temporary tables are automatically dropped at the end of a session, as documented.",
    ]
    assert "Prev" not in html_paragraphs(HTML) and not any("notProse" in p for p in html_paragraphs(HTML))


# -- the corpus build -------------------------------------------------------------------------------
WORDS = ("the kernel driver memory page table lock thread queue device buffer interrupt function value "
         "system user process file data object time list cache state event timer signal request network "
         "packet socket write read call return error check update create remove allocate release").split()


def _prose_doc(rng: np.random.Generator, paragraphs: int) -> str:
    out = []
    for _ in range(paragraphs):
        sentences = []
        for _ in range(rng.integers(2, 5)):
            words = list(rng.choice(WORDS, size=rng.integers(8, 16)))
            sentences.append(" ".join(words).capitalize() + ".")
        out.append(textwrap.fill(" ".join(sentences), 70))
    return "\n\n".join(out)


def _package_tree(root: str, n_docs: int, seed: int = 0) -> str:
    """A fake linux-doc package: Documentation/*.rst.gz, its Sphinx copies, a translation, HTML."""
    rng = np.random.default_rng(seed)
    doc = os.path.join(root, "usr", "share", "doc", "linux-doc-test")
    for i in range(n_docs):
        text = (f"Title {i}\n========\n\n" + _prose_doc(rng, 3)
                + "\n\nShared boilerplate paragraph that appears in every single document of the package verbatim.\n")
        path = os.path.join(doc, "Documentation", f"sub{i % 3}", f"doc{i:03d}.rst.gz")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with gzip.open(path, "wt") as f:
            f.write(text)
        src = os.path.join(doc, "html", "_sources", f"sub{i % 3}", f"doc{i:03d}.rst.txt")
        os.makedirs(os.path.dirname(src), exist_ok=True)
        with open(src, "w") as f:
            f.write(text)
    os.makedirs(os.path.join(doc, "Documentation", "translations", "it_IT"), exist_ok=True)
    with gzip.open(os.path.join(doc, "Documentation", "translations", "it_IT", "x.rst.gz"), "wt") as f:
        f.write(_prose_doc(rng, 3))
    with open(os.path.join(doc, "Documentation", "tiny.rst"), "w") as f:
        f.write("Too little prose.\n")
    with open(os.path.join(doc, "html", "index.html"), "w") as f:
        f.write("<p>An HTML page is ignored when the package has reST documents of its own.</p>")
    return os.path.join(root, "usr", "share", "doc")


def test_find_documents_prefers_rst_then_sources_then_html(tmp_path):
    tree = _package_tree(str(tmp_path / "a"), 4)
    fmt, rels = corpus_mod.find_documents(tree)
    assert fmt == "rst" and all(r.startswith("linux-doc-test/Documentation/") for r in rels)
    assert not any("translations" in r for r in rels) and rels == sorted(rels) and len(rels) == 5
    shutil.rmtree(os.path.join(tree, "linux-doc-test", "Documentation"))
    fmt, rels = corpus_mod.find_documents(tree)
    assert fmt == "rst" and len(rels) == 4 and all("/_sources/" in r for r in rels)
    shutil.rmtree(os.path.join(tree, "linux-doc-test", "html", "_sources"))
    with open(os.path.join(tree, "linux-doc-test", "html", "genindex.html"), "w") as f:
        f.write("<p>index</p>")
    assert corpus_mod.find_documents(tree) == ("html", ["linux-doc-test/html/index.html"])


def test_dedupe_and_split_by_document():
    docs = [corpus_mod.Document(f"pkg:d{i}", [f"Paragraph {i} of real prose here.", "The shared one."]) for i in range(400)]
    kept = corpus_mod.deduplicate(docs, min_doc_chars=10)
    assert [d.paragraphs[-1] for d in kept[:2]] == ["The shared one.", f"Paragraph 1 of real prose here."]
    train, valid = corpus_mod.split_documents(kept, 0.1)
    assert len(train) + len(valid) == 400 and 20 <= len(valid) <= 60       # ~10% of the documents
    assert {d.id for d in train}.isdisjoint(d.id for d in valid)
    # Stable: a document's side depends on its id alone, not on the other documents.
    _, valid_half = corpus_mod.split_documents(kept[:200], 0.1)
    assert [d.id for d in valid_half] == [d.id for d in valid if int(d.id.split("d")[-1]) < 200]
    assert corpus_mod.deduplicate([corpus_mod.Document("x", ["short"])], min_doc_chars=10) == []


def _deb(tmp_path, n_docs: int) -> str:
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb not installed")
    root = tmp_path / "pkgroot"
    _package_tree(str(root), n_docs)
    os.makedirs(root / "DEBIAN")
    (root / "DEBIAN" / "control").write_text(
        "Package: linux-doc-test\nVersion: 1.0-1\nArchitecture: all\nMaintainer: t <t@t>\nDescription: test\n")
    deb = str(tmp_path / "linux-doc-test_1.0-1_all.deb")
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", "-Zgzip", str(root), deb], check=True,
                   capture_output=True)
    return deb


def _build(deb: str, out: str) -> dict:
    args = argparse.Namespace(out=out, work_dir=out + "_build", deb=[deb], packages="", valid_fraction=0.25,
                              min_doc_chars=200, vocab_size=400, workers=1, keep_extracted=False, no_progress=True)
    return corpus_mod.build(args)


def test_build_from_deb_is_reproducible_and_megatron_splits_at_the_held_out_documents(tmp_path):
    from monarch_megatron.data.datasets import build_pretraining_datasets
    from monarch_megatron.data.tokenizer import load_tokenizer

    deb = _deb(tmp_path, 24)
    m1 = _build(deb, str(tmp_path / "c1"))
    m2 = _build(deb, str(tmp_path / "c2"))
    assert corpus_mod.compare(m1, m2) == []
    (pkg,) = m1["packages"]
    assert (pkg["package"], pkg["version"], pkg["format"], pkg["files"]) == ("linux-doc-test", "1.0-1", "rst", 25)
    n_train, n_valid = m1["split"]
    assert n_train + n_valid == m1["documents"]["total"] == 24 and n_valid >= 1  # tiny.rst and the translation dropped
    assert m1["tokens"]["total"] == m1["tokens"]["train"] + m1["tokens"]["valid"] > 0
    assert not os.path.exists(tmp_path / "c1_build" / "extract")
    with open(m1["corpus_jsonl"]["path"]) as f:
        ids = [json.loads(line)["id"] for line in f]
    tsv = (tmp_path / "c1" / "documents.tsv").read_text().splitlines()[1:]
    assert [row.split("\t")[2] for row in tsv] == ids
    assert [row.split("\t")[1] for row in tsv] == ["train"] * n_train + ["valid"] * n_valid
    assert all(corpus_mod.is_validation(i, 0.25) for i in ids[n_train:])
    assert not any(corpus_mod.is_validation(i, 0.25) for i in ids[:n_train])
    with open(m1["corpus_jsonl"]["path"]) as f:
        texts = [json.loads(line)["text"] for line in f]
    assert sum("Shared boilerplate" in t for t in texts) == 1   # kept at its first occurrence only
    # The trainer's split (data.split = the manifest's) gives exactly the held-out documents.
    tok = load_tokenizer(os.path.join(str(tmp_path / "c1"), "corpus.model"))
    for kind in ("gpt", "bert"):
        train, valid = build_pretraining_datasets(m1["prefix"], tok, kind, 32, num_train_samples=8, num_valid_samples=2,
                                                  seed=1, split=tuple(m1["split"]), sentence_order=False)
        assert sorted(train.indices.tolist()) == list(range(n_train)), kind
        assert sorted(valid.indices.tolist()) == list(range(n_train, n_train + n_valid)), kind


# -- time to quality: plan and summary -------------------------------------------------------------
MANIFEST = {"tokens": {"train": 6_000_000, "valid": 300_000, "total": 6_300_000},
            "gpt_tokens_with_eod": {"train": 6_004_000, "valid": 300_236}, "split": [4000, 200],
            "vocab_size": 32768, "prefix": "/data/corpus"}


def _plan_args(**kw) -> argparse.Namespace:
    base = dict(seq=None, micro_batch=None, global_batch=None, steps=None, epochs=2.0, monarch_share=0.8,
                eval_iters=None, evals=25, warmup_fraction=0.05, rewarmup_steps=None)
    return argparse.Namespace(**{**base, **kw})


def test_plan_is_the_same_for_every_arm_and_covers_the_validation_split_once():
    p = ttq.plan(_plan_args(), MANIFEST, ttq.CASES["gpt2-small"])
    assert p["steps"] == round(2 * 6_000_000 / (64 * 1024)) == 183
    assert p["phase_steps"] == [146, 37] and p["steps"] // p["eval_interval"] >= 20
    assert p["eval_iters"] * 16 <= (300_236 - 1) // 1024 < (p["eval_iters"] + 1) * 16
    arms = {a: ttq.phases_override(a, p, ["fc1", "fc2"], 4) for a in ttq.ARMS}
    assert arms["dense"] == ("phases=[{name: dense, steps: 146, monarch: null}, "
                             "{name: dense_cont, steps: 37, monarch: null, optimizer_state: keep}]")
    assert "optimizer_state: keep" in arms["monarch"] and "nblocks: 4" in arms["monarch"]
    assert arms["reverse"].endswith("{name: dense, steps: 37, monarch: null, optimizer_state: fresh, rewarmup_steps: 9}]")


def _metrics(path, arm: str, step_time: float, losses: list[float], switch_seconds: float = 0.0, spike: float = 0.0):
    """10 steps, phases 1-6 / 7-10, validation every 2 steps; ``spike``: extra seconds on step 7."""
    rows = []
    for step in range(1, 11):
        t = step_time + (spike if step == 7 else 0.0)
        rows.append({"kind": "train", "step": step, "phase": 0 if step <= 6 else 1, "lm loss": 5.0, "loss": 5.0,
                     "iteration-time": t, "tokens-per-sec": 1000 / t})
        if step == 6 and arm == "reverse":
            rows.append({"kind": "switch", "step": 6, "val-loss-before": 4.0, "val-loss-after": 4.0,
                         "rel-diff": 0.0, "seconds": switch_seconds})
        if step % 2 == 0:
            rows.append({"kind": "valid", "step": step, "loss": losses[step // 2 - 1], "lm loss": losses[step // 2 - 1]})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _arm_json(out, arm: str, plan: dict, **extra) -> str:
    result = {"case": "gpt2-small", "arm": arm, "label": arm, "returncode": 0, "wall_seconds": 60.0, "plan": plan,
              "metric": "lm loss", "device": "test", "precision": "bf16", "date": "2026-12-03", "git": "x", "seed": 1,
              "corpus": {"packages": ["p 1"], "corpus_jsonl_sha256": "abc", "tokens": MANIFEST["tokens"],
                         "documents": {"valid": 200}, "split": [4000, 200]},
              "metrics_file": f"gpt2-small_{arm}/metrics.jsonl", **extra}
    path = os.path.join(out, f"time_to_quality_gpt2-small_{arm}.json")
    with open(path, "w") as f:
        json.dump(result, f)
    return path


def test_summary_from_metrics_files(tmp_path):
    out = str(tmp_path)
    plan = {"steps": 10, "phase_steps": [6, 4], "tokens_per_step": 1000, "global_batch": 1, "seq": 1000,
            "tokens": 10_000, "epochs": 1.0, "eval_interval": 2, "eval_tokens": 100}
    # dense: 1 s/step, a 5 s graph re-capture on the first step after its keep transition (removed);
    # reverse: 0.5 s/step + a 2 s switch after step 6, reaching dense's final loss (3.0) between steps 8 and 10.
    _metrics(os.path.join(out, "gpt2-small_dense", "metrics.jsonl"), "dense", 1.0, [5, 4.5, 4, 3.5, 3.0], spike=5.0)
    _metrics(os.path.join(out, "gpt2-small_monarch", "metrics.jsonl"), "monarch", 0.5, [5.5, 5, 4.5, 4, 3.6])
    _metrics(os.path.join(out, "gpt2-small_reverse", "metrics.jsonl"), "reverse", 0.5, [5.5, 5, 4.5, 3.2, 2.98],
             switch_seconds=2.0)
    for arm in ttq.ARMS:
        _arm_json(out, arm, plan)
    results = ttq.load_results([out])
    assert [r["arm"] for r in results] == ["dense", "monarch", "reverse"]
    dense, monarch, reverse = results
    assert dense["train_seconds"] == pytest.approx(10.0) and dense["keep_transition_excess_seconds"] == pytest.approx(5.0)
    assert reverse["train_seconds"] == pytest.approx(7.0)                      # 10 x 0.5 + the 2 s switch
    assert [pt["seconds"] for pt in reverse["points"]] == pytest.approx([1.0, 2.0, 3.0, 6.0, 7.0])
    assert reverse["switch"][0]["seconds"] == pytest.approx(3.0) and reverse["switch"][0]["switch_seconds"] == 2.0

    s = ttq.write_summary(results, out)["gpt2-small"]
    assert s["dense_final_loss"] == 3.0 and s["consistency_problems"] == []
    rv, mv, dv = s["arms"]["reverse"], s["arms"]["monarch"], s["arms"]["dense"]
    assert rv["final_loss"] == 2.98 and rv["perplexity"] == pytest.approx(np.exp(2.98))
    assert rv["vs_dense"] == pytest.approx(-0.02 / 3.0)
    # Crossing 3.0 between (step 8, 6.0 s, 3.2) and (step 10, 7.0 s, 2.98): 6 + 0.2 / 0.22 s.
    assert rv["reaches_dense_final"]["step"] == 10
    assert rv["reaches_dense_final"]["seconds_interpolated"] == pytest.approx(6.0 + 0.2 / 0.22)
    assert rv["time_ratio_vs_dense"] == pytest.approx((6.0 + 0.2 / 0.22) / 10.0)
    assert dv["time_ratio_vs_dense"] == pytest.approx(1.0)
    assert mv["reaches_dense_final"] is None and mv["vs_dense"] == pytest.approx(0.2)
    assert s["targets"] == {"reverse_final_loss_within_1pct": True, "reverse_time_ratio_le_1/1.4": True,
                            "monarch_final_loss_within_5pct": False}
    table = open(os.path.join(out, "time_to_quality.md")).read()
    assert "| reverse sparsification (Monarch, then dense) | 2.9800 | 19.69 | -0.67% | 7.0 |" in table
    assert "**0.69x**" in table and "| Monarch throughout | 3.6000 |" in table and "never" in table
    merged = json.load(open(os.path.join(out, "time_to_quality.json")))
    assert len(merged["results"]) == 3 and merged["summary"]["gpt2-small"]["targets"] == s["targets"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert os.path.getsize(os.path.join(out, "time_to_quality.png")) > 10_000


def test_merge_flags_arms_that_are_not_comparable_and_failed_arms(tmp_path):
    out = str(tmp_path)
    plan = {"steps": 10, "phase_steps": [6, 4], "tokens_per_step": 1000, "eval_interval": 2}
    _metrics(os.path.join(out, "gpt2-small_dense", "metrics.jsonl"), "dense", 1.0, [5, 4.5, 4, 3.5, 3.0])
    _metrics(os.path.join(out, "gpt2-small_reverse", "metrics.jsonl"), "reverse", 0.5, [5, 4.5, 4, 3.5, 3.0])
    _arm_json(out, "dense", plan)
    _arm_json(out, "reverse", {**plan, "steps": 12}, seed=2)
    _arm_json(out, "monarch", plan, returncode=1, metrics_file=None)
    s = ttq.summarise(ttq.load_results([out]))["gpt2-small"]
    assert s["arms"]["monarch"] == {"failed": True, "returncode": 1}
    assert any("plan" in p for p in s["consistency_problems"]) and any("seed" in p for p in s["consistency_problems"])
    assert "failed (exit 1)" in ttq.markdown({"gpt2-small": s}) and "WARNING" in ttq.markdown({"gpt2-small": s})
