"""Hugging Face ``transformers`` <-> megatron-core: the name and layout mapping (no file I/O).

Our GPT is ``GPT2LMHeadModel``, our BERT is ``MegatronBertForPreTraining`` (transformers' class
for Megatron's pre-LayerNorm BERT). Both sides compute the same function, entry by entry:

* embeddings: word (+ token type, BERT) + learned absolute positions, dropout, no LayerNorm;
* pre-LayerNorm layers: ``x + proj(attn(LN1(x)))``, then ``x + fc2(gelu(fc1(LN2(x))))``;
  scores scaled by ``1/sqrt(head_dim)``; a final LayerNorm;
* GPT: logits ``h @ wte^T`` (tied, no bias). BERT: ``LN(gelu(dense(h))) @ E^T + b`` (tied), and
  the binary head ``seq_relationship(tanh(pooler(h[:, 0])))``: our sentence-order head (label
  ``is_random``, 0 = in order), in the place of HF's next-sentence head (0 = continuation).

What differs is storage. :data:`FAMILIES` (one table per model kind, the single source of truth
for state-dict names; :data:`CONFIG_NAMES` and :data:`FIXED` are the same for config attributes)
says how each megatron entry is laid out in HF (``Rule.layout``):

* ``qkv``: megatron's fused ``linear_qkv`` ``(3h, h)`` / ``(3h,)`` is grouped per head, rows
  ``[np, 3, hn]`` (query, key, value of head 0, then of head 1, ...; a TP rank holds whole heads).
  HF keeps three blocks ``[q | k | v]``, each ``[np, hn]``: separate ``query`` / ``key`` /
  ``value`` linears (BERT, ``qkv_split``) or one ``c_attn`` (GPT-2, ``qkv_conv1d``).
* ``conv1d``: GPT-2's ``Conv1D`` computes ``x @ W + b`` with ``W (in, out)``: the transpose of a
  ``nn.Linear`` / megatron weight ``(out, in)``.
* ``vocab``: megatron pads the vocabulary to a multiple of ``make_vocab_size_divisible_by``
  (TP-independent); HF holds exactly ``vocab_size`` rows. Export cuts the padded rows (never a
  target, so HF's softmax is ours conditioned on real tokens); import pads with zero rows (logit
  0 for GPT; BERT's padded output bias is 0 too). Logits over the real vocabulary are equal.
* ``extra_state``: megatron's ``_extra_state`` entries (``None`` for the local spec) have no HF
  counterpart; import writes ``None``.

HF-only entries: tied copies (``lm_head.weight``, ``cls.predictions.decoder.*``; ``save_pretrained``
omits them, older files may hold them, then they must equal what they are tied to) and buffers
(GPT-2's causal mask ``attn.bias`` / ``attn.masked_bias`` in old files, BERT's ``position_ids``).

Model features HF's classes cannot express (BERT without the sentence-order head), and HF
features our models cannot (other activations, untied heads, cross attention, ...), are refused by
:func:`hf_config` / :func:`model_from_hf_config` with :class:`~.checkpoint.ConversionError`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from ..models import ModelConfig
from .checkpoint import ConversionError

# What every model this project builds uses and no config key changes (models/builder.py keeps
# megatron-core's TransformerConfig defaults for these): LayerNorm epsilon, learned absolute
# positions, biases everywhere, tied output embeddings. The GELU is ModelConfig.activation.
LAYERNORM_EPS: float = TransformerConfig.__dataclass_fields__["layernorm_epsilon"].default
HF_ACTIVATION = "gelu"
EXACT_GELU = ("gelu", "gelu_python")  # HF activation names that are erf GELU
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # the tanh approximation (GPT-2's default)
# ModelConfig.activation -> the HF activation name export writes (import maps every name above).
HF_ACTIVATIONS = {"gelu": HF_ACTIVATION, "gelu_tanh": "gelu_new"}  # GPT-2's own name for it
BERT_TOKENTYPES = 2  # models/builder.py: num_tokentypes=2


@dataclass(frozen=True)
class Rule:
    """One megatron state-dict entry and the HF entries it becomes.

    ``megatron`` / ``hf`` are key templates; ``{i}`` is the transformer layer index. ``layout``
    is a key of :data:`LAYOUTS` (module docstring).
    """

    megatron: str
    hf: tuple[str, ...]
    layout: str = "same"


@dataclass(frozen=True)
class Family:
    """How one model kind maps onto one transformers class.

    Attributes:
        kind: ``ModelConfig.kind``.
        architecture / model_type / config_class: the transformers model class, its
            ``config.model_type`` and its config class.
        rules: every megatron entry of the dense local-spec model, in its state-dict order.
        tied: HF keys that are copies of other HF keys (``{copy: source}``).
        buffers: regexes of HF entries that are not parameters (ignored on import).
        hf_prefix: the base model's prefix (files saved from the base model lack it).
    """

    kind: str
    architecture: str
    model_type: str
    config_class: str
    rules: tuple[Rule, ...]
    tied: dict[str, str]
    buffers: tuple[str, ...]
    hf_prefix: str


def _linear(megatron: str, hf: str, layout: str = "same") -> tuple[Rule, ...]:
    """weight, bias and megatron's ``_extra_state`` of one linear."""
    return (Rule(f"{megatron}.weight", (f"{hf}.weight",), layout), Rule(f"{megatron}.bias", (f"{hf}.bias",)),
            Rule(f"{megatron}._extra_state", (), "extra_state"))


