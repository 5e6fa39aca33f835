"""Model providers on megatron-core: ``BertModel`` / ``GPTModel`` from a typed config, a parameter
report, and the loss of one batch.

TP invariance: the model's function must not depend on the TP size. megatron's dense layers get it
from ``use_cpu_initialization=True``: every linear / embedding draws its *full* master weight from
torch's default CPU generator (seeded identically on every TP rank) and keeps its slice; the Monarch
layers do the same with their global factors. Layers draw in construction order, which does not
depend on the TP size, so one ``torch.manual_seed`` gives the same global model at every TP size.
The vocabulary is padded to a TP-independent multiple for the same reason.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.bert.bert_model import BertModel
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from ..parallel import (
    MonarchColumnParallelLinear,
    MonarchRowParallelLinear,
    SDPACoreAttention,
    get_bert_layer_spec,
    get_gpt_layer_spec,
)
from .config import ModelConfig, MonarchConfig

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class SDPABertModel(BertModel):
    """megatron-core ``BertModel`` that also accepts :class:`SDPACoreAttention` as core attention.

    ``BertModel`` picks its attention-mask layout by comparing the spec's core attention with its
    own ``DotProductAttention`` and otherwise asks Transformer Engine's version (which fails where
    TE is absent). SDPA takes the key-padding layout ``[b, 1, 1, s]`` (broadcast over queries, no
    ``s x s`` mask). Everything else, the state dict included, is ``BertModel``'s.
    """

    def _sanity_check_attention_and_get_attn_mask_dimension(self) -> str:
        core = self.transformer_layer_spec.submodules.self_attention.submodules.core_attention
        if core is SDPACoreAttention:
            return "b11s"
        return super()._sanity_check_attention_and_get_attn_mask_dimension()


def transformer_config(model_cfg: ModelConfig, precision: str = "fp32") -> TransformerConfig:
    """megatron ``TransformerConfig`` for ``model_cfg`` at the current TP size (parallel_state)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got precision={precision!r}")
    return TransformerConfig(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        hidden_dropout=model_cfg.hidden_dropout,
        attention_dropout=model_cfg.attention_dropout,
        init_method_std=model_cfg.init_method_std,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        # TP-invariant initialisation (module docstring).
        use_cpu_initialization=True,
        perform_initialization=True,
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        params_dtype=PRECISIONS[precision],
        # Fused kernels from apex / megatron's CUDA extensions are optional; the torch paths are
        # used everywhere so that CPU and GPU run the same code.
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )


def build_model(
    model_cfg: ModelConfig,
    monarch: MonarchConfig | None = None,
    precision: str = "fp32",
    *,
    attention: str = "auto",
) -> BertModel | GPTModel:
    """A megatron-core ``BertModel`` (masked LM, sentence-order head if ``model_cfg.sentence_order``)
    or ``GPTModel`` with Monarch linears where ``monarch`` says (dense everywhere if ``None``).

    ``parallel_state`` must be initialised; the TP size is read from it. Parameters are created in
    ``precision``'s dtype and moved to the current CUDA device where CUDA is available. Call
    ``torch.manual_seed(seed)`` (the same on every TP rank) first: it fixes the global weights.
    ``attention`` picks the core attention (:func:`monarch_megatron.parallel.core_attention_module`).
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    vocab = model_cfg.padded_vocab_size
    if vocab % tp != 0:
        raise ValueError(
            f"padded vocab size {vocab} (make_vocab_size_divisible_by="
            f"{model_cfg.make_vocab_size_divisible_by}) is not divisible by tp_size={tp}"
        )
    config = transformer_config(model_cfg, precision)
    if model_cfg.kind == "bert":
        model = SDPABertModel(
            config=config,
            num_tokentypes=2,
            transformer_layer_spec=get_bert_layer_spec(monarch, attention),
            vocab_size=vocab,
            max_sequence_length=model_cfg.max_position_embeddings,
            add_binary_head=model_cfg.sentence_order,
            share_embeddings_and_output_weights=True,
            parallel_output=True,
        )
    else:
        model = GPTModel(
            config=config,
            transformer_layer_spec=get_gpt_layer_spec(monarch, attention),
            vocab_size=vocab,
            max_sequence_length=model_cfg.max_position_embeddings,
            share_embeddings_and_output_weights=True,
            parallel_output=True,
            position_embedding_type="learned_absolute",
        )
    # Some submodules (plain torch layers: position embeddings, pooler, LM-head dense) ignore
    # params_dtype; cast everything once. Master init was fp32, so this is the same cast.
    model.to(dtype=PRECISIONS[precision])
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def parameter_report(model: torch.nn.Module) -> dict[str, int]:
    """Global parameter counts (summed over TP shards): ``total``, ``monarch`` (in Monarch factors)
    and ``dense_equivalent`` (the same model with every Monarch linear dense)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()

    def global_numel(p: torch.Tensor) -> int:
        return p.numel() * (tp if getattr(p, "tensor_model_parallel", False) else 1)

    total = sum(global_numel(p) for p in model.parameters())
    monarch = 0
    dense_weights = 0
    for module in model.modules():
        if isinstance(module, (MonarchColumnParallelLinear, MonarchRowParallelLinear)):
            monarch += global_numel(module.blkdiag1) + global_numel(module.blkdiag2)
            dense_weights += module.input_size * module.output_size
    return {"total": total, "monarch": monarch, "dense_equivalent": total - monarch + dense_weights}


def _masked_mean(per_token: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    mask = loss_mask.reshape(-1).float()
    return torch.sum(per_token.reshape(-1).float() * mask) / mask.sum().clamp(min=1.0)


def forward_step(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], kind: str
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one batch (megatron-core's native sample dicts, collated to ``[B, S]``).

    BERT: keys ``text``, ``types``, ``labels``, ``padding_mask`` (1 = real token), ``loss_mask``,
    ``is_random`` ``[B]``; loss = masked-LM loss (mean over ``loss_mask``) + sentence-order loss
    when the model has the binary head. GPT: ``tokens``, ``labels``, ``loss_mask``,
    ``position_ids``; loss = mean LM loss over ``loss_mask`` (causal mask built in attention).

    Returns:
        ``(loss, metrics)``: scalar fp32 loss (differentiable) and ``{"lm loss": ..., "sop loss": ...}``
        (the latter for BERT with the sentence-order head).
    """
    device = next(model.parameters()).device
    b = {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
    if kind == "bert":
        lm_per_token, sop_logits = model(
            b["text"], b["padding_mask"], tokentype_ids=b["types"], lm_labels=b["labels"]
        )
        lm_loss = _masked_mean(lm_per_token, b["loss_mask"])
        metrics = {"lm loss": float(lm_loss.detach())}
        loss = lm_loss
        if sop_logits is not None and "is_random" in b:
            sop_loss = F.cross_entropy(
                sop_logits.view(-1, 2).float(), b["is_random"].view(-1).long(), ignore_index=-1
            )
            loss = lm_loss + sop_loss
            metrics["sop loss"] = float(sop_loss.detach())
        return loss, metrics
    if kind == "gpt":
        per_token = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
        loss = _masked_mean(per_token, b["loss_mask"])
        return loss, {"lm loss": float(loss.detach())}
    raise ValueError(f"kind must be 'bert' or 'gpt', got kind={kind!r}")
