"""Structured (Monarch and block-diagonal) linears with megatron-core's tensor-parallel linear contract.

``MonarchColumnParallelLinear`` / ``MonarchRowParallelLinear`` and ``BlockdiagColumnParallelLinear``
/ ``BlockdiagRowParallelLinear`` are drop-in replacements for ``ColumnParallelLinear`` /
``RowParallelLinear`` in megatron's ``MLP`` (fc1, fc2) and ``SelfAttention`` (qkv, proj): the same
constructor keywords, ``forward(x [s, b, h]) -> (out, bias or None)``, ``sharded_state_dict`` and
``backward_dw``. Each rank holds the factors that its kind's split
(:mod:`~monarch_megatron.parallel.kinds`, :mod:`~monarch_megatron.parallel.sharding`) gives it,
multiplies by them and communicates exactly as the dense layer does, through megatron's own
``tensor_parallel.mappings`` (DESIGN.md, "Tensor parallelism without extra communication").

Structure: :class:`StructuredParallelLinear` builds any kind (factors from the kind's record);
:class:`ColumnParallelStructured` / :class:`RowParallelStructured` hold the style's constructor
and communication; a kind mixin (:class:`_MonarchFactors`, :class:`_BlockdiagFactors`) the local
product and the local dense matrix. :data:`PARALLEL_LINEARS` maps (kind, style) to the class.

Initialisation is TP-invariant: the *global* factors are drawn on CPU from torch's default
generator (which every TP rank seeds identically, as megatron's ``use_cpu_initialization`` path
does for dense layers) and then split, so the same seed gives the same global matrix at any TP size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from megatron.core.utils import get_pg_rank, get_pg_size, get_tensor_model_parallel_group_if_none
from torch.nn import Parameter

from ..monarch import (
    MonarchOptions,
    blockdiag_multiply,
    blockdiag_to_dense,
    monarch_factor_shapes,
    monarch_multiply,
    monarch_to_dense,
)
from .bias import add_bias
from .kinds import BLOCKDIAG, MONARCH, LayerKind


def init_std(init_method: Callable | None, fallback: float) -> float:
    """The standard deviation of a megatron ``init_method`` (``partial(normal_, std=...)``).

    megatron builds ``config.init_method`` and ``config.output_layer_init_method`` (already scaled
    by ``1/sqrt(2 * num_layers)``) as such partials; a Monarch layer reproduces the dense layer's
    output variance for that std. Any other callable gives ``fallback``.
    """
    if isinstance(init_method, functools.partial) and "std" in init_method.keywords:
        return float(init_method.keywords["std"])
    return fallback


class StructuredParallelLinear(torch.nn.Module):
    """Shared construction of the structured parallel linears: ``kind`` (class attribute, a
    :class:`~.kinds.LayerKind`) says which factors, ``style`` (``"column"`` / ``"row"``) how they
    are sharded; the subclasses add the style's communication and the kind's local product."""

    style: str = ""
    kind: LayerKind

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: ModelParallelConfig,
        init_method: Callable | None,
        bias: bool,
        skip_bias_add: bool,
        stride: int,
        is_expert: bool,
        tp_group: torch.distributed.ProcessGroup | None,
        nblocks: int,
        fallback_std: float,
        name: str | None,
        options: MonarchOptions | None,
    ) -> None:
        super().__init__()
        # How a Monarch multiply runs (backend; CUDA-graphed or eager): from the layer spec. The
        # block-diagonal product is one cuBLAS batched GEMM on every device and takes none.
        self.options = options
        title = self.kind.title
        if is_expert:
            raise NotImplementedError(f"{title} layers are not supported as MoE experts (is_expert=True)")
        if stride != 1:
            # A strided (e.g. gated-linear-unit) layout interleaves per-rank chunks, which would make
            # the block-major output depend on the TP size.
            raise NotImplementedError(
                f"{title} layers support stride=1 only (got stride={stride}; gated_linear_unit "
                f"is not supported with a {title} fc1)"
            )
        self.input_size = input_size
        self.output_size = output_size
        self.nblocks = nblocks
        self.config = config
        self.skip_bias_add = skip_bias_add
        self.is_expert = False
        self.name = name
        self.tp_group = get_tensor_model_parallel_group_if_none(tp_group, is_expert=False)
        self.tp_size = get_pg_size(self.tp_group)
        self.tp_rank = get_pg_rank(self.tp_group)
        self.sequence_parallel = bool(config.sequence_parallel) and self.tp_size > 1
        layer = f"(in_features={input_size}, out_features={output_size})"
        shapes = self.kind.check_tp(input_size, output_size, nblocks, self.tp_size, self.style, layer)

        # Global factors on CPU from the default generator: identical on every TP rank, at every TP size.
        factors = tuple(torch.zeros(shape, dtype=torch.float32) for shape in shapes)
        if config.perform_initialization:
            self.kind.init(factors, input_size, init_std(init_method, fallback_std))
        local = self.kind.split(factors, self.tp_size, self.style)[self.tp_rank]
        device = torch.device("cpu") if config.use_cpu_initialization else _accelerator()
        for factor_name, tensor in zip(self.kind.factor_names, local):
            param = Parameter(tensor.to(device=device, dtype=config.params_dtype))
            # partition_dim is where the shard sits in the global tensor (e.g. Monarch w1 rows for a
            # column layer are strided: stride = q / l blocks of contiguous rows, see sharding.py).
            dim, pstride = self._partition(factor_name)
            set_tensor_model_parallel_attributes(param, True, dim, pstride)
            setattr(param, "allreduce", True)
            self.register_parameter(factor_name, param)
        if bias:
            self.bias = Parameter(
                torch.zeros(self._bias_size(), device=device, dtype=config.params_dtype)
            )
            setattr(self.bias, "allreduce", True)
        else:
            self.register_parameter("bias", None)
        # Same default-empty _extra_state as megatron's linears, so state dicts line up.
        self._register_load_state_dict_pre_hook(
            lambda state_dict, prefix, *args, **kwargs: state_dict.setdefault(f"{prefix}_extra_state")
        )

    # -- hooks for the subclasses -------------------------------------------------------------
    def _partition(self, factor_name: str) -> tuple[int, int]:
        """``(partition_dim, partition_stride)`` of a factor's shard in the global factor."""
        raise NotImplementedError

    def _bias_size(self) -> int:
        raise NotImplementedError

    def _local_multiply(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (..., local in)`` -> ``(..., local padded out)`` on this rank's factors."""
        raise NotImplementedError

    def _local_dense(self, factors: tuple[torch.Tensor, ...], in_features: int, out_features: int) -> torch.Tensor:
        """The ``(out_features, in_features)`` matrix of :meth:`_local_multiply` with ``factors``."""
        raise NotImplementedError

    def _checkpoint_views(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Distributed-checkpoint views of the parameters and their sharded axes (default: the
        parameters as they are, sharded on their ``partition_dim``; a column bias on axis 0)."""
        axes = {n: self._partition(n)[0] for n in self.kind.factor_names}
        if self.style == "column":
            axes["bias"] = 0
        return {}, axes

    # -- shared ---------------------------------------------------------------------------------
    @property
    def local_widths(self) -> tuple[int, int]:
        """``(in, out)`` features of this rank's product: column ``(in, out/t)``, row ``(in/t, out)``."""
        if self.style == "column":
            return self.input_size, self.output_size // self.tp_size
        return self.input_size // self.tp_size, self.output_size

    def factors(self) -> tuple[torch.Tensor, ...]:
        """This rank's factor parameters, in the kind's order."""
        return tuple(getattr(self, n) for n in self.kind.factor_names)

    @torch.no_grad()
    def local_dense_weight(self, *factors: torch.Tensor | None) -> torch.Tensor:
        """This rank's shard of the exact dense weight, in megatron's layout: ``(out/t, in)`` for a
        column layer (``ColumnParallelLinear``'s shard), ``(out, in/t)`` for a row layer
        (``RowParallelLinear``'s), float64, from this rank's factors alone (no communication).

        ``factors``: tensors to use instead of the parameters (e.g. fp32 master copies; ``None``
        entries fall back to the parameter), same shapes as :meth:`factors`.
        """
        own = self.factors()
        chosen = tuple((f if f is not None else p).detach().to(torch.float64)
                       for f, p in zip(factors + (None,) * (len(own) - len(factors)), own))
        return self._local_dense(chosen, *self.local_widths)

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> dict:
        """Distributed-checkpoint view (:meth:`_checkpoint_views`): each factor sharded on one
        axis; a column layer's bias on axis 0, a row layer's replicated."""
        views, axes = self._checkpoint_views()
        state_dict = self.state_dict(prefix="", keep_vars=True)
        state_dict.update(views)
        return make_sharded_tensors_for_checkpoint(
            state_dict, prefix, axes, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=(metadata or {}).get("dp_cp_group"),
        )

    def backward_dw(self) -> None:
        """Deferred weight-gradient computation is not used: weight gradients come with the
        input gradient, so this is a no-op (as in megatron's non-TE linears)."""

    def set_extra_state(self, state: Any) -> None:
        """Extra state is ignored (megatron's linears keep a ``None`` ``_extra_state``)."""

    def get_extra_state(self) -> None:
        """``None``: keeps the state-dict keys of megatron's linears."""
        return None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.input_size}, out_features={self.output_size}, kind={self.kind.name}, "
            f"nblocks={self.nblocks}, bias={self.bias is not None}, TP={self.tp_size}, "
            f"style={self.style}"
        )