def _norm(megatron: str, hf: str) -> tuple[Rule, ...]:
    return Rule(f"{megatron}.weight", (f"{hf}.weight",)), Rule(f"{megatron}.bias", (f"{hf}.bias",))


def _qkv(megatron: str, hf: tuple[str, ...], layout: str) -> tuple[Rule, ...]:
    return (Rule(f"{megatron}.weight", tuple(f"{k}.weight" for k in hf), layout),
            Rule(f"{megatron}.bias", tuple(f"{k}.bias" for k in hf), layout),
            Rule(f"{megatron}._extra_state", (), "extra_state"))


_GL, _GH = "decoder.layers.{i}.", "transformer.h.{i}."
GPT2 = Family(
    kind="gpt", architecture="GPT2LMHeadModel", model_type="gpt2", config_class="GPT2Config", hf_prefix="transformer.",
    rules=(
        Rule("embedding.word_embeddings.weight", ("transformer.wte.weight",), "vocab"),
        Rule("embedding.position_embeddings.weight", ("transformer.wpe.weight",)),
        *_norm(_GL + "input_layernorm", _GH + "ln_1"),
        *_linear(_GL + "self_attention.linear_proj", _GH + "attn.c_proj", "conv1d"),
        *_qkv(_GL + "self_attention.linear_qkv", (_GH + "attn.c_attn",), "qkv_conv1d"),
        *_norm(_GL + "pre_mlp_layernorm", _GH + "ln_2"),
        *_linear(_GL + "mlp.linear_fc1", _GH + "mlp.c_fc", "conv1d"),
        *_linear(_GL + "mlp.linear_fc2", _GH + "mlp.c_proj", "conv1d"),
        *_norm("decoder.final_layernorm", "transformer.ln_f"),
        Rule("output_layer._extra_state", (), "extra_state"),
    ),
    tied={"lm_head.weight": "transformer.wte.weight"},
    buffers=(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$",),
)

_BL, _BH = "encoder.layers.{i}.", "bert.encoder.layer.{i}."
MEGATRON_BERT = Family(
    kind="bert", architecture="MegatronBertForPreTraining", model_type="megatron-bert",
    config_class="MegatronBertConfig", hf_prefix="bert.",
    rules=(
        Rule("embedding.word_embeddings.weight", ("bert.embeddings.word_embeddings.weight",), "vocab"),
        Rule("embedding.position_embeddings.weight", ("bert.embeddings.position_embeddings.weight",)),
        Rule("embedding.tokentype_embeddings.weight", ("bert.embeddings.token_type_embeddings.weight",)),
        *_norm(_BL + "input_layernorm", _BH + "attention.ln"),
        *_linear(_BL + "self_attention.linear_proj", _BH + "attention.output.dense"),
        *_qkv(_BL + "self_attention.linear_qkv",
              tuple(_BH + f"attention.self.{n}" for n in ("query", "key", "value")), "qkv_split"),
        *_norm(_BL + "pre_mlp_layernorm", _BH + "ln"),
        *_linear(_BL + "mlp.linear_fc1", _BH + "intermediate.dense"),
        *_linear(_BL + "mlp.linear_fc2", _BH + "output.dense"),
        *_norm("encoder.final_layernorm", "bert.encoder.ln"),
        Rule("lm_head.dense.weight", ("cls.predictions.transform.dense.weight",)),
        Rule("lm_head.dense.bias", ("cls.predictions.transform.dense.bias",)),
        *_norm("lm_head.layer_norm", "cls.predictions.transform.LayerNorm"),
        Rule("output_layer.bias", ("cls.predictions.bias",), "vocab"),
        Rule("output_layer._extra_state", (), "extra_state"),
        Rule("binary_head.weight", ("cls.seq_relationship.weight",)),
        Rule("binary_head.bias", ("cls.seq_relationship.bias",)),
        Rule("pooler.dense.weight", ("bert.pooler.dense.weight",)),
        Rule("pooler.dense.bias", ("bert.pooler.dense.bias",)),
    ),
    tied={"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
          "cls.predictions.decoder.bias": "cls.predictions.bias"},
    buffers=(r"^bert\.embeddings\.position_ids$",),
)

FAMILIES: dict[str, Family] = {f.kind: f for f in (GPT2, MEGATRON_BERT)}
BY_ARCHITECTURE: dict[str, Family] = {f.architecture: f for f in FAMILIES.values()}


def expand(family: Family, num_layers: int) -> list[tuple[str, tuple[str, ...], str]]:
    """``(megatron key, HF keys, layout)`` of every entry of a ``num_layers`` model, in megatron's order."""
    out = []
    for rule in family.rules:
        layers = range(num_layers) if "{i}" in rule.megatron else (None,)
        for i in layers:
            fmt = {} if i is None else {"i": i}
            out.append((rule.megatron.format(**fmt), tuple(k.format(**fmt) for k in rule.hf), rule.layout))
    return out


# -- tensor layouts --------------------------------------------------------------------------------
def _heads_to_blocks(t: torch.Tensor, heads: int) -> torch.Tensor:
    """megatron's per-head fused rows ``(3h, *rest)`` ordered ``[np, 3, hn]`` -> ``(3, h, *rest)``
    (query, key, value blocks, each ``[np, hn]``)."""
    rest = t.shape[1:]
    hn = t.shape[0] // (3 * heads)
    return t.reshape(heads, 3, hn, *rest).transpose(0, 1).reshape(3, heads * hn, *rest)


def _blocks_to_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of :func:`_heads_to_blocks`: ``(3, h, *rest)`` -> ``(3h, *rest)`` ordered ``[np, 3, hn]``."""
    rest = t.shape[2:]
    hn = t.shape[1] // heads
    return t.reshape(3, heads, hn, *rest).transpose(0, 1).reshape(3 * heads * hn, *rest)


def _conv1d(t: torch.Tensor) -> torch.Tensor:
    return t.t() if t.dim() == 2 else t  # Conv1D (in, out) <-> Linear (out, in); biases as they are


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


# layout -> (megatron tensor -> HF tensors, HF tensors -> megatron tensor); m is the ModelConfig.
LAYOUTS: dict[str, tuple[Callable[..., tuple[torch.Tensor, ...]], Callable[..., torch.Tensor | None]]] = {
    "same": (lambda t, m: (t,), lambda ts, m: ts[0]),
    "vocab": (lambda t, m: (t[: m.vocab_size],), lambda ts, m: _pad_rows(ts[0], m.padded_vocab_size)),
    "conv1d": (lambda t, m: (_conv1d(t),), lambda ts, m: _conv1d(ts[0])),
    "qkv_split": (lambda t, m: tuple(_heads_to_blocks(t, m.num_attention_heads).unbind(0)),
                  lambda ts, m: _blocks_to_heads(torch.stack(ts), m.num_attention_heads)),
    "qkv_conv1d": (lambda t, m: (_conv1d(_heads_to_blocks(t, m.num_attention_heads).flatten(0, 1)),),
                   lambda ts, m: _blocks_to_heads(_conv1d(ts[0]).unflatten(0, (3, -1)), m.num_attention_heads)),
    "extra_state": (lambda t, m: (), lambda ts, m: None),
}


def _mismatch(what: str, unknown: list[str], missing: list[str]) -> ConversionError:
    parts = ([f"entries without a counterpart {unknown[:5]}"] if unknown else []) + (
        [f"missing entries {missing[:5]}"] if missing else [])
    return ConversionError(f"{what}: {'; '.join(parts)}")


def to_hf_state(state: dict[str, Any], model: ModelConfig) -> dict[str, torch.Tensor]:
    """HF state dict (tied copies omitted, as ``save_pretrained`` writes it) of the global dense
    megatron ``state`` (TP-merged; every tensor of :func:`expand`'s keys).

    Raises:
        ConversionError: ``state`` holds entries the HF class has no place for (e.g. Monarch
            factors, an untied output layer), or lacks some.
    """
    family = FAMILIES[model.kind]
    table = expand(family, model.num_layers)
    known = {k for k, _, _ in table}
    extra = [k for k in state if k not in known]
    missing = [k for k in known if k not in state]
    if extra or missing:
        raise _mismatch(f"the checkpoint's {model.kind} model does not fit {family.architecture}", extra, missing)
    out: dict[str, torch.Tensor] = {}
    for key, hf_keys, layout in table:
        for hf_key, tensor in zip(hf_keys, LAYOUTS[layout][0](state[key], model)):
            out[hf_key] = tensor.contiguous()
    return out


def from_hf_state(tensors: dict[str, torch.Tensor], model: ModelConfig, family: Family) -> dict[str, Any]:
    """Global dense megatron state dict (megatron's key order, padded vocabulary, ``_extra_state``
    ``None``) of an HF state dict.

    ``tensors`` may hold the tied copies (they must equal their sources), buffers, and lack the
    base-model prefix (a file saved from the base model); anything else unknown is refused.

    Raises:
        ConversionError: missing or unknown entries, untied copies, wrong shapes.
    """
    if not any(k.startswith(family.hf_prefix) for k in tensors):
        tensors = {family.hf_prefix + k: v for k, v in tensors.items()}
    table = expand(family, model.num_layers)
    wanted = {k for _, hf_keys, _ in table for k in hf_keys}
    for copy, source in family.tied.items():
        if copy in tensors and source in tensors and not torch.equal(tensors[copy], tensors[source]):
            raise ConversionError(f"{copy} differs from {source}: an untied output layer, which our "
                                  f"{family.kind} model (tied output embeddings) cannot express")
    ignored = [re.compile(p) for p in family.buffers]
    unknown = [k for k in tensors if k not in wanted and k not in family.tied and not any(p.match(k) for p in ignored)]
    missing = sorted(wanted - set(tensors))
    if unknown or missing:
        raise _mismatch(f"not a {family.architecture} state dict of this configuration", unknown, missing)
    state: dict[str, Any] = {}
    for key, hf_keys, layout in table:
        value = LAYOUTS[layout][1](tuple(tensors[k] for k in hf_keys), model)
        state[key] = value if value is None else value.contiguous()
    _check_shapes(state, model)
    return state


def _check_shapes(state: dict[str, Any], model: ModelConfig) -> None:
    h, f, v = model.hidden_size, model.ffn_hidden_size, model.padded_vocab_size
    expected = {"word_embeddings.weight": (v, h), "position_embeddings.weight": (model.max_position_embeddings, h),
                "tokentype_embeddings.weight": (BERT_TOKENTYPES, h), "linear_qkv.weight": (3 * h, h),
                "linear_qkv.bias": (3 * h,), "linear_proj.weight": (h, h), "linear_fc1.weight": (f, h),
                "linear_fc1.bias": (f,), "linear_fc2.weight": (h, f), "output_layer.bias": (v,),
                "binary_head.weight": (2, h)}
    for key, value in state.items():
        shape = next((s for suffix, s in expected.items() if key.endswith(suffix)), None)
        if value is not None and shape is not None and tuple(value.shape) != shape:
            raise ConversionError(f"{key} would have shape {tuple(value.shape)}, expected {shape} for the "
                                  "configuration in config.json")


# -- configurations --------------------------------------------------------------------------------
def model_config(entry: dict[str, Any]) -> ModelConfig:
    """The ``ModelConfig`` of a checkpoint's ``run_state.json`` ``model`` entry.

    Raises:
        ConversionError: unknown keys (a model feature this exporter does not know) or bad values.
    """
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ConversionError(f"the checkpoint's model has settings this exporter does not know: {unknown}; "
                              "it cannot tell whether transformers can express them")
    try:
        return ModelConfig(**entry)
    except (TypeError, ValueError) as err:
        raise ConversionError(f"run_state.json 'model' entry is not a model configuration: {err}") from None


# ModelConfig field -> the transformers config attribute that holds it (export writes, import reads).
CONFIG_NAMES: dict[str, dict[str, str]] = {
    "gpt": {"num_layers": "n_layer", "hidden_size": "n_embd", "num_attention_heads": "n_head",
            "ffn_hidden_size": "n_inner", "vocab_size": "vocab_size", "max_position_embeddings": "n_positions",
            "hidden_dropout": "resid_pdrop", "attention_dropout": "attn_pdrop", "init_method_std": "initializer_range"},
    "bert": {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size",
             "num_attention_heads": "num_attention_heads", "ffn_hidden_size": "intermediate_size",
             "vocab_size": "vocab_size", "max_position_embeddings": "max_position_embeddings",
             "hidden_dropout": "hidden_dropout_prob",
             "attention_dropout": "attention_probs_dropout_prob", "init_method_std": "initializer_range"},
}
# transformers config attribute -> the value every model of ours has (export writes it, import
# requires it; an EPSILON mismatch is near, the rest cannot be expressed). The activation is not
# fixed: it is ModelConfig.activation (ACTIVATION, HF_ACTIVATIONS).
FIXED: dict[str, dict[str, Any]] = {
    "gpt": {"layer_norm_epsilon": LAYERNORM_EPS, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False, "tie_word_embeddings": True},
    "bert": {"layer_norm_eps": LAYERNORM_EPS, "type_vocab_size": BERT_TOKENTYPES,
             "is_decoder": False, "add_cross_attention": False, "tie_word_embeddings": True,
             # not an attribute of MegatronBertConfig in transformers 5; older config files may carry it
             "position_embedding_type": "absolute"},
}
ACTIVATION = {"gpt": "activation_function", "bert": "hidden_act"}
EPSILON = {"gpt": "layer_norm_epsilon", "bert": "layer_norm_eps"}


def hf_config(model: ModelConfig, special_ids: dict[str, int] | None = None) -> Any:
    """The transformers config (``GPT2Config`` / ``MegatronBertConfig``) of ``model``.

    ``special_ids``: the tokenizer's ``bos`` / ``eos`` / ``pad`` ids, where known.

    Raises:
        ConversionError: a feature the target class cannot express (BERT without the
            sentence-order head: ``MegatronBertForPreTraining`` always has pooler and binary head).
    """
    transformers = require_transformers()
    if model.kind == "bert" and not model.sentence_order:
        raise ConversionError("MegatronBertForPreTraining always has the pooler and the binary (next-sentence) head, "
                              "but this BERT was built without them (model.sentence_order: false); there are no "
                              "weights to export for cls.seq_relationship / bert.pooler")
    family = FAMILIES[model.kind]
    fixed = {k: v for k, v in FIXED[model.kind].items() if k != "position_embedding_type"}
    fixed[ACTIVATION[model.kind]] = HF_ACTIVATIONS[model.activation]
    ids = {f"{k}_token_id": v for k, v in (special_ids or {}).items()}
    if model.kind == "gpt":  # megatron drops the embeddings with hidden_dropout too
        ids = {"bos_token_id": None, "eos_token_id": None, **ids, "embd_pdrop": model.hidden_dropout}
    return getattr(transformers, family.config_class)(
        architectures=[family.architecture], **fixed, **ids,
        **{hf: getattr(model, ours) for ours, hf in CONFIG_NAMES[model.kind].items()})


def model_from_hf_config(config: Any, family: Family, make_vocab_size_divisible_by: int,
                         accept_approximation: bool) -> tuple[ModelConfig, list[str]]:
    """Our ``ModelConfig`` of ``family``'s transformers config, and the approximations accepted.

    Exact features are required (either GELU: ``activation``); the near one (another LayerNorm
    epsilon) is refused unless ``accept_approximation``, and then returned as sentences.

    Raises:
        ConversionError: a feature our models cannot express.
    """
    kind = family.kind
    differ = {k: getattr(config, k, ours) for k, ours in FIXED[kind].items() if getattr(config, k, ours) != ours}
    act, eps = getattr(config, ACTIVATION[kind], HF_ACTIVATION), differ.pop(EPSILON[kind], None)
    refused = [f"{k}={v!r} (ours: {FIXED[kind][k]!r})" for k, v in differ.items()]
    if act not in EXACT_GELU and act not in TANH_GELU:
        refused.append(f"{ACTIVATION[kind]}={act!r} (ours: erf GELU or its tanh approximation)")
    if refused:
        raise ConversionError(f"{family.architecture} with {', '.join(refused)}: our {kind} model cannot express this")
    near = []
    if eps is not None:
        near.append(f"LayerNorm epsilon {eps:g}; our models use {LAYERNORM_EPS:g}")
    if near and not accept_approximation:
        raise ConversionError(f"{family.architecture} differs from our {kind} model: {'; '.join(near)}. "
                              "Pass --accept-approximation to import it anyway (the imported model then computes "
                              "a slightly different function; fine-tuning adapts to it)")
    fields_ = {ours: getattr(config, hf) for ours, hf in CONFIG_NAMES[kind].items()}
    fields_["ffn_hidden_size"] = fields_["ffn_hidden_size"] or 4 * fields_["hidden_size"]  # GPT-2's n_inner=None
    try:
        model = ModelConfig(kind=kind, sentence_order=kind == "bert", **fields_,
                            make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                            activation="gelu_tanh" if act in TANH_GELU else "gelu")
    except ValueError as err:
        raise ConversionError(f"config.json: {err}") from None
    return model, near


def require_transformers():
    """The ``transformers`` module, or a ConversionError saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise ConversionError("Hugging Face interop needs transformers and safetensors: "
                              "pip install -e '.[hf]' -c constraints.txt") from None
    return transformers
