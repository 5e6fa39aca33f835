"""Hugging Face interop (launcher/export_hf.py, launcher/import_hf.py) on CPU, fp32, no downloads.

Tiny models are built locally with transformers (random weights, LayerNorms and biases perturbed
so that a mapping mistake shows) and saved with save_pretrained. Checked, for GPT2LMHeadModel and
MegatronBertForPreTraining alike:
* import: our megatron model (strict load) gives transformers' logits (and BERT's binary-head
  logits), relative 1e-5; a TP=2 import is the TP=1 import sharded (bitwise); export of both gives
  back the original tensors bitwise; legacy files (no base-model prefix, causal-mask buffers,
  pytorch_model.bin, a tied lm_head copy) import the same;
* dense-to-sparse fine-tuning end to end: import -> convert_checkpoint --to monarch -> 20 steps of
  sparse training from training.init_from -> exact in-job switch -> export of the dense checkpoint
  (TP=1, and TP=2 through convert_checkpoint) and of the Monarch one (TP=1 and TP=2, converted on
  the way) -> transformers' logits equal our dense and Monarch models' (relative 1e-4), the TP=2
  exports equal the TP=1 ones bitwise, and re-import gives the trained weights back;
* the tokenizer: found through the run's config.yaml or the checkpoint's provenance; the exported
  one (AutoTokenizer) gives the sentencepiece ids, with BERT's [CLS] A [SEP] B [SEP];
* refusals (exit code 2, one message, nothing written; export's before any weights are read):
  missing directory, another architecture, other activations, untied head, per-layer attention
  scaling, tanh GELU / another epsilon without --accept-approximation, unreadable weights, BERT
  without the binary head, unknown model settings, unknown or mismatched tokenizer, existing output.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from tiny_demo import DATA, DEMO, ROOT, TINY_MODEL  # noqa: E402

VOCAB, SEQ = 4096, 32  # the demo tokenizer's vocabulary; TINY_MODEL's positions
GPT = dict(n_layer=1, n_embd=32, n_head=2, n_inner=64, n_positions=SEQ, activation_function="gelu_new")  # GPT-2: tanh GELU
BERT = dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=SEQ, layer_norm_eps=1e-5)
SPARSE_STEPS = 20
SENTENCES = ["Monarch matrices are products of block-diagonal matrices.",
             "  Whitespace\tand   naïve café ﬁ ① 😀 中文 ",
             "x = [i**2 for i in range(10)]  # 9,000 ``quoted''"]


def _cli(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "launcher", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


EXPORT, IMPORT, CONVERT = _cli("export_hf"), _cli("import_hf"), _cli("convert_checkpoint")


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name.lower() and name.endswith("weight"):  # LayerNorm scales
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.1 if name.endswith("bias") else 0.3))
    return model.eval()


def _tokenizer_model() -> str:
    from monarch_megatron.data.demo_corpus import prepare_demo_data

    return prepare_demo_data(DATA, VOCAB)[1]  # built once for all test modules


def _module(path: str, rank: int = 0) -> dict:
    return torch.load(os.path.join(path, f"mp_rank_{rank:02d}_model_states.pt"), map_location="cpu",
                      weights_only=False)["module"]


def _hf_tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    """Tiny HF models on disk (a GPT-2 with the demo tokenizer's files), each imported (TP=1),
    projected to Monarch (nblocks 2) and fine-tuned sparse in this process (20 steps, then the
    switch and one dense step); then a TP=1 process group for the comparisons."""
    from transformers import GPT2Config, GPT2LMHeadModel, MegatronBertConfig, MegatronBertForPreTraining

    from monarch_megatron.convert.hf_tokenizer import inspect_tokenizer, write_tokenizer
    from monarch_megatron.training.config import load_config
    from monarch_megatron.training.run import train

    root = tmp_path_factory.mktemp("hf")
    tokenizer = _tokenizer_model()
    hf = {"gpt": _randomize(GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, bos_token_id=5, eos_token_id=5, **GPT)), 1),
          "bert": _randomize(MegatronBertForPreTraining(MegatronBertConfig(vocab_size=VOCAB, **BERT)), 2)}
    paths = {}
    for kind, model in hf.items():
        p = paths[kind] = {k: str(root / f"{kind}_{k}") for k in ("hf", "tp1", "projected", "run")}
        model.save_pretrained(p["hf"])
        if kind == "gpt":  # a complete HF directory, tokenizer included
            write_tokenizer(inspect_tokenizer(tokenizer), p["hf"], "gpt", SEQ)
        assert IMPORT(["--model", p["hf"], "--output", p["tp1"]]) == 0
        assert CONVERT(["--input", p["tp1"], "--output", p["projected"], "--to", "monarch", "--nblocks", "2"]) == 0
        cfg = load_config(DEMO, [
            f"output_dir={p['run']}", *TINY_MODEL, f"model.kind={kind}", f"training.init_from={p['projected']}",
            f"training.total_steps={SPARSE_STEPS + 1}", "training.log_interval=100", "training.eval_interval=100",
            "training.eval_iters=1", "training.save_interval=100",
            f"phases=[{{name: sparse, steps: {SPARSE_STEPS}, monarch: {{nblocks: 2}}}}, "
            "{name: dense, steps: 1, monarch: null, rewarmup_steps: 0}]"])
        assert train(cfg)["step"] == SPARSE_STEPS + 1  # ends with the process group destroyed
        ckpts = os.path.join(p["run"], "checkpoints")
        p["monarch"] = os.path.join(ckpts, f"step{SPARSE_STEPS:07d}-sparse")
        p["dense"] = os.path.join(ckpts, f"step{SPARSE_STEPS:07d}-dense")  # saved at the switch

    import torch.distributed as dist

    from monarch_megatron.parallel import init_tensor_parallel
    from monarch_megatron.parallel.distributed import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    init_tensor_parallel(1)
    yield {"paths": paths, "root": root, "hf": hf, "tokenizer": tokenizer}
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def _our_model(ckpt: str, monarch_nblocks: int | None = None):
    from monarch_megatron.models import ModelConfig, MonarchConfig, build_model

    state = json.load(open(os.path.join(ckpt, "run_state.json")))
    monarch = MonarchConfig(nblocks=monarch_nblocks) if monarch_nblocks else None
    model = build_model(ModelConfig(**state["model"]), monarch)
    model.load_state_dict(_module(ckpt), strict=True)
    return model.eval()


def _batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    padding = torch.ones(3, SEQ, dtype=torch.long)
    padding[1, SEQ - 9:] = 0
    return {"ids": torch.randint(0, VOCAB, (3, SEQ), generator=g), "padding": padding,
            "types": (torch.arange(SEQ) >= 13).long().expand(3, SEQ).clone()}


@torch.no_grad()
def _ours(model, kind: str, b: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits over the real vocabulary ``[b, s, VOCAB]`` (and BERT's binary logits ``[b, 2]``)."""
    if kind == "gpt":
        return model(b["ids"], torch.arange(SEQ).expand_as(b["ids"]), None)[..., :VOCAB], None
    logits, binary = model(b["ids"], b["padding"], tokentype_ids=b["types"])
    return logits[..., :VOCAB], binary


@torch.no_grad()
def _theirs(model, kind: str, b: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    if kind == "gpt":
        return model(input_ids=b["ids"]).logits, None
    out = model(input_ids=b["ids"], attention_mask=b["padding"], token_type_ids=b["types"])
    return out.prediction_logits, out.seq_relationship_logits


def _hf_model(kind: str, path: str):
    from transformers import GPT2LMHeadModel, MegatronBertForPreTraining

    return (GPT2LMHeadModel if kind == "gpt" else MegatronBertForPreTraining).from_pretrained(path).eval()


# -- import ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gpt", "bert"])
def test_import_gives_transformers_logits_and_exports_back_bitwise_at_tp1_and_tp2(work, kind):
    from monarch_megatron.checkpointing.tp import merge_tp

    p, hf, root = work["paths"][kind], work["hf"][kind], work["root"]
    tp2 = str(root / f"{kind}_tp2")
    assert IMPORT(["--model", p["hf"], "--output", tp2, "--tensor-parallel", "2"]) == 0
    state = json.load(open(os.path.join(tp2, "run_state.json")))
    assert state["phase_kind"] == "dense" and state["tensor_model_parallel_size"] == 2
    assert state["converted_from"]["tool"] == "launcher/import_hf.py"

    b = _batch(3)
    ours, binary = _ours(_our_model(p["tp1"]), kind, b)
    theirs, their_binary = _theirs(hf, kind, b)
    assert _rel(ours, theirs) < 1e-5
    if kind == "bert":
        assert _rel(binary, their_binary) < 1e-5
    one, two = _module(p["tp1"]), merge_tp([_module(tp2, r) for r in range(2)])
    assert list(one) == list(two)
    assert all(torch.equal(one[k], two[k]) if torch.is_tensor(one[k]) else two[k] is None for k in one)

    # Export of both imports: the original tensors, bitwise, in a directory transformers loads.
    # The GPT-2 directory has tokenizer files: found through the import's provenance and copied.
    original = _hf_tensors(p["hf"])  # as save_pretrained wrote them
    tokenizer = [] if kind == "gpt" else ["--tokenizer", work["tokenizer"]]
    for ckpt in (p["tp1"], tp2):
        out = ckpt + "_hf"
        assert EXPORT(["--checkpoint", ckpt, "--output", out, *tokenizer]) == 0
        exported = _hf_tensors(out)
        assert sorted(exported) == sorted(original)
        assert all(torch.equal(exported[k], original[k]) for k in original)
    if kind == "gpt":
        files = ("tokenizer.json", "tokenizer_config.json", "sentencepiece.model")
        same = [open(os.path.join(out, n), "rb").read() == open(os.path.join(p["hf"], n), "rb").read() for n in files]
        assert all(same), files
    assert _rel(_theirs(_hf_model(kind, out), kind, b)[0], theirs) == 0.0


# -- dense -> sparse fine-tuning -> dense -> export ---------------------------------------------
@pytest.mark.parametrize("kind", ["gpt", "bert"])
def test_sparse_fine_tuning_round_trip_exports_the_trained_model(work, kind):
    p, root = work["paths"][kind], work["root"]
    tp2 = {k: str(root / f"{kind}_{k}_tp2") for k in ("dense", "monarch")}
    assert CONVERT(["--input", p["dense"], "--output", tp2["dense"], "--to", "dense", "--tensor-parallel", "2"]) == 0
    assert CONVERT(["--input", p["monarch"], "--output", tp2["monarch"], "--to", "monarch",
                    "--tensor-parallel", "2"]) == 0
    exports = {}
    for name, ckpt in (("dense", p["dense"]), ("monarch", p["monarch"]), ("dense_tp2", tp2["dense"]),
                       ("monarch_tp2", tp2["monarch"])):
        # The tokenizer is found through the run's config.yaml, or through convert's provenance (TP=2).
        exports[name] = str(root / f"{kind}_{name}_hf")
        assert EXPORT(["--checkpoint", ckpt, "--output", exports[name]]) == 0
    tensors = {name: _hf_tensors(path) for name, path in exports.items()}
    dense, mon = tensors["dense"], tensors["monarch"]
    for name, other in (("dense_tp2", "dense"), ("monarch_tp2", "monarch")):
        assert sorted(tensors[name]) == sorted(tensors[other])
        assert all(torch.equal(tensors[name][k], tensors[other][k]) for k in tensors[other]), name
    assert all(_rel(mon[k], dense[k]) < 1e-5 for k in dense)  # the switch and the export's conversion agree
    fc1 = next(k for k in _module(p["monarch"]) if k.endswith("linear_fc1.blkdiag1"))
    assert _rel(_module(p["monarch"])[fc1], _module(p["projected"])[fc1]) > 1e-3  # it trained

    b = _batch(4)
    hf_dense = _theirs(_hf_model(kind, exports["dense"]), kind, b)
    hf_monarch = _theirs(_hf_model(kind, exports["monarch"]), kind, b)
    ours_dense = _ours(_our_model(p["dense"]), kind, b)
    ours_monarch = _ours(_our_model(p["monarch"], monarch_nblocks=2), kind, b)
    for i in range(2 if kind == "bert" else 1):  # LM logits, and BERT's binary-head logits
        assert _rel(hf_dense[i], ours_dense[i]) < 1e-4
        assert _rel(hf_dense[i], ours_monarch[i]) < 1e-4  # the in-job switch was exact
        assert _rel(hf_monarch[i], ours_monarch[i]) < 1e-4

    # Round trip: re-importing the export gives the trained weights (padding rows are cut on export).
    again = str(root / f"{kind}_reimported")
    assert IMPORT(["--model", exports["dense"], "--output", again]) == 0
    a, d = _module(again), _module(p["dense"])
    assert list(a) == list(d)
    for k, v in d.items():
        if torch.is_tensor(v):
            rows = VOCAB if k in ("embedding.word_embeddings.weight", "output_layer.bias") else v.shape[0]
            assert torch.equal(a[k][:rows], v[:rows]), k


# -- tokenizer -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "gpt"])
def test_exported_tokenizer_gives_the_sentencepiece_ids(work, tmp_path, kind):
    from transformers import AutoTokenizer

    from monarch_megatron.convert.hf_tokenizer import inspect_tokenizer, write_tokenizer
    from monarch_megatron.data.tokenizer import SentencePieceTokenizer

    sp = SentencePieceTokenizer(work["tokenizer"])
    out = work["paths"]["gpt"]["hf"] if kind == "gpt" else str(tmp_path)
    if kind == "bert":
        shutil.copyfile(os.path.join(work["paths"]["bert"]["hf"], "config.json"), os.path.join(out, "config.json"))
        write_tokenizer(inspect_tokenizer(work["tokenizer"]), out, "bert", SEQ)
    tok = AutoTokenizer.from_pretrained(out)
    for text in SENTENCES:
        ids = sp.encode(text)
        assert tok(text, add_special_tokens=False)["input_ids"] == ids
        assert tok.decode(ids) == sp.normalize(text)
    a, b = sp.encode(SENTENCES[0]), sp.encode(SENTENCES[1])
    if kind == "bert":
        pair = tok(SENTENCES[0], SENTENCES[1])
        assert pair["input_ids"] == [sp.cls, *a, sp.sep, *b, sp.sep]
        assert pair["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)
        assert tok("[MASK] here")["input_ids"][:2] == [sp.cls, sp.mask]
    else:
        assert tok(SENTENCES[0])["input_ids"] == a and "token_type_ids" not in tok(SENTENCES[0])
        assert tok.eos_token_id == sp.eod and tok.pad_token_id == sp.pad


def test_import_reads_legacy_layouts_and_checks_tied_copies(work, tmp_path, capsys):
    """Files saved from the base model (no ``transformer.`` prefix, causal-mask buffers, .bin) and
    files holding the tied ``lm_head.weight`` import to the same checkpoint; an untied copy is refused."""
    from safetensors.torch import save_file

    src = work["paths"]["gpt"]["hf"]
    tensors = _hf_tensors(src)
    legacy = str(tmp_path / "legacy")
    shutil.copytree(src, legacy, ignore=shutil.ignore_patterns("model.safetensors"))
    old = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    old.update({"h.0.attn.bias": torch.ones(1, 1, SEQ, SEQ).tril(), "h.0.attn.masked_bias": torch.tensor(-1e4)})
    torch.save(old, os.path.join(legacy, "pytorch_model.bin"))
    assert IMPORT(["--model", legacy, "--output", str(tmp_path / "a")]) == 0
    tied = str(tmp_path / "tied")
    shutil.copytree(src, tied)
    wte = tensors["transformer.wte.weight"]
    save_file({**tensors, "lm_head.weight": wte.clone()}, os.path.join(tied, "model.safetensors"))
    assert IMPORT(["--model", tied, "--output", str(tmp_path / "b")]) == 0
    reference = _module(work["paths"]["gpt"]["tp1"])
    for out in ("a", "b"):
        got = _module(str(tmp_path / out))
        assert list(got) == list(reference)
        assert all(torch.equal(got[k], v) for k, v in reference.items() if torch.is_tensor(v))
    save_file({**tensors, "lm_head.weight": wte + 1}, os.path.join(tied, "model.safetensors"))
    capsys.readouterr()
    assert IMPORT(["--model", tied, "--output", str(tmp_path / "c")]) == 2
    assert "lm_head.weight differs from transformer.wte.weight" in _one_error(capsys, "import_hf")


# -- refusals --------------------------------------------------------------------------------------
def _edited_hf_copy(src: str, dst: str, **changes) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    config = json.load(open(path))
    config.update(changes)
    json.dump(config, open(path, "w"))
    return dst


def _one_error(capsys, prefix: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prefix}: error: "), err
    return err[0]


def test_import_refusals(work, tmp_path, capsys):
    gpt2 = work["paths"]["gpt"]["hf"]
    out = str(tmp_path / "out")
    assert IMPORT(["--model", str(tmp_path / "nope"), "--output", out]) == 2
    assert "is not a directory" in _one_error(capsys, "import_hf")
    other = _edited_hf_copy(gpt2, str(tmp_path / "other"), architectures=["GPT2ForSequenceClassification"])
    assert IMPORT(["--model", other, "--output", out]) == 2
    assert "import_hf reads GPT2LMHeadModel (gpt2) and MegatronBertForPreTraining" in _one_error(capsys, "import_hf")
    for name, change in (("untied", {"tie_word_embeddings": False}), ("relu", {"activation_function": "relu"}),
                         ("layer_scaled", {"scale_attn_by_inverse_layer_idx": True})):
        edited = _edited_hf_copy(gpt2, str(tmp_path / name), **change)
        assert IMPORT(["--model", edited, "--output", out, "--accept-approximation"]) == 2
        key, value = next(iter(change.items()))
        assert f"GPT2LMHeadModel with {key}={value!r}" in _one_error(capsys, "import_hf")
    tanh = _edited_hf_copy(gpt2, str(tmp_path / "tanh"), activation_function="gelu_new", layer_norm_epsilon=1e-6)
    assert IMPORT(["--model", tanh, "--output", out]) == 2
    assert "LayerNorm epsilon 1e-06" in _one_error(capsys, "import_hf")
    assert "out" not in os.listdir(tmp_path)  # nothing written
    assert IMPORT(["--model", tanh, "--output", out, "--accept-approximation", "--tensor-parallel", "3"]) == 2
    assert "does not divide num_attention_heads 2" in _one_error(capsys, "import_hf")
    assert IMPORT(["--model", tanh, "--output", out, "--accept-approximation"]) == 0
    imported = json.load(open(os.path.join(out, "run_state.json")))
    assert [a for a in imported["converted_from"]["approximations"] if "epsilon 1e-06" in a]
    assert imported["model"]["activation"] == "gelu_tanh"  # GPT-2's tanh GELU is ours exactly
    assert IMPORT(["--model", tanh, "--output", out, "--accept-approximation"]) == 2
    assert "exists; pass --force" in _one_error(capsys, "import_hf")
    weights = os.path.join(tanh, "model.safetensors")
    os.truncate(weights, os.path.getsize(weights) // 2)
    assert IMPORT(["--model", tanh, "--output", str(tmp_path / "out2"), "--accept-approximation"]) == 2
    assert "are unreadable" in _one_error(capsys, "import_hf") and "out2" not in os.listdir(tmp_path)


def test_export_refusals_come_before_reading_weights(work, tmp_path, capsys):
    src = work["paths"]["gpt"]["tp1"]
    state = json.load(open(os.path.join(src, "run_state.json")))
    fake = tmp_path / "no_binary_head"
    fake.mkdir()
    (fake / "mp_rank_00_model_states.pt").write_bytes(b"not read")
    bert = {**state["model"], "kind": "bert", "sentence_order": False}
    json.dump({**state, "model": bert}, open(fake / "run_state.json", "w"))
    out = str(tmp_path / "out")
    assert EXPORT(["--checkpoint", str(fake), "--output", out, "--tokenizer", work["tokenizer"]]) == 2
    assert "model.sentence_order: false" in _one_error(capsys, "export_hf")
    json.dump({**state, "model": {**state["model"], "normalization": "RMSNorm"}}, open(fake / "run_state.json", "w"))
    assert EXPORT(["--checkpoint", str(fake), "--output", out, "--tokenizer", work["tokenizer"]]) == 2
    assert "settings this exporter does not know: ['normalization']" in _one_error(capsys, "export_hf")
    json.dump({**state, "model": {**state["model"], "activation": "swiglu"}}, open(fake / "run_state.json", "w"))
    assert EXPORT(["--checkpoint", str(fake), "--output", out, "--tokenizer", work["tokenizer"]]) == 2
    assert "activation must be one of ('gelu', 'gelu_tanh')" in _one_error(capsys, "export_hf")
    json.dump({**state, "converted_from": {"path": str(tmp_path / "gone")}}, open(fake / "run_state.json", "w"))
    assert EXPORT(["--checkpoint", str(fake), "--output", out]) == 2
    assert "pass --tokenizer" in _one_error(capsys, "export_hf")
    json.dump({**state, "model": {**state["model"], "vocab_size": 1000}}, open(fake / "run_state.json", "w"))
    assert EXPORT(["--checkpoint", str(fake), "--output", out, "--tokenizer", work["tokenizer"]]) == 2
    assert "has 4096 tokens but the model only 1000" in _one_error(capsys, "export_hf")
    assert EXPORT(["--checkpoint", str(tmp_path / "nope"), "--output", out]) == 2
    assert "is not a directory" in _one_error(capsys, "export_hf")
    assert sorted(os.listdir(tmp_path)) == ["no_binary_head"]  # nothing written