def _accelerator() -> torch.device:
    """The current CUDA device, where megatron allocates parameters without CPU initialisation."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class ColumnParallelStructured(StructuredParallelLinear):
    """Column-parallel structured linear: input replicated, output sharded, as
    ``ColumnParallelLinear``. Rank ``t0`` produces output columns ``[t0*out/t, (t0+1)*out/t)`` of
    the global function and holds ``bias: (out/t,)``.

    forward: ``x: [s, b, in]`` (``[s/t, b, in]`` with sequence parallelism) ->
    ``(y: [s, b, out/t] (or [s, b, out] with gather_output), bias: [out/t] or None)``.
    """

    style = "column"

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: ModelParallelConfig,
        init_method: Callable | None = None,
        bias: bool = True,
        gather_output: bool = False,
        stride: int = 1,
        keep_master_weight_for_test: bool = False,
        skip_bias_add: bool = False,
        skip_weight_param_allocation: bool = False,
        embedding_activation_buffer: list | None = None,
        grad_output_buffer: list | None = None,
        is_expert: bool = False,
        tp_comm_buffer_name: str | None = None,
        disable_grad_reduce: bool = False,
        tp_group: torch.distributed.ProcessGroup | None = None,
        name: str | None = None,
        nblocks: int = 4,
        options: MonarchOptions | None = None,
        compiled_bias: bool = False,
    ) -> None:
        if skip_weight_param_allocation or keep_master_weight_for_test or disable_grad_reduce:
            raise NotImplementedError(
                f"{type(self).__name__} does not support skip_weight_param_allocation, "
                "keep_master_weight_for_test or disable_grad_reduce"
            )
        if embedding_activation_buffer is not None or grad_output_buffer is not None:
            raise NotImplementedError("deferred embedding wgrad buffers are not supported")
        self.gather_output = gather_output
        self.tp_comm_buffer_name = tp_comm_buffer_name
        self.compiled_bias = compiled_bias  # the bias add as a compiled kernel (parallel/bias.py)
        super().__init__(
            input_size, output_size, config=config, init_method=init_method, bias=bias,
            skip_bias_add=skip_bias_add, stride=stride, is_expert=is_expert, tp_group=tp_group,
            nblocks=nblocks, fallback_std=getattr(config, "init_method_std", 0.02), name=name, options=options,
        )
        if self.bias is not None:
            set_tensor_model_parallel_attributes(self.bias, True, 0, 1)
        self.output_size_per_partition = output_size // self.tp_size

    def _bias_size(self) -> int:
        return self.output_size // self.tp_size if self.tp_size > 1 else self.output_size

    def forward(
        self,
        input_: torch.Tensor,
        weight: torch.Tensor | None = None,
        runtime_gather_output: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``input_: [s, b, in]`` -> ``(output, output_bias)`` as ``ColumnParallelLinear``."""
        if weight is not None:
            raise NotImplementedError(f"{type(self).__name__} has its own factors; weight= is not supported")
        if self.sequence_parallel:
            # All-gather the sequence shards forward, reduce-scatter the input gradient backward.
            input_parallel = gather_from_sequence_parallel_region(input_, group=self.tp_group)
        else:
            # Identity forward, all-reduce of the input gradient backward.
            input_parallel = copy_to_tensor_model_parallel_region(input_, group=self.tp_group)
        output_parallel = self._local_multiply(input_parallel)
        if self.tp_size == 1 and output_parallel.shape[-1] != self.output_size:
            output_parallel = output_parallel[..., : self.output_size]
        if self.bias is not None and not self.skip_bias_add:
            output_parallel = (add_bias(output_parallel, self.bias) if self.compiled_bias
                               else output_parallel + self.bias)
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather:
            output = gather_from_tensor_model_parallel_region(output_parallel, group=self.tp_group)
        else:
            output = output_parallel
        return output, (self.bias if self.skip_bias_add else None)


