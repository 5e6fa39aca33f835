"""TP=1 vs TP=2 equivalence of tiny-but-real Monarch BERT and GPT models on 2 GPUs (NCCL).

    torchrun --nproc_per_node 2 benchmarks/tp_equivalence.py [--precisions bf16,fp32] [--steps 3]

For every model (BERT Monarch, GPT Monarch, BERT dense) and precision: build the model at TP=2 from
seed S, take the first batch's logits (gathered over TP) and the losses of ``--steps`` Adam steps
(fp32 master weights, as the AMP-O2 / DeepSpeed contract), then the same at TP=1 (the 2 ranks
become 2 data-parallel replicas computing the same thing). Prints the max relative errors and the
tolerances checked, writes ``$OUT/tp_equivalence.json`` if ``$OUT`` is set, exits 1 on failure.

Tolerances: bf16 losses rel 5e-3 and logits 3e-2 (of max |logit|): bf16 keeps 8 mantissa bits
(eps 3.9e-3) and TP=2 sums the row-parallel partial products in another order; fp32 (TF32 off):
losses 1e-4, logits 1e-4.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from monarch_megatron.models import ModelConfig, MonarchConfig, build_model, forward_step  # noqa: E402
from monarch_megatron.parallel import init_tensor_parallel  # noqa: E402

TOLERANCES = {"bf16": {"loss": 5e-3, "logits": 3e-2}, "fp32": {"loss": 1e-4, "logits": 1e-4}}
SEQ, BATCH, VOCAB = 128, 8, 1024
MODELS = {
    "bert_monarch": ("bert", MonarchConfig(nblocks=4)),
    "gpt_monarch": ("gpt", MonarchConfig(nblocks=4)),
    "bert_dense": ("bert", None),
}


def model_cfg(kind: str) -> ModelConfig:
    return ModelConfig(kind=kind, num_layers=4, hidden_size=256, num_attention_heads=4, vocab_size=VOCAB,
                       max_position_embeddings=SEQ, hidden_dropout=0.0, attention_dropout=0.0)


def batches(kind: str, n: int, seed: int = 11) -> list[dict[str, torch.Tensor]]:
    """Random batches in megatron's sample-dict layout ([B, S]), the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        loss_mask = (torch.rand(BATCH, SEQ, generator=g) < 0.15).float()
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        if kind == "bert":
            padding = torch.ones(BATCH, SEQ, dtype=torch.long)
            padding[1, SEQ - 40 :] = 0
            out.append(dict(text=tokens, types=(torch.arange(SEQ) >= SEQ // 2).long().expand(BATCH, SEQ).clone(),
                            labels=labels, padding_mask=padding, loss_mask=loss_mask * padding,
                            is_random=torch.randint(0, 2, (BATCH,), generator=g)))
        else:
            out.append(dict(tokens=tokens, labels=labels, loss_mask=loss_mask,
                            position_ids=torch.arange(SEQ).expand(BATCH, SEQ).clone()))
    return out


def full_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """LM logits [B, S, V] gathered over the TP group, in fp32."""
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    device = next(model.parameters()).device
    b = {k: v.to(device) for k, v in batch.items()}
    with torch.no_grad():
        if kind == "bert":
            logits, _ = model(b["text"], b["padding_mask"], tokentype_ids=b["types"])
        else:
            logits = model(b["tokens"], b["position_ids"], None)
        return gather_from_tensor_model_parallel_region(logits).float().cpu()


def run(kind: str, monarch: MonarchConfig | None, precision: str, steps: int) -> tuple[torch.Tensor, list[float]]:
    torch.manual_seed(1234)
    model = build_model(model_cfg(kind), monarch, precision)
    data = batches(kind, steps)
    logits = full_logits(model, data[0], kind)
    params = [p for p in model.parameters() if p.requires_grad]
    master = [p.detach().float().clone().requires_grad_(True) for p in params]
    opt = torch.optim.Adam(master, lr=1e-3)
    losses = []
    for batch in data:
        for p in params:
            p.grad = None
        loss, _ = forward_step(model, batch, kind)
        loss.backward()
        for p, m in zip(params, master):
            m.grad = p.grad.float()
        opt.step()
        with torch.no_grad():
            for p, m in zip(params, master):
                p.copy_(m)
        losses.append(float(loss.detach()))
    return logits, losses


def _device_name() -> str:
    # The script targets GPUs; it also runs on CPU (gloo) as a smoke test of the script itself.
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default="bf16,fp32")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    init_tensor_parallel(2)
    rank = dist.get_rank()
    results: dict[str, dict] = {}
    t0 = time.time()
    for precision in args.precisions.split(","):
        runs = {}
        for tp in (2, 1):
            init_tensor_parallel(tp)
            for name, (kind, monarch) in MODELS.items():
                runs[(name, tp)] = run(kind, monarch, precision, args.steps)
        for name in MODELS:
            (l2, loss2), (l1, loss1) = runs[(name, 2)], runs[(name, 1)]
            loss_err = max(abs(a - b) / abs(b) for a, b in zip(loss2, loss1))
            logit_err = ((l2 - l1).abs().max() / l1.abs().max()).item()
            tol = TOLERANCES[precision]
            results[f"{name}/{precision}"] = {
                "losses_tp1": loss1, "losses_tp2": loss2,
                "max_rel_err_loss": loss_err, "tol_loss": tol["loss"],
                "max_rel_err_logits": logit_err, "tol_logits": tol["logits"],
                "ok": loss_err < tol["loss"] and logit_err < tol["logits"],
            }
    ok = all(r["ok"] for r in results.values())
    if rank == 0:
        print(f"device: {_device_name()}, world {dist.get_world_size()}, "
              f"backend {dist.get_backend()}, {time.time() - t0:.1f} s")
        for key, r in results.items():
            print(f"{key:22s} loss max rel err {r['max_rel_err_loss']:.2e} (tol {r['tol_loss']:.0e})  "
                  f"logits max rel err {r['max_rel_err_logits']:.2e} (tol {r['tol_logits']:.0e})  "
                  f"{'OK' if r['ok'] else 'FAIL'}")
            print(f"{'':22s} losses TP=1 {['%.5f' % x for x in r['losses_tp1']]}  TP=2 {['%.5f' % x for x in r['losses_tp2']]}")
        out = os.environ.get("OUT")
        if out:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "tp_equivalence.json"), "w") as f:
                json.dump({"device": _device_name(), "ok": ok, "results": results,
                           "command": "torchrun --nproc_per_node 2 benchmarks/tp_equivalence.py "
                                      f"--precisions {args.precisions} --steps {args.steps}"}, f, indent=2)
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
