"""Config schema: bad configs give one clear error naming the key (exit code 2); dry-run works for
every config in configs/; analytic parameter counts match real megatron models; lr schedule."""

from __future__ import annotations

import contextlib
import glob
import io
import math
import os
import subprocess
import sys

import pytest

from monarch_megatron.training.config import ConfigError, load_config

from tiny_demo import DATA, DEMO, ROOT, load_launcher

BAD = [
    (["phases.1.seq_lenght=128"], "phases[1].seq_lenght: unknown key (did you mean seq_length?)"),
    (["trainig.total_steps=5"], "trainig: unknown key (did you mean training?)"),
    (["model.hiden_size=64"], "model.hiden_size: unknown key (did you mean hidden_size?)"),
    (["training.micro_batch_size=2.5"], "training.micro_batch_size: expected an integer, got 2.5"),
    (["training.total_steps=ten"], "training.total_steps: expected an integer"),
    (["optimizer.name=lamm"], "optimizer.name: must be one of 'lamb', 'adamw', got 'lamm' (str) (did you mean lamb?)"),
    (["precision.dtype=fp8"], "precision.dtype: must be one of"),
    (["model.sentence_order=maybe"], "model.sentence_order: expected true or false"),
    (["training.global_batch_size=20"], "training.global_batch_size: global batch 20 is not a multiple of micro batch 16"),
    (["phases.1.global_batch_size=24"], "phases[1].global_batch_size: global batch 24 is not a multiple of micro batch 16"),
    (["model.num_attention_heads=3"], "model.num_attention_heads: hidden_size=128 is not divisible by num_attention_heads=3"),
    (["parallel.tensor_model_parallel_size=8", "parallel.world_size=8"],
     "parallel.tensor_model_parallel_size: tensor_model_parallel_size=8 does not divide model.num_attention_heads=4"),
    (["parallel.tensor_model_parallel_size=2", "parallel.world_size=3"],
     "parallel.tensor_model_parallel_size: tensor_model_parallel_size=2 does not divide the world size 3"),
    (["parallel.tensor_model_parallel_size=4", "parallel.world_size=4", "phases.0.monarch.nblocks=2"],
     "phases[0].monarch.nblocks: nblocks=2 is not divisible by tensor_model_parallel_size=4"),
    (["phases.0.monarch.layers=[fc1,fc3]"], "phases[0].monarch.layers[1]: unknown layer 'fc3'"),
    (["phases.0.monarch.kind=butterfly"],
     "phases[0].monarch.kind: unknown layer kind 'butterfly'; choose from monarch, blockdiag"),
    (["parallel.tensor_model_parallel_size=4", "parallel.world_size=4", "phases.0.monarch.kind=blockdiag",
      "phases.0.monarch.nblocks=2"], "phases[0].monarch.nblocks: nblocks=2 is not divisible by tensor_model_parallel_size=4"),
    (["parallel.tensor_model_parallel_size=2", "parallel.world_size=2", "phases.0.monarch.kind=blockdiag",
      "phases.0.monarch.nblocks=6"], "phases[0].monarch.nblocks: layer fc1: cannot shard block-diagonal layer fc1 with "
     "nblocks=6 column-parallel over tp_size=2: out_features must be a multiple of nblocks"),
    (["phases.1.monarch={kind: blockdiag}"], "phases[1].monarch: a phase may keep the previous phase's Monarch layers"),
    (["phases.0.monarch.nblocks=1000"], "phases[0].monarch.nblocks: layer"),
    (["training.total_steps=null"], "phases[0].share: a share needs training.total_steps"),
    (["phases.0.steps=5"], "phases[0]: give exactly one of steps or share"),
    (["phases.1.optimizer_state=keep"], "phases[1].optimizer_state: 'keep' needs the same model structure"),
    (["phases.1.optimizer={lrr: 0.1}"], "phases[1].optimizer.lrr: unknown key (did you mean lr?)"),
    (["phases.1.monarch={nblocks: 2}"], "phases[1].monarch: a phase may keep the previous phase's Monarch layers"),
    (["phases.1.name=monarch"], "phases[1].name: duplicate phase name 'monarch'"),
    (["training.seq_length=256"], "training.seq_length: 256 exceeds model.max_position_embeddings=128"),
    (["data.source=indexed"], "data.prefix: required when data.source is 'indexed'"),
    (["optimizer.lr=-1"], "optimizer.lr: must be > 0"),
    (["phases.5.steps=3"], "phases[5]: index out of range"),
    (["training.total_steps"], "is not of the form key=value"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[o[0][0] for o in BAD])
def test_bad_config_names_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, overrides, world_size=int(next((o.split("=")[1] for o in overrides if o.startswith("parallel.world_size=")), 1)))
    assert str(err.value).startswith("config error: ")
    assert message in str(err.value), str(err.value)


def test_batch_arithmetic_uses_data_parallel_size() -> None:
    # global 16 = micro 16 x acc 1 x DP 1 is fine, but with 2 data-parallel ranks it is impossible.
    load_config(DEMO, [], world_size=1)
    with pytest.raises(ConfigError, match=r"training.global_batch_size: .*data-parallel size 2"):
        load_config(DEMO, [], world_size=2)


