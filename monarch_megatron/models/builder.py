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

from ..monarch import MonarchOptions
from ..parallel import SDPACoreAttention, StructuredParallelLinear, get_bert_layer_spec, get_gpt_layer_spec
from . import cross_entropy as fused_ce
from .config import ModelConfig, MonarchConfig
from .family import model_family

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class _FusedLossMixin:
    """megatron-core's ``compute_language_model_loss`` (labels ``[b, s]``, logits ``[s, b, V/tp]`` ->
    loss ``[b, s]``) through the two-pass Triton kernels of :mod:`.cross_entropy` where they apply
    (``fused_cross_entropy`` set, CUDA, TP = 1), else megatron-core's own function."""

    fused_cross_entropy: bool = False

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.fused_cross_entropy and fused_ce.applies(logits, parallel_state.get_tensor_model_parallel_world_size()):
            labels_sb = labels.transpose(0, 1)
            loss = fused_ce.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels_sb.reshape(-1))
            return loss.view(labels_sb.shape).transpose(0, 1).contiguous()
        return super().compute_language_model_loss(labels, logits)


class FusedLossGPTModel(_FusedLossMixin, GPTModel):
    """megatron-core ``GPTModel`` with the fused vocabulary cross entropy (:class:`_FusedLossMixin`)."""


class SDPABertModel(_FusedLossMixin, BertModel):
    """megatron-core ``BertModel`` that also accepts :class:`SDPACoreAttention` as core attention,
    with the fused vocabulary cross entropy (:class:`_FusedLossMixin`).

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


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GELU (``model.activation: gelu_tanh``), the function of megatron-core's
    fused ``bias_gelu`` and of the original BERT and GPT-2 code."""
    return F.gelu(x, approximate="tanh")


def activation_function(model_cfg: ModelConfig):
    """The element-wise GELU of ``model_cfg.activation`` (unfused form)."""
    return gelu_tanh if model_cfg.activation == "gelu_tanh" else F.gelu


