"""launcher/convert_checkpoint.py on real trainer checkpoints (CPU, gloo, fp32).

One tiny two-phase run at TP=2 (Monarch nblocks=2 for 2 steps, then dense for 2) provides a
Monarch checkpoint and a dense one. Checked:
* TP=2 Monarch -> TP=1 dense (and -> TP=2 dense, loaded through DeepSpeed's load_checkpoint)
  gives the Monarch model's logits and loss (relative 1e-5);
* launcher/evaluate.py gives the same val_loss on the Monarch checkpoint (2 processes) and on its
  dense conversion (1 process), relative 1e-4;
* the dense output loads with strict=True into a plain megatron-core BertModel built from
  megatron's local layer spec in a process that never imports monarch_megatron;
* dense (TP=2) -> Monarch nblocks=4 (TP=1): the printed and the actual relative errors equal the
  optimum, computed here from per-block truncated SVDs in float64 with an independent Monarch
  multiply written from DESIGN.md's semantics;
* bad input (truncated .pt, missing run_state.json / model file, incomplete checkpoint) and an
  existing output: exit code 2, one message, input unchanged, nothing written.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from tiny_demo import DEMO, ROOT, subprocess_env, tiny_overrides

OVERRIDES = tiny_overrides(
    "training.global_batch_size=4", "training.total_steps=4", "training.eval_iters=1", "training.eval_interval=100",
    "training.save_interval=100", "phases.0.share=0.5", "phases.0.monarch.nblocks=2", "phases.1.share=0.5",
    "phases.1.rewarmup_steps=0",
)
MONARCH_TAG, DENSE_TAG = "step0000002-monarch", "step0000004-dense"
LINEAR = {"linear_qkv": "column", "linear_fc1": "column", "linear_proj": "row", "linear_fc2": "row"}


def _cli():
    spec = importlib.util.spec_from_file_location("convert_checkpoint_cli", os.path.join(ROOT, "launcher", "convert_checkpoint.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CLI = _cli()


def convert(*argv: str) -> int:
    return CLI.main(list(argv))


def _torchrun(n: int, script: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
            os.path.join(ROOT, "launcher", script), *args]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """The trained run and its conversions: paths by name."""
    base = tmp_path_factory.mktemp("convert")
    out = str(base / "run")
    cmd = _torchrun(2, "pretrain.py", "--config", DEMO, f"output_dir={out}", "parallel.tensor_model_parallel_size=2",
                    *OVERRIDES)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpts = os.path.join(out, "checkpoints")
    paths = {"out": out, "monarch": os.path.join(ckpts, MONARCH_TAG), "dense": os.path.join(ckpts, DENSE_TAG),
             "dense_tp1": str(base / "dense_tp1"), "dense_tp2": os.path.join(ckpts, "converted-dense-tp2")}
    assert convert("--input", paths["monarch"], "--output", paths["dense_tp1"], "--to", "dense", "--tensor-parallel", "1") == 0
    assert convert("--input", paths["monarch"], "--output", paths["dense_tp2"], "--to", "dense") == 0
    return paths


def _load(path: str, rank: int = 0) -> dict:
    return torch.load(os.path.join(path, f"mp_rank_{rank:02d}_model_states.pt"), map_location="cpu", weights_only=False)


def _random_batch(vocab: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, s = 3, 32
    padding = torch.ones(b, s, dtype=torch.long)
    padding[1, s - 7:] = 0
    return dict(text=torch.randint(0, vocab, (b, s), generator=g), types=(torch.arange(s) >= 13).long().expand(b, s).clone(),
                labels=torch.randint(0, vocab, (b, s), generator=g), padding_mask=padding,
                loss_mask=(torch.rand(b, s, generator=g) < 0.3).float() * padding,
                is_random=torch.randint(0, 2, (b,), generator=g))


def _logits_and_loss(model, batch) -> tuple[torch.Tensor, float]:
    """Full-vocabulary logits [b, s, V] (gathered over TP) and the forward_step loss."""
    from megatron.core import parallel_state

    from monarch_megatron.models import forward_step

    model.eval()
    with torch.no_grad():
        logits, _ = model(batch["text"], batch["padding_mask"], tokentype_ids=batch["types"])
        loss, _ = forward_step(model, batch, "bert")
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1), float(loss)


def _equivalence_worker(rank: int, world: int, paths: dict, seed: int) -> dict:
    """Monarch TP=2 (from the trainer), dense TP=1 (converted, plain load), dense TP=2 (converted,
    loaded through DeepSpeed's load_checkpoint as the trainer does)."""
    from monarch_megatron.models import ModelConfig, MonarchConfig, build_model
    from monarch_megatron.parallel import init_tensor_parallel
    from monarch_megatron.training.checkpoint import CheckpointManager
    from monarch_megatron.training.config import load_config
    from monarch_megatron.training.distributed import current_layout
    from monarch_megatron.training.loop import Trainer
    from monarch_megatron.training.phases import build_plan
    from monarch_megatron.training.switch import build_phase_engine

    state = json.load(open(os.path.join(paths["monarch"], "run_state.json")))
    model_cfg = ModelConfig(**state["model"])
    batch = _random_batch(model_cfg.vocab_size, seed)
    out = {}
    init_tensor_parallel(2)
    model = build_model(model_cfg, MonarchConfig(nblocks=2), "fp32")
    model.load_state_dict(_load(paths["monarch"], rank)["module"], strict=True)
    out["monarch_tp2"] = _logits_and_loss(model, batch)

    cfg = load_config(DEMO, [f"output_dir={paths['out']}", "parallel.tensor_model_parallel_size=2", *OVERRIDES], world_size=2)
    dense_phase = build_plan(cfg)[1]
    engine, _ = build_phase_engine(cfg, Trainer.model_config(cfg), dense_phase, current_layout(), None)
    CheckpointManager(paths["out"], current_layout(), 3).load(engine, os.path.basename(paths["dense_tp2"]), load_optimizer=False)
    out["dense_tp2_deepspeed"] = _logits_and_loss(engine.module, batch)

    init_tensor_parallel(1)
    model = build_model(model_cfg, None, "fp32")
    model.load_state_dict(_load(paths["dense_tp1"])["module"], strict=True)
    out["dense_tp1"] = _logits_and_loss(model, batch)
    return out


def test_tp2_monarch_to_dense_gives_the_models_logits_and_loss(run):
    from monarch_megatron.parallel import spawn

    results = spawn(_equivalence_worker, 2, run, int(torch.randint(0, 2**31, ())))  # fresh inputs, same on both ranks
    for res in results:
        ref_logits, ref_loss = res["monarch_tp2"]
        for name in ("dense_tp1", "dense_tp2_deepspeed"):
            logits, loss = res[name]
            rel = float((logits - ref_logits).abs().max() / ref_logits.abs().max())
            assert rel < 1e-5, f"{name}: logits differ by {rel:.2e} (relative to max |logit|)"
            assert abs(loss - ref_loss) / abs(ref_loss) < 1e-5, f"{name}: loss {loss} vs Monarch {ref_loss}"


def test_converted_run_state_records_phase_kind_tp_and_provenance(run):
    mon = json.load(open(os.path.join(run["monarch"], "run_state.json")))
    dense = json.load(open(os.path.join(run["dense_tp1"], "run_state.json")))
    assert mon["phase_kind"] == "monarch" and mon["tensor_model_parallel_size"] == 2
    assert dense["phase_kind"] == "dense" and dense["monarch"] is None and dense["tensor_model_parallel_size"] == 1
    assert dense["complete"] and dense["step"] == mon["step"] and dense["phase_index"] == mon["phase_index"]
    prov = dense["converted_from"]
    assert prov["phase_kind"] == "monarch" and prov["tensor_model_parallel_size"] == 2 and prov["monarch"] == mon["monarch"]
    assert sorted(os.listdir(run["dense_tp1"])) == ["mp_rank_00_model_states.pt", "run_state.json"]
    assert _load(run["dense_tp1"])["optimizer"] is None


def _val_loss(proc: subprocess.Popen) -> float:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("val_loss="), stdout[-2000:]
    return float(last.split("=", 1)[1])


def test_evaluate_gives_the_same_val_loss_for_monarch_and_its_dense_conversion(run):
    common = ["--config", DEMO, f"output_dir={run['out']}", *OVERRIDES]
    mon = subprocess.Popen(_torchrun(2, "evaluate.py", "--checkpoint", run["monarch"], *common,
                                     "parallel.tensor_model_parallel_size=2"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    dense = subprocess.Popen([sys.executable, os.path.join(ROOT, "launcher", "evaluate.py"), "--checkpoint",
                              run["dense_tp1"], *common], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    a, b = _val_loss(mon), _val_loss(dense)
    assert abs(a - b) / abs(a) < 1e-4, f"val_loss Monarch {a} vs dense conversion {b}"


PLAIN_MEGATRON = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
    dist.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state
    from megatron.core.models.bert import bert_layer_specs
    from megatron.core.models.bert.bert_model import BertModel
    from megatron.core.transformer.transformer_config import TransformerConfig
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    ckpt = sys.argv[1]
    m = json.load(open(os.path.join(ckpt, "run_state.json")))["model"]
    get_spec = getattr(bert_layer_specs, "get_bert_layer_local_spec", None)
    spec = get_spec() if get_spec else bert_layer_specs.bert_layer_local_spec
    config = TransformerConfig(num_layers=m["num_layers"], hidden_size=m["hidden_size"],
                               num_attention_heads=m["num_attention_heads"], ffn_hidden_size=m["ffn_hidden_size"],
                               use_cpu_initialization=True, perform_initialization=False)
    div = m["make_vocab_size_divisible_by"]
    model = BertModel(config=config, num_tokentypes=2, transformer_layer_spec=spec,
                      vocab_size=-(-m["vocab_size"] // div) * div, max_sequence_length=m["max_position_embeddings"],
                      add_binary_head=m["sentence_order"], share_embeddings_and_output_weights=True, parallel_output=True)
    state = torch.load(os.path.join(ckpt, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)["module"]
    model.load_state_dict(state, strict=True)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if torch.is_tensor(v))
    assert not [name for name in sys.modules if name.startswith("monarch_megatron")]
    print("LOADED", len(state))
""")


def test_dense_output_loads_into_plain_megatron_core_bert_without_project_code(run, tmp_path):
    from monarch_megatron.parallel.distributed import free_port

    script = tmp_path / "plain.py"
    script.write_text(PLAIN_MEGATRON)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(script), run["dense_tp1"], str(free_port())], capture_output=True,
                          text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED" in proc.stdout


# -- projection error: independent float64 reference ---------------------------------------------
def _reference_monarch_dense(w1: torch.Tensor, w2: torch.Tensor, n_in: int, n_out: int, perm: bool) -> torch.Tensor:
    """(n_out, n_in) matrix of factors w1 (k,q,p), w2 (l,s,r), straight from DESIGN.md's definition."""
    w1, w2 = w1.double(), w2.double()
    k, q, p = w1.shape
    l, s, r = w2.shape
    x = torch.eye(n_in, k * p, dtype=torch.float64).view(n_in, k, p)  # row c = basis vector e_c
    u = torch.einsum("iqp,nip->niq", w1, x).reshape(n_in, k * q)  # u[i*q + c]
    v = u.reshape(n_in, r, l).transpose(1, 2)  # v[j][m] = u[m*l + j]
    y = torch.einsum("jsr,njr->njs", w2, v)
    out = y.transpose(1, 2).reshape(n_in, s * l) if perm else y.reshape(n_in, l * s)
    return out[:, :n_out].t()


def _optimal_error(weight: torch.Tensor, nblocks: int, perm: bool) -> float:
    """min ||W - M||_F / ||W||_F over Monarch M: per (input block i, output block j) sub-block, the
    singular values beyond the number of intermediate channels joining i to j."""
    n_out, n_in = weight.shape
    p, s = -(-n_in // nblocks), -(-n_out // nblocks)
    k = l = nblocks
    q = p if p < s else s
    w = torch.zeros(l * s, k * p, dtype=torch.float64)
    w[:n_out, :n_in] = weight.double()
    err_sq = 0.0
    for j in range(l):
        rows = [a * l + j if perm else j * s + a for a in range(s)]
        for i in range(k):
            rank = sum(1 for f in range(i * q, (i + 1) * q) if f % l == j)
            sv = torch.linalg.svdvals(w[rows, i * p:(i + 1) * p])
            err_sq += float(sv[rank:].pow(2).sum())
    return (err_sq / float(weight.double().pow(2).sum())) ** 0.5


def test_dense_to_monarch_projection_error_equals_the_optimum(run, tmp_path, capsys):
    out = str(tmp_path / "monarch_nb4")
    assert convert("--input", run["dense"], "--output", out, "--to", "monarch", "--nblocks", "4", "--tensor-parallel", "1") == 0
    printed = dict(re.findall(r"^\s+(\S+)\s+\d+x\d+\s+nblocks=4\s+relative error (\S+)$", capsys.readouterr().out, re.M))
    src = [_load(run["dense"], r)["module"] for r in range(2)]
    dst = _load(out)["module"]
    assert len(printed) == 4
    num = den = 0.0
    for prefix, style in ((p, LINEAR[p.rsplit(".", 1)[1]]) for p in printed):
        weight = torch.cat([sd[f"{prefix}.weight"] for sd in src], dim=0 if style == "column" else 1)
        perm = style == "row"
        optimum = _optimal_error(weight, 4, perm)
        approx = _reference_monarch_dense(dst[f"{prefix}.blkdiag1"], dst[f"{prefix}.blkdiag2"], weight.shape[1], weight.shape[0], perm)
        actual = float((weight.double() - approx).norm() / weight.double().norm())
        assert 0.01 < optimum < 1.0, f"{prefix}: degenerate test matrix (optimum {optimum})"
        assert abs(actual - optimum) / optimum < 1e-5, f"{prefix}: error {actual} vs optimum {optimum}"
        assert abs(float(printed[prefix]) - optimum) / optimum < 1e-5, f"{prefix}: printed {printed[prefix]}"
        num += optimum**2 * float(weight.double().pow(2).sum())
        den += float(weight.double().pow(2).sum())
    state = json.load(open(os.path.join(out, "run_state.json")))
    assert abs(state["converted_from"]["overall_relative_error"] - (num / den) ** 0.5) < 1e-5 * (num / den) ** 0.5
    assert state["phase_kind"] == "monarch" and state["monarch"] == {"layers": ["fc1", "fc2", "qkv", "proj"], "nblocks": 4}
    # Everything that is not a projected linear is copied: e.g. the vocabulary-parallel embedding, merged.
    assert torch.equal(dst["embedding.word_embeddings.weight"], torch.cat([sd["embedding.word_embeddings.weight"] for sd in src]))


def test_monarch_reshard_round_trip_is_exact(run, tmp_path):
    one, two = str(tmp_path / "tp1"), str(tmp_path / "tp2")
    assert convert("--input", run["monarch"], "--output", one, "--to", "monarch", "--tensor-parallel", "1") == 0
    assert convert("--input", one, "--output", two, "--to", "monarch", "--tensor-parallel", "2") == 0
    for r in range(2):
        a, b = _load(run["monarch"], r)["module"], _load(two, r)["module"]
        assert list(a) == list(b)
        assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))


# -- bad input and output ------------------------------------------------------------------------
def _digest(path: str) -> dict[str, str]:
    return {n: hashlib.sha256(open(os.path.join(path, n), "rb").read()).hexdigest() for n in sorted(os.listdir(path))}


def _broken_copy(src: str, dst: str, how: str) -> None:
    os.makedirs(dst)
    for name in os.listdir(src):
        if name.startswith("mp_rank_") or name == "run_state.json":
            with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
                g.write(f.read())
    if how == "truncated":
        path = os.path.join(dst, "mp_rank_01_model_states.pt")
        os.truncate(path, os.path.getsize(path) // 2)
    elif how == "no_run_state":
        os.remove(os.path.join(dst, "run_state.json"))
    elif how == "no_rank_file":
        os.remove(os.path.join(dst, "mp_rank_01_model_states.pt"))
    elif how == "incomplete":
        state = json.load(open(os.path.join(dst, "run_state.json")))
        state["complete"] = False
        json.dump(state, open(os.path.join(dst, "run_state.json"), "w"))


@pytest.mark.parametrize("how, message", [
    ("truncated", r"mp_rank_01_model_states\.pt is corrupt or truncated"),
    ("no_run_state", r"is not a checkpoint: run_state\.json is missing"),
    ("no_rank_file", r"lacks mp_rank_01_model_states\.pt \(run_state\.json says tensor_model_parallel_size=2\)"),
    ("incomplete", r"does not mark a complete checkpoint"),
])
def test_corrupt_input_exits_2_with_one_message_and_writes_nothing(run, tmp_path, capsys, how, message):
    bad, out = str(tmp_path / "bad"), str(tmp_path / "out")
    _broken_copy(run["monarch"], bad, how)
    before = _digest(bad)
    assert convert("--input", bad, "--output", out, "--to", "dense") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("convert_checkpoint: error: ") and re.search(message, err[0]), err
    assert _digest(bad) == before
    assert sorted(os.listdir(tmp_path)) == ["bad"]  # no output, no staging debris


def test_existing_output_is_refused_without_force_and_replaced_atomically_with_it(run, tmp_path, capsys):
    out = str(tmp_path / "out")
    os.makedirs(out)
    open(os.path.join(out, "keep.txt"), "w").write("user data")
    assert convert("--input", run["monarch"], "--output", out, "--to", "dense") == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]
    assert convert("--input", run["monarch"], "--output", out, "--to", "dense", "--force") == 0
    assert sorted(os.listdir(out)) == ["mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt", "run_state.json"]
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert convert("--input", run["monarch"], "--output", os.path.join(run["monarch"], "x"), "--to", "dense") == 2
    assert "overlaps the input" in capsys.readouterr().err


def test_cli_process_exit_code_on_missing_input(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launcher", "convert_checkpoint.py"), "--input",
                           str(tmp_path / "nope"), "--output", str(tmp_path / "o"), "--to", "dense"],
                          capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 2 and proc.stderr.strip().endswith("(expected a checkpoint directory .../checkpoints/<tag>)")
