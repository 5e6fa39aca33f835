"""The fast step on CPU (issue 11): the static micro-step gives the eager engine path's losses through
the Monarch -> dense switch; the LM head on masked positions only gives the full head's loss; a
micro-step reads nothing back from the device; the profiler writes a trace and a summary.

CUDA-graph capture itself needs a GPU (benchmarks/phase_throughput.py --compare-losses checks it
there); on CPU the fast path runs the very function it would capture, eagerly.

Tolerances: fp32 throughout; the fast and eager paths run the same kernels in the same order, so
their losses agree to 1e-6 relative (rounding of a different accumulation order at most); the
masked-only head computes the same per-position losses, 1e-6.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from monarch_megatron.data.masking import masked_positions_bound
from monarch_megatron.models import ModelConfig, MonarchConfig, build_model, forward_step, masked_positions
from monarch_megatron.training.config import load_config

from tiny_demo import DEMO, metrics_by_step, tiny_overrides

SEED = 20261203  # fixed, so a failure reproduces
TINY = tiny_overrides(
    "training.total_steps=8", "training.log_interval=3", "training.eval_interval=100", "training.eval_iters=1",
    "training.save_interval=100", "phases.0.share=0.5", "phases.0.monarch.nblocks=2", "phases.1.share=0.5",
    "training.global_batch_size=12", f"seed={SEED}",
)


def _train(out: str, *extra: str) -> dict:
    from monarch_megatron.training.run import train

    return train(load_config(DEMO, [f"output_dir={out}", *TINY, *extra]))


@pytest.fixture(scope="module")
def fast_and_eager(tmp_path_factory) -> tuple[str, str]:
    """The same tiny run (3 micro-steps per step, switch at step 4) on the fast and on the eager path;
    the fast run is profiled at steps 2-3 and 6-7 (one window in each phase)."""
    fast, eager = str(tmp_path_factory.mktemp("fast")), str(tmp_path_factory.mktemp("eager"))
    _train(fast, "training.fast_step=true", "training.profile.start_step=[2,6]", "training.profile.num_steps=2")
    _train(eager, "training.fast_step=false")
    return fast, eager


def test_fast_step_gives_the_eager_engine_path_losses_through_the_switch(fast_and_eager):
    fast, eager = fast_and_eager
    a, b = metrics_by_step(fast, "train"), metrics_by_step(eager, "train")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        for key in ("loss", "lm loss", "sop loss", "grad-norm"):
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-6), (step, key)
    assert {a[s]["phase"] for s in a} == {0, 1}
    sa, sb = metrics_by_step(fast, "switch"), metrics_by_step(eager, "switch")
    assert sa[4]["val-loss-after"] == pytest.approx(sb[4]["val-loss-after"], rel=1e-6)
    assert sa[4]["rel-diff"] < 1e-5  # the switch stays exact on the fast path


def test_profile_writes_a_trace_and_a_summary_per_window(fast_and_eager):
    fast, _ = fast_and_eager
    prof = os.path.join(fast, "profile")
    for first, last in ((2, 3), (6, 7)):
        stem = os.path.join(prof, f"rank0_steps{first}-{last}")
        with open(stem + ".pt.trace.json") as f:
            assert json.load(f)["traceEvents"]
        with open(stem + ".summary.json") as f:
            summary = json.load(f)
        assert summary["steps"] == 2 and summary["wall_ms_per_step"] > 0
        assert summary["aten_ops_per_step"] > 0 and summary["top"]
        assert summary["device_busy_fraction"] is None  # CPU: no device timeline
    with open(os.path.join(fast, "train.log")) as f:
        assert f.read().count("profile of steps") == 2


class _NoDeviceReads(TorchDispatchMode):
    """Fails on any operator that copies a device value into a host scalar (``.item()``, ``float(t)``,
    ``bool(t)``): on a GPU each one waits for the device, and inside a captured graph it is an error."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("a micro-step read a value back to the host")
        return func(*args, **(kwargs or {}))


SEQ, BATCH, VOCAB = 32, 4, 256


def _model_cfg(kind: str) -> ModelConfig:
    return ModelConfig(kind=kind, num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB,
                       max_position_embeddings=SEQ, hidden_dropout=0.1, attention_dropout=0.1)


def _batch(kind: str, bound: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    if kind == "gpt":
        return dict(tokens=torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), labels=labels,
                    loss_mask=torch.ones(BATCH, SEQ), position_ids=torch.arange(SEQ).expand(BATCH, SEQ).clone())
    loss_mask = torch.zeros(BATCH, SEQ)
    for row in range(BATCH):  # up to `bound` masked positions, row 1 none at all
        n = 0 if row == 1 else int(torch.randint(1, bound + 1, (1,), generator=g))
        loss_mask[row, torch.randperm(SEQ - 2, generator=g)[:n] + 1] = 1
    padding = torch.ones(BATCH, SEQ, dtype=torch.long)
    padding[0, SEQ - 5:] = 0
    loss_mask *= padding
    return dict(text=torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), types=torch.zeros(BATCH, SEQ, dtype=torch.long),
                labels=labels, padding_mask=padding, loss_mask=loss_mask, is_random=torch.tensor([0, 1, 1, 0]))