class RowParallelStructured(StructuredParallelLinear):
    """Row-parallel structured linear: input sharded contiguously, output all-reduced, as
    ``RowParallelLinear``; every rank holds the full ``bias: (out,)``.

    forward: ``x: [s, b, in/t]`` -> ``(y: [s, b, out] (``[s/t, b, out]`` with sequence
    parallelism), bias: [out] or None)``.
    """

    style = "row"

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: ModelParallelConfig,
        init_method: Callable | None = None,
        bias: bool = True,
        input_is_parallel: bool = True,
        skip_bias_add: bool = False,
        stride: int = 1,
        keep_master_weight_for_test: bool = False,
        is_expert: bool = False,
        tp_comm_buffer_name: str | None = None,
        tp_group: torch.distributed.ProcessGroup | None = None,
        name: str | None = None,
        nblocks: int = 4,
        options: MonarchOptions | None = None,
    ) -> None:
        if keep_master_weight_for_test:
            raise NotImplementedError("keep_master_weight_for_test is not supported")
        if config.sequence_parallel and not input_is_parallel:
            raise RuntimeError("To enable `sequence_parallel`, `input_is_parallel` must be `True`")
        self.input_is_parallel = input_is_parallel
        self.tp_comm_buffer_name = tp_comm_buffer_name
        num_layers = getattr(config, "num_layers", None)
        std = getattr(config, "init_method_std", 0.02)
        # Without a megatron partial to read, scale like output_layer_init_method does.
        fallback = std / math.sqrt(2.0 * num_layers) if num_layers else std
        super().__init__(
            input_size, output_size, config=config, init_method=init_method, bias=bias,
            skip_bias_add=skip_bias_add, stride=stride, is_expert=is_expert, tp_group=tp_group,
            nblocks=nblocks, fallback_std=fallback, name=name, options=options,
        )
        if self.bias is not None:
            setattr(self.bias, "sequence_parallel", self.sequence_parallel)
        self.input_size_per_partition = input_size // self.tp_size

    def _bias_size(self) -> int:
        return self.output_size

    def forward(self, input_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``input_: [s, b, in/t]`` -> ``(output, output_bias)`` as ``RowParallelLinear``."""
        if self.input_is_parallel:
            input_parallel = input_
        else:
            input_parallel = scatter_to_tensor_model_parallel_region(input_, group=self.tp_group)
        # Partial sums of the full output; cut the padding before communicating.
        output_parallel = self._local_multiply(input_parallel)
        if output_parallel.shape[-1] != self.output_size:
            # The collectives work in place on contiguous buffers.
            output_parallel = output_parallel[..., : self.output_size].contiguous()
        if self.sequence_parallel:
            output_ = reduce_scatter_to_sequence_parallel_region(output_parallel, group=self.tp_group)
        else:
            output_ = reduce_from_tensor_model_parallel_region(output_parallel, group=self.tp_group)
        if self.skip_bias_add:
            return output_, self.bias
        return (output_ + self.bias if self.bias is not None else output_), None


class _MonarchFactors:
    """Kind mixin: Monarch factors ``blkdiag1: (k, q, p)``, ``blkdiag2: (l, s, r)`` (global shapes;
    the rank's shard: :mod:`.sharding`) multiplied in the class's ``output_permutation``."""

    kind = MONARCH
    output_permutation: bool = True

    @property
    def shape(self):
        """The global :class:`~monarch_megatron.monarch.MonarchShape`."""
        return monarch_factor_shapes(self.input_size, self.output_size, self.nblocks)

    def _local_multiply(self, x: torch.Tensor) -> torch.Tensor:
        return monarch_multiply(x, self.blkdiag1, self.blkdiag2, self.output_permutation, self.options)

    def _local_dense(self, factors: tuple[torch.Tensor, ...], in_features: int, out_features: int) -> torch.Tensor:
        # Column: the rank's factors with block-major output compute exactly its contiguous output
        # slice; row: they map its contiguous input range to a partial sum of the full output.
        return monarch_to_dense(factors[0], factors[1], in_features, out_features, self.output_permutation)


class _BlockdiagFactors:
    """Kind mixin: one block-diagonal factor ``blkdiag: (b, s, p)`` (global shape; each rank
    holds ``b/t`` whole blocks, :mod:`.sharding`) multiplied by one batched GEMM per product."""

    kind = BLOCKDIAG

    def _partition(self, factor_name: str) -> tuple[int, int]:
        return 0, 1

    def _block_range(self) -> dict[str, int]:
        """Where the rank's blocks sit (:func:`~monarch_megatron.monarch.blockdiag_multiply`):
        column: they read input blocks ``[t0*b/t, ...)`` of the replicated input; row: they write
        output blocks ``[t0*b/t, ...)`` of the full output (zeros elsewhere, summed by the reduce)."""
        if self.tp_size == 1:
            return {}
        first = self.tp_rank * (self.nblocks // self.tp_size)
        if self.style == "column":
            return {"in_blocks": self.nblocks, "in_block": first}
        return {"out_blocks": self.nblocks, "out_block": first}

    def _local_multiply(self, x: torch.Tensor) -> torch.Tensor:
        return blockdiag_multiply(x, self.blkdiag, **self._block_range())

    def _local_dense(self, factors: tuple[torch.Tensor, ...], in_features: int, out_features: int) -> torch.Tensor:
        return blockdiag_to_dense(factors[0], in_features, out_features, **self._block_range())


class MonarchColumnParallelLinear(_MonarchFactors, ColumnParallelStructured):
    """Column-parallel Monarch linear: input replicated, block-major output sharded.

    Global function: ``y = x @ M^T + bias`` with ``M`` the Monarch matrix of the global factors and
    *block-major* output order (``output_permutation=False``). Rank ``t0`` holds
    ``blkdiag1: (k, q/t, p)``, ``blkdiag2: (l/t, s, r)`` and ``bias: (out/t,)`` and produces output
    columns ``[t0*out/t, (t0+1)*out/t)``, like ``ColumnParallelLinear``.
    """

    output_permutation = False

    def _partition(self, factor_name: str) -> tuple[int, int]:
        if factor_name == "blkdiag1":
            return 1, self.shape.q // self.shape.l if self.shape.q % self.shape.l == 0 else 1
        return 0, 1

    def _checkpoint_views(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """``blkdiag1`` as ``(k, q/l, l, p)`` sharded on axis 2, ``blkdiag2`` and ``bias`` on axis 0.

        The rank's w1 rows are ``w1.view(k, q/l, l, p)[:, :, J]``: contiguous along axis 2 of that
        4-D view, which is how the distributed checkpoint stores w1 (at every TP size)."""
        k, q_r, p = self.blkdiag1.shape
        q, l = self.shape.q, self.shape.l
        if q % l != 0:  # only possible at tp_size 1
            return {}, {"blkdiag1": 1, "blkdiag2": 0, "bias": 0}
        return {"blkdiag1": self.blkdiag1.view(k, q // l, q_r // (q // l), p)}, {"blkdiag1": 2, "blkdiag2": 0, "bias": 0}


class MonarchRowParallelLinear(_MonarchFactors, RowParallelStructured):
    """Row-parallel Monarch linear: input sharded contiguously, output all-reduced.

    Global function: ``y = x @ M^T + bias`` in the paper's output order
    (``output_permutation=True``), so the output can enter the residual stream. Rank ``t0`` holds
    ``blkdiag1: (k/t, q, p)``, ``blkdiag2: (l, s, r/t)`` and the full ``bias: (out,)``;
    the distributed checkpoint shards ``blkdiag1`` on axis 0 and ``blkdiag2`` on axis 2.
    """

    output_permutation = True

    def _partition(self, factor_name: str) -> tuple[int, int]:
        return (0, 1) if factor_name == "blkdiag1" else (2, 1)


class BlockdiagColumnParallelLinear(_BlockdiagFactors, ColumnParallelStructured):
    """Column-parallel block-diagonal linear: input replicated, output sharded.

    Global function: ``y = x @ B^T + bias`` with ``B`` the block-diagonal matrix of the global
    ``blkdiag: (b, s, p)`` (:mod:`monarch_megatron.monarch.blockdiag`). Rank ``t0`` holds blocks
    ``J = [t0*b/t, (t0+1)*b/t)`` (``blkdiag: (b/t, s, p)``) and ``bias: (out/t,)``: its output
    columns ``[t0*out/t, (t0+1)*out/t)`` are those blocks applied to input blocks ``J``. Checkpoint:
    ``blkdiag`` and ``bias`` sharded on axis 0.
    """


class BlockdiagRowParallelLinear(_BlockdiagFactors, RowParallelStructured):
    """Row-parallel block-diagonal linear: input sharded contiguously, output all-reduced.

    Global function: ``y = x @ B^T + bias`` as the column layer's. Rank ``t0`` holds the blocks
    ``J = [t0*b/t, (t0+1)*b/t)`` its input slice feeds and the full ``bias: (out,)``; its partial
    output is those blocks' outputs and zeros elsewhere, which megatron's all-reduce (or
    reduce-scatter, with sequence parallelism) sums into the full output, as ``RowParallelLinear``'s
    contract says. (An all-gather of the blocks would move half the bytes, but would change that
    contract.) Checkpoint: ``blkdiag`` sharded on axis 0, ``bias`` replicated.
    """


# (kind, style) -> the TP layer class: what the layer specs build.
PARALLEL_LINEARS: dict[str, dict[str, type[StructuredParallelLinear]]] = {
    MONARCH.name: {"column": MonarchColumnParallelLinear, "row": MonarchRowParallelLinear},
    BLOCKDIAG.name: {"column": BlockdiagColumnParallelLinear, "row": BlockdiagRowParallelLinear},
}