def transformer_config(model_cfg: ModelConfig, precision: str = "fp32", *,
                       fused_bias_dropout: bool = False, fused_bias_gelu: bool = False) -> TransformerConfig:
    """megatron ``TransformerConfig`` for ``model_cfg`` at the current TP size (parallel_state).

    ``fused_bias_dropout``: megatron-core's own fused bias + dropout + residual add
    (``bias_dropout_fusion``: one compiled kernel, torch.compile via its ``jit_fuser``, instead of
    three passes, two of them broadcasting); the same function (a different dropout stream).
    ``fused_bias_gelu``: for ``activation: gelu_tanh``, megatron-core's fused fc1 bias + GELU
    (``bias_activation_fusion``: one compiled kernel each way instead of a broadcast add and a
    GELU pass; megatron computes the tanh approximation there, so it applies to that activation
    only); the same function to rounding.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got precision={precision!r}")
    # megatron-core selects its fused bias_gelu (tanh approximation) by activation_func is F.gelu.
    fuse_gelu = fused_bias_gelu and model_cfg.activation == "gelu_tanh"
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
        activation_func=F.gelu if fuse_gelu else activation_function(model_cfg),
        bias_activation_fusion=fuse_gelu,
        bias_dropout_fusion=fused_bias_dropout,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )


def build_model(
    model_cfg: ModelConfig,
    monarch: MonarchConfig | None = None,
    precision: str = "fp32",
    *,
    attention: str = "auto",
    monarch_options: MonarchOptions | None = None,
    fused_cross_entropy: bool = False,
    fused_bias_dropout: bool = False,
    fused_bias_gelu: bool = False,
    compiled_norm: bool = False,
    fused_linear_bias: bool = False,
) -> BertModel | GPTModel:
    """A megatron-core ``BertModel`` (masked LM, sentence-order head if ``model_cfg.sentence_order``)
    or ``GPTModel`` with Monarch linears where ``monarch`` says (dense everywhere if ``None``).

    ``parallel_state`` must be initialised; the TP size is read from it. Parameters are created in
    ``precision``'s dtype and moved to the current CUDA device where CUDA is available. Call
    ``torch.manual_seed(seed)`` (the same on every TP rank) first: it fixes the global weights.
    ``attention`` picks the core attention (:func:`monarch_megatron.parallel.core_attention_module`);
    ``monarch_options`` how the Monarch linears multiply (None: the process default);
    ``fused_cross_entropy`` takes the LM loss through :mod:`.cross_entropy` where it applies;
    ``fused_bias_dropout`` and ``fused_bias_gelu`` see :func:`transformer_config`;
    ``compiled_norm`` takes the layers' norms through :class:`~..parallel.norms.CompiledLayerNorm`;
    ``fused_linear_bias`` adds the qkv bias without a pass of its own (:mod:`..parallel.bias`).
    None of these options changes the function computed, so checkpoints do not depend on them.
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    vocab = model_cfg.padded_vocab_size
    if vocab % tp != 0:
        raise ValueError(
            f"padded vocab size {vocab} (make_vocab_size_divisible_by="
            f"{model_cfg.make_vocab_size_divisible_by}) is not divisible by tp_size={tp}"
        )
    config = transformer_config(model_cfg, precision, fused_bias_dropout=fused_bias_dropout,
                                fused_bias_gelu=fused_bias_gelu)
    if model_cfg.kind == "bert":
        model = SDPABertModel(
            config=config,
            num_tokentypes=2,
            transformer_layer_spec=get_bert_layer_spec(monarch, attention, monarch_options, compiled_norm,
                                                        fused_linear_bias),
            vocab_size=vocab,
            max_sequence_length=model_cfg.max_position_embeddings,
            add_binary_head=model_cfg.sentence_order,
            share_embeddings_and_output_weights=True,
            parallel_output=True,
        )
    else:
        model = FusedLossGPTModel(
            config=config,
            transformer_layer_spec=get_gpt_layer_spec(monarch, attention, monarch_options, compiled_norm,
                                                       fused_linear_bias),
            vocab_size=vocab,
            max_sequence_length=model_cfg.max_position_embeddings,
            share_embeddings_and_output_weights=True,
            parallel_output=True,
            position_embedding_type="learned_absolute",
        )
    model.fused_cross_entropy = fused_cross_entropy
    if model_cfg.kind == "bert":
        # BertLMHead's transform hard-codes the erf GELU; the model has one activation.
        model.lm_head.gelu = activation_function(model_cfg)
    # Some submodules (plain torch layers: position embeddings, pooler, LM-head dense) ignore
    # params_dtype; cast everything once. Master init was fp32, so this is the same cast.
    model.to(dtype=PRECISIONS[precision])
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def parameter_report(model: torch.nn.Module) -> dict[str, int]:
    """Global parameter counts (summed over TP shards): ``total``, ``monarch`` (in structured factors)
    and ``dense_equivalent`` (the same model with every Monarch linear dense)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()

    def global_numel(p: torch.Tensor) -> int:
        return p.numel() * (tp if getattr(p, "tensor_model_parallel", False) else 1)

    total = sum(global_numel(p) for p in model.parameters())
    monarch = 0
    dense_weights = 0
    for module in model.modules():
        if isinstance(module, StructuredParallelLinear):
            monarch += sum(global_numel(f) for f in module.factors())
            dense_weights += module.input_size * module.output_size
    return {"total": total, "monarch": monarch, "dense_equivalent": total - monarch + dense_weights}


def _masked_mean(per_token: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    mask = loss_mask.reshape(-1).float()
    return torch.sum(per_token.reshape(-1).float() * mask) / mask.sum().clamp(min=1.0)


def loss_names(kind: str, sentence_order: bool) -> tuple[str, ...]:
    """Names of the values :func:`forward_step` reports, in order: ``loss`` first, then Megatron's
    ``lm loss`` and (BERT with the sentence-order head) ``sop loss``."""
    return model_family(kind).loss_names(sentence_order)


class _MaskedPositionsGather:
    """Forward pre-hook of a BERT ``lm_head`` that keeps only the rows of the masked positions.

    megatron-core's ``BertModel`` runs its LM head, output layer and cross entropy over every token,
    although only the masked ~15% carry a loss; NVIDIA's MLPerf BERT (the paper's baseline) gathers
    them first. The hook swaps ``hidden_states [s, b, h]`` for ``[K, b, h]`` (``positions [b, K]``),
    so everything after it costs K/s of the full head; ``lm_labels`` must then be ``[b, K]``. It is
    a hook on the submodule (megatron's own forward is untouched) and a no-op while ``positions``
    is None.
    """

    def __init__(self) -> None:
        self.positions: torch.Tensor | None = None

    def __call__(self, module, args, kwargs):
        if self.positions is None:
            return None
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        index = self.positions.t().unsqueeze(-1).expand(-1, -1, hidden.shape[-1])  # [K, b, h]
        gathered = torch.gather(hidden, 0, index)
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": gathered}
        return (gathered, *args[1:]), kwargs


def _gather_hook(model: torch.nn.Module) -> _MaskedPositionsGather:
    hook = getattr(model.lm_head, "_masked_positions_gather", None)
    if hook is None:
        hook = _MaskedPositionsGather()
        model.lm_head.register_forward_pre_hook(hook, with_kwargs=True)
        model.lm_head._masked_positions_gather = hook
    return hook


def masked_positions(loss_mask: torch.Tensor, count: int) -> torch.Tensor:
    """``[b, count]`` indices of the masked positions of each row of ``loss_mask [b, s]`` (ascending),
    padded with unmasked positions where a row has fewer. A stable sort, not ``nonzero``: the
    shape is static and nothing waits for the device (CUDA-graph safe)."""
    order = torch.sort((loss_mask <= 0).to(torch.int8), dim=1, stable=True).indices
    return order[:, :count]


def forward_step(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], kind: str, *, masked_positions_bound: int | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one batch (megatron-core's native sample dicts, collated to ``[B, S]``).

    BERT: keys ``text``, ``types``, ``labels``, ``padding_mask`` (1 = real token), ``loss_mask``,
    ``is_random`` ``[B]``; loss = masked-LM loss (mean over ``loss_mask``) + sentence-order loss
    when the model has the binary head. GPT: ``tokens``, ``labels``, ``loss_mask``,
    ``position_ids``; loss = mean LM loss over ``loss_mask`` (causal mask built in attention).

    ``masked_positions_bound`` (BERT): an upper bound K on the masked positions of any sequence;
    the LM head then runs on those K positions per sequence only (same loss, K/s of the head's
    cost; see :class:`_MaskedPositionsGather`). ``model`` may be a DeepSpeed engine or the module.

    Nothing here reads a value back to the host (no synchronisation with the device).

    Returns:
        ``(loss, values)``: the scalar fp32 loss (differentiable) and ``{name: detached fp32 scalar}``
        for the names of :func:`loss_names` after ``loss``.
    """
    device = next(model.parameters()).device
    b = {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
    if kind == "bert":
        labels, loss_mask = b["labels"], b["loss_mask"]
        module = getattr(model, "module", model)
        hook = None
        if masked_positions_bound is not None and masked_positions_bound < labels.shape[1]:
            hook = _gather_hook(module)
            hook.positions = masked_positions(loss_mask, masked_positions_bound)
            labels = torch.gather(labels, 1, hook.positions)
            loss_mask = torch.gather(loss_mask, 1, hook.positions)
        try:
            lm_per_token, sop_logits = model(b["text"], b["padding_mask"], tokentype_ids=b["types"], lm_labels=labels)
        finally:
            if hook is not None:
                hook.positions = None
        lm_loss = _masked_mean(lm_per_token, loss_mask)
        values = {"lm loss": lm_loss.detach()}
        loss = lm_loss
        if sop_logits is not None and "is_random" in b:
            sop_loss = F.cross_entropy(
                sop_logits.view(-1, 2).float(), b["is_random"].view(-1).long(), ignore_index=-1
            )
            loss = lm_loss + sop_loss
            values["sop loss"] = sop_loss.detach()
        return loss, values
    if kind == "gpt":
        per_token = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
        loss = _masked_mean(per_token, b["loss_mask"])
        return loss, {"lm loss": loss.detach()}
    raise ValueError(f"kind must be 'bert' or 'gpt', got kind={kind!r}")