def test_cli_config_error_exits_2_with_message() -> None:
    out = subprocess.run([sys.executable, os.path.join(ROOT, "launcher", "pretrain.py"), "--config", DEMO,
                          "phases.1.seq_lenght=128"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "config error: phases[1].seq_lenght: unknown key (did you mean seq_length?)" in out.stderr


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))), ids=os.path.basename)
def test_dry_run_succeeds_for_every_config(path: str, tmp_path) -> None:
    # The recipes' data (data/wiki, data/owt) is not here: point them at the demo's indexed data,
    # since --dry-run checks the data files and the tokenizer as a real start does.
    from monarch_megatron.data.demo_corpus import prepare_demo_data

    prefix, model = prepare_demo_data(DATA)
    data = [f"data.prefix={prefix}", f"data.tokenizer_model={model}"] if "source: indexed" in open(path).read() else []
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = load_launcher("pretrain").main(["--config", path, "--dry-run", f"output_dir={tmp_path}", *data])
    assert rc == 0
    text = buf.getvalue()
    assert "# phase plan" in text and "# parallel layout: world" in text and "params: total" in text


def test_overrides_apply_to_nested_keys_and_lists() -> None:
    cfg = load_config(DEMO, ["output_dir=/tmp/x", "phases.0.share=null", "phases.0.steps=5",
                             "model.num_layers=3", "phases.0.monarch.layers=[fc1,fc2]"])
    assert cfg.output_dir == "/tmp/x" and cfg.phases[0].steps == 5 and cfg.model.num_layers == 3
    assert cfg.phases[0].monarch.layers == ["fc1", "fc2"]


def test_schedule_warmup_decay_and_rewarmup() -> None:
    from monarch_megatron.training.phases import build_plan
    from monarch_megatron.training.schedule import learning_rate

    cfg = load_config(DEMO, ["training.total_steps=100", "lr_schedule.warmup_steps=10", "optimizer.lr=1.0",
                             "lr_schedule.min_lr=0.0", "phases.1.rewarmup_steps=4"])
    mon, dense = build_plan(cfg)
    assert (mon.steps, dense.steps) == (80, 20)
    assert math.isclose(learning_rate(mon, 0, 100), 0.1) and math.isclose(learning_rate(mon, 9, 100), 1.0)
    assert math.isclose(learning_rate(mon, 55, 100), 1.0 - 45 / 90)
    base = 1.0 - (80 - 10) / 90
    assert math.isclose(learning_rate(dense, 80, 100), base * 0.25)  # first re-warm-up step
    assert math.isclose(learning_rate(dense, 84, 100), 1.0 - 74 / 90)


def test_analytic_parameter_counts_match_real_models() -> None:
    from monarch_megatron.models import build_model, parameter_report
    from monarch_megatron.models.config import MonarchConfig
    from monarch_megatron.training.distributed import init_distributed, shutdown
    from monarch_megatron.training.flops import count_parameters
    from monarch_megatron.training.loop import Trainer

    init_distributed(1)
    try:
        for kind, extra in (("bert", []), ("gpt", ["model.kind=gpt"])):
            cfg = load_config(DEMO, ["model.hidden_size=64", "model.ffn_hidden_size=96", "data.vocab_size=300"] + extra)
            for monarch in (MonarchConfig(layers=("fc1", "qkv", "fc2", "proj"), nblocks=4), MonarchConfig(layers=("fc1",), nblocks=2),
                            MonarchConfig(layers=("fc1", "fc2"), nblocks=4, kind="blockdiag"), None):
                real = parameter_report(build_model(Trainer.model_config(cfg), monarch, "fp32"))
                assert count_parameters(cfg.model, cfg.vocab_size, monarch) == real, (kind, monarch)
    finally:
        shutdown()


def test_layer_kind_defaults_to_monarch_and_keeps_the_config_hash() -> None:
    """``monarch.kind`` is new: a config that does not name it (or names the default) hashes as before."""
    before = "2cd918b32e64ebda"  # configs/demo.yaml's hash before layer kinds existed
    assert load_config(DEMO).config_hash() == before
    assert load_config(DEMO, ["phases.0.monarch.kind=monarch"]).config_hash() == before
    blockdiag = load_config(DEMO, ["phases.0.monarch.kind=blockdiag"])
    assert blockdiag.phases[0].monarch.kind == "blockdiag" and blockdiag.config_hash() != before


def test_model_activation_defaults_to_exact_gelu_and_keeps_the_config_hash() -> None:
    """``model.activation`` is new: the default (erf GELU) hashes as before, the tanh GELU does not
    (it changes the function); the fusion switches are performance keys and do not."""
    before = "2cd918b32e64ebda"
    assert load_config(DEMO, ["model.activation=gelu"]).config_hash() == before
    assert load_config(DEMO, ["training.fused_bias_gelu=false", "training.compiled_layer_norm=false"]).config_hash() == before
    assert load_config(DEMO, ["model.activation=gelu_tanh"]).config_hash() != before
    with pytest.raises(ConfigError, match="activation"):
        load_config(DEMO, ["model.activation=relu"])