@pytest.mark.parametrize("kind", ["bert", "gpt"])
def test_a_micro_step_reads_nothing_back_from_the_device(tp1, kind):
    torch.manual_seed(SEED)
    model = build_model(_model_cfg(kind), MonarchConfig(nblocks=2), "fp32")
    bound = masked_positions_bound(SEQ, 0.15)
    batch = _batch(kind, bound)
    params = [p for p in model.parameters() if p.requires_grad]
    with _NoDeviceReads():
        loss, values = forward_step(model, batch, kind, masked_positions_bound=bound if kind == "bert" else None)
        grads = torch.autograd.grad(loss / 3.0, params, allow_unused=True)
        sums = torch.stack([loss.detach(), *values.values()])
    assert torch.isfinite(sums).all() and any(g is not None for g in grads)


def test_masked_positions_head_gives_the_full_head_loss_and_gradients(tp1):
    torch.manual_seed(SEED)
    model = build_model(_model_cfg("bert"), None, "fp32")
    model.eval()  # no dropout: both evaluations must see the same function
    bound = masked_positions_bound(SEQ, 0.15)
    batch = _batch("bert", bound)
    params = [p for p in model.parameters()]
    full, full_values = forward_step(model, batch, "bert")
    full_grads = torch.autograd.grad(full, params)
    gathered, gathered_values = forward_step(model, batch, "bert", masked_positions_bound=bound)
    gathered_grads = torch.autograd.grad(gathered, params)
    assert float(gathered.detach()) == pytest.approx(float(full.detach()), rel=1e-6)
    assert float(gathered_values["lm loss"]) == pytest.approx(float(full_values["lm loss"]), rel=1e-6)
    for g_full, g_gathered in zip(full_grads, gathered_grads):
        torch.testing.assert_close(g_gathered, g_full, rtol=1e-5, atol=1e-7)


def test_masked_positions_are_the_masked_ones_first_in_order():
    mask = torch.tensor([[0, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 1.0]])
    assert masked_positions(mask, 3).tolist() == [[1, 3, 4], [0, 1, 2], [0, 5, 1]]


def test_the_masking_budget_bounds_every_bert_sample(tmp_path):
    from monarch_megatron.data.datasets import build_pretraining_datasets
    from monarch_megatron.data.demo_corpus import prepare_demo_data
    from monarch_megatron.data.tokenizer import load_tokenizer

    from tiny_demo import DATA

    prefix, model = prepare_demo_data(DATA, vocab_size=4096)
    for seq, prob in ((32, 0.15), (64, 0.2)):
        train, _ = build_pretraining_datasets(prefix, load_tokenizer(model), "bert", seq, 300, 10, SEED,
                                              masked_lm_prob=prob, cache_dir=str(tmp_path / f"c{seq}"))
        bound = masked_positions_bound(seq, prob)
        counts = [int(train[i]["loss_mask"].sum()) for i in range(300)]
        assert max(counts) <= bound and max(counts) >= bound - 2


_CE_WORKER = r"""
import json, os, sys
import torch
import torch.distributed as dist
from monarch_megatron.models import ModelConfig, build_model, cross_entropy as ce
from monarch_megatron.parallel import init_tensor_parallel
from monarch_megatron.parallel.distributed import free_port

torch.manual_seed(int(sys.argv[1]))
out = {"kernel": []}
for dtype in (torch.float32, torch.bfloat16):
    for n, v in ((5, 37), (4, 100)):  # V not a multiple of the interpreted slice (16): masked tails
        x = (3 * torch.randn(n, v)).to(dtype).requires_grad_()
        y = torch.randint(0, v, (n,))
        y[0], y[-1] = -1, v  # out of the vocabulary (BERT's -1 on unmasked positions): target logit 0
        g = torch.randn(n)
        (gx,) = torch.autograd.grad(ce.cross_entropy(x, y), x, g)
        loss = ce.cross_entropy(x.detach(), y)
        xr = x.detach().double().requires_grad_()
        valid = (y >= 0) & (y < v)
        picked = xr.gather(1, y.clamp(0, v - 1)[:, None])[:, 0] * valid
        ref = torch.logsumexp(xr, -1) - picked
        (gr,) = torch.autograd.grad(ref, xr, g.double())
        rel = lambda a, b: float((a.double() - b).norm() / b.norm())
        out["kernel"].append([str(dtype), n, v, rel(loss, ref.detach()), rel(gx, gr)])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
init_tensor_parallel(1)
cfg = ModelConfig(kind="gpt", num_layers=1, hidden_size=32, num_attention_heads=2, vocab_size=200,
                  max_position_embeddings=16, hidden_dropout=0.0, attention_dropout=0.0)
model = build_model(cfg, None, "fp32", fused_cross_entropy=True)
tokens = torch.randint(0, 200, (3, 16))
pos = torch.arange(16).expand(3, 16)
fused = model(tokens, pos, None, labels=tokens)
model.fused_cross_entropy = False
plain = model(tokens, pos, None, labels=tokens)
out["model"] = float((fused - plain).abs().max() / plain.abs().max())
print(json.dumps(out))
"""


def test_fused_cross_entropy_matches_float64_reference_and_megatron_loss():
    """The Triton kernels under the interpreter (subprocess: the interpreter is chosen at import)
    against log_softmax in float64: fp32 loss and gradient to 1e-6, bf16 loss to 1e-6 (computed in
    fp32 from the bf16 values) and gradient to 1e-2 (bf16 output rounding); and GPTModel's LM loss
    through them equals megatron-core's vocab_parallel_cross_entropy to 1e-6."""
    import subprocess
    import sys

    from tiny_demo import ROOT

    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", _CE_WORKER, str(SEED)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for dtype, n, v, loss_err, grad_err in out["kernel"]:
        assert loss_err < 1e-6, (dtype, n, v)
        assert grad_err < (1e-6 if dtype == "torch.float32" else 1e-2), (dtype, n, v)
    assert out["model"] < 1e-6
