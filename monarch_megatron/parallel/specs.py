"""BERT and GPT transformer-layer specs: megatron-core's local specs with structured linears swapped in.

``get_bert_layer_spec(monarch)`` / ``get_gpt_layer_spec(monarch)`` start from megatron-core's own
local specs (``bert_layer_local_spec``, ``get_gpt_layer_local_spec()``), deep-copied, and replace:

* the linears that ``monarch.layers`` names (``fc1``, ``fc2``: MLP; ``qkv``, ``proj``: attention)
  by the column-parallel (fc1, qkv) or row-parallel (fc2, proj) layer of ``monarch.kind``
  (:data:`~.layers.PARALLEL_LINEARS`: :class:`MonarchColumnParallelLinear` /
  :class:`MonarchRowParallelLinear`, or their block-diagonal siblings) with ``monarch.nblocks``
  blocks. This is the only way the structured layers enter megatron-core: no block is forked;
* the core attention: Transformer Engine's where it is installed, else :class:`SDPACoreAttention`
  (``attention="auto"``); ``"sdpa"``, ``"local"`` (megatron's ``DotProductAttention``) and ``"te"``
  select one explicitly. With ``monarch=None`` and ``attention="local"`` the spec *is* megatron's;
* with ``compiled_norm``, the two layer norms by :class:`~.norms.CompiledLayerNorm` (the same
  function and parameters, compiled kernels: the CUDA fast path);
* with ``fused_linear_bias``, the qkv linear by :class:`~.bias.FusedBiasColumnParallelLinear`
  (dense) or with its bias added by a compiled kernel (structured): :mod:`.bias`.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec

from ..monarch import MonarchOptions
from .attention import SDPACoreAttention
from .bias import FusedBiasColumnParallelLinear
from .kinds import KINDS
from .layers import PARALLEL_LINEARS
from .norms import CompiledLayerNorm

MONARCH_LAYERS = ("fc1", "fc2", "qkv", "proj")
ATTENTION_BACKENDS = ("auto", "sdpa", "local", "te")


@dataclass
class MonarchConfig:
    """Which linears of every transformer layer are structured, of which kind, with how many blocks.

    ``kind`` is ``"monarch"`` (default) or ``"blockdiag"`` (:data:`~.kinds.KINDS`); ``layers`` is a
    subset of ``("fc1", "fc2", "qkv", "proj")``; ``nblocks`` divides into each layer's widths as the
    kind's shapes allow, and the TP size must divide the layout (checked when the layer is built).
    """

    layers: tuple[str, ...] = MONARCH_LAYERS
    nblocks: int = 4
    kind: str = "monarch"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"MonarchConfig.kind must be one of {tuple(KINDS)}, got kind={self.kind!r}")
        layers = tuple(self.layers)  # YAML gives lists
        self.layers = layers
        unknown = [name for name in layers if name not in MONARCH_LAYERS]
        if unknown or len(set(layers)) != len(layers):
            raise ValueError(f"MonarchConfig.layers must be distinct names from {MONARCH_LAYERS}, got {layers}")
        if isinstance(self.nblocks, bool) or not isinstance(self.nblocks, int) or self.nblocks < 1:
            raise ValueError(f"MonarchConfig.nblocks must be a positive integer, got nblocks={self.nblocks!r}")

    def to_state(self) -> dict:
        """The ``monarch`` entry of a checkpoint's ``run_state.json``: ``{layers, nblocks}``, plus
        ``kind`` unless it is the default ``"monarch"`` (so Monarch entries read as they always have)."""
        state = {"layers": list(self.layers), "nblocks": self.nblocks}
        return state if self.kind == "monarch" else {"kind": self.kind, **state}

    @classmethod
    def from_state(cls, entry: dict) -> "MonarchConfig":
        """Inverse of :meth:`to_state` (an entry without ``kind`` is Monarch)."""
        return cls(layers=tuple(entry["layers"]), nblocks=int(entry["nblocks"]), kind=entry.get("kind", "monarch"))


def _te_core_attention():
    try:
        from megatron.core.extensions.transformer_engine import TEDotProductAttention
        import transformer_engine  # noqa: F401
    except ImportError:
        return None
    return TEDotProductAttention


def core_attention_module(attention: str = "auto") -> type:
    """The core-attention class ``attention`` selects (see the module docstring)."""
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got attention={attention!r}")
    if attention == "local":
        return DotProductAttention
    if attention == "sdpa":
        return SDPACoreAttention
    te = _te_core_attention()
    if attention == "te" and te is None:
        raise ImportError("attention='te' needs Transformer Engine, which is not importable")
    return te if te is not None else SDPACoreAttention


def _swap(spec: ModuleSpec, monarch: MonarchConfig | None, attention: str,
          options: MonarchOptions | None, compiled_norm: bool, fused_linear_bias: bool = False) -> ModuleSpec:
    """A deep copy of a local TransformerLayer spec with the chosen submodules replaced; the
    structured linears get ``options`` (Monarch backend, CUDA-graphed or not; None = the process
    default)."""
    spec = copy.deepcopy(spec)
    attn = spec.submodules.self_attention.submodules
    mlp = spec.submodules.mlp.submodules
    attn.core_attention = core_attention_module(attention)
    if compiled_norm:
        spec.submodules.input_layernorm = CompiledLayerNorm
        spec.submodules.pre_mlp_layernorm = CompiledLayerNorm
    if fused_linear_bias:
        attn.linear_qkv = FusedBiasColumnParallelLinear  # replaced below if qkv is structured
    if monarch is not None:
        layers = set(monarch.layers)
        column, row = PARALLEL_LINEARS[monarch.kind]["column"], PARALLEL_LINEARS[monarch.kind]["row"]
        params = {"nblocks": monarch.nblocks, "options": options}
        if "qkv" in layers:
            # SelfAttention calls linear_qkv(...) directly rather than through build_module, so
            # it must be a callable class, not a ModuleSpec.
            attn.linear_qkv = functools.partial(column, **params, compiled_bias=fused_linear_bias)
        if "proj" in layers:
            attn.linear_proj = ModuleSpec(module=row, params=dict(params))
        if "fc1" in layers:
            mlp.linear_fc1 = ModuleSpec(module=column, params=dict(params))
        if "fc2" in layers:
            mlp.linear_fc2 = ModuleSpec(module=row, params=dict(params))
    return spec


def get_bert_layer_spec(monarch: MonarchConfig | None = None, attention: str = "auto",
                        options: MonarchOptions | None = None, compiled_norm: bool = False,
                        fused_linear_bias: bool = False) -> ModuleSpec:
    """BERT layer spec (padding-mask attention): megatron's local spec with structured / SDPA swaps."""
    return _swap(bert_layer_local_spec, monarch, attention, options, compiled_norm, fused_linear_bias)


def get_gpt_layer_spec(monarch: MonarchConfig | None = None, attention: str = "auto",
                       options: MonarchOptions | None = None, compiled_norm: bool = False,
                       fused_linear_bias: bool = False) -> ModuleSpec:
    """GPT layer spec (causal attention): megatron's local spec with structured / SDPA swaps."""
    return _swap(get_gpt_layer_local_spec(), monarch, attention, options, compiled_norm, fused_linear_bias)
