"""The demo config shrunk to a one-layer, 32-wide BERT for fast trainer tests (shared by test modules)."""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.yaml")
# The demo corpus, tokenizer and indexed datasets, built once and shared by every test run.
DATA = os.path.join(tempfile.gettempdir(), "monarch_megatron_test_demo_data")
TINY_MODEL = [
    f"data.cache_dir={DATA}", "model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2",
    "model.ffn_hidden_size=64", "model.max_position_embeddings=32", "training.seq_length=32",
    "training.micro_batch_size=4", "training.global_batch_size=8",
]


def subprocess_env() -> dict:
    """The environment of a launcher subprocess (torchrun, pretrain.py): one thread per process on
    the 2-core machines, the repository importable."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def tiny_overrides(*schedule: str) -> list[str]:
    """``key=value`` overrides of configs/demo.yaml: the tiny model, then ``schedule`` (steps, intervals, phases)."""
    return [*TINY_MODEL, *schedule]


def metrics_by_step(out: str, kind: str) -> dict[int, dict]:
    """step -> the last ``kind`` record (train / valid / switch) of the run's metrics.jsonl."""
    found = {}
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if row["kind"] == kind:
                found[row["step"]] = row
    return found


def load_launcher(name: str):
    """``launcher/<name>.py`` as a module (its ``main(argv)`` runs the command in this process)."""
    spec = importlib.util.spec_from_file_location(f"launcher_{name}", os.path.join(ROOT, "launcher", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def checkpoint_weights(out: str, tag: str, tp_rank: int = 0) -> dict:
    """``{name: tensor}`` of the model shard of TP rank ``tp_rank`` in checkpoint ``tag`` of the run ``out``."""
    from monarch_megatron.checkpointing.shards import read_model_shard

    module = read_model_shard(os.path.join(out, "checkpoints", tag), tp_rank)
    return {k: v for k, v in module.items() if hasattr(v, "shape")}
