"""fp16 overflow handling with DeepSpeed's per-gradient check replaced by the gradient-norm test
(training/engine.py, ``overflow_from_grad_norm``): an overflowing step is skipped, the loss scale
halves and the parameters are untouched, exactly as with DeepSpeed's own check; finite steps are
bitwise the same. Needs a GPU (DeepSpeed's CPU accelerator has no fp16 optimizer); seed 1234."""

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 ZeRO needs a GPU")


def _engine(norm_test: bool):
    import deepspeed

    from monarch_megatron.training.engine import overflow_from_grad_norm

    torch.manual_seed(1234)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).cuda().half()
    config = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True,
              "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 8, "loss_scale_window": 1000,
                       "hysteresis": 1, "min_loss_scale": 1}, "steps_per_print": 10**9}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config, dist_init_required=True)
    if norm_test:
        assert overflow_from_grad_norm(engine)
        assert engine.optimizer.check_grad_overflow is False
    return engine


def _run(engine, inputs):
    """One step per input; returns (loss scale, parameters) after each."""
    out = []
    for x in inputs:
        loss = engine(x).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        out.append((engine.optimizer.cur_scale, [p.detach().clone() for p in engine.module.parameters()]))
    return out


def test_overflow_from_grad_norm_skips_like_deepspeeds_check():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    g = torch.Generator().manual_seed(1234)
    finite = [torch.randn(8, 16, generator=g).cuda().half() for _ in range(2)]
    huge = torch.full((8, 16), 6.0e4).cuda().half()  # the fp16 activations overflow: inf loss and gradients
    inputs = [finite[0], huge, finite[1]]
    runs = {}
    for norm_test in (False, True):
        runs[norm_test] = _run(_engine(norm_test), inputs)
    for (scale_ds, params_ds), (scale_norm, params_norm) in zip(runs[False], runs[True]):
        assert scale_ds == scale_norm
        for a, b in zip(params_ds, params_norm):
            assert torch.equal(a, b)
    (s0, p0), (s1, p1), (s2, p2) = runs[True]
    assert s1 == s0 / 2  # the overflowing step halved the scale (hysteresis 1) ...
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))  # ... and changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(p1, p2))  # the next finite step applies
