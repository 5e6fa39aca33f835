"""The micro-steps of one optimizer step: forward and backward of each micro-batch, gradients
accumulated where DeepSpeed ZeRO-1 reads them, losses kept on the device.

Two runners with one contract, ``run(batches, accumulation) -> values [n]`` (the step's mean of
:func:`~monarch_megatron.models.loss_names`, an fp32 device tensor: nothing is read back to the
host), after which the caller's ``engine.step()`` reduces and applies the gradients. The DeepSpeed
engine runs with ``managed_gradient_accumulation: false`` (engine.py), so that ``step()`` is the
accumulation boundary whichever runner produced the gradients.

* :class:`EagerMicroSteps` (``training.fast_step: false``): DeepSpeed's own path, ``engine(...)``
  and ``engine.backward(loss)`` per micro-batch. On a GPU every op of the model is issued from
  Python each time: at BERT-large widths that host time, not the GPU, bounds the step.
* :class:`StaticMicroSteps` (the default): one micro-step is a fixed computation on fixed
  buffers. The micro-batch is copied into static input tensors, ``torch.autograd.grad`` gives the
  gradients of ``loss / accumulation * loss_scale`` (what ``engine.backward`` would back-propagate)
  and they are added into one flat gradient buffer; the losses are added into a device tensor. On
  CUDA this is captured once as a CUDA graph (``training.cuda_graphs``) and replayed: one launch
  per micro-step instead of thousands. On CPU the same function runs eagerly, which is how the CPU
  tests check it against the eager path. At the boundary the flat buffer's views become the
  parameters' ``.grad`` (:func:`.engine.hand_over_gradients`).

What a captured graph relies on (each checked or arranged here): static shapes (one phase has one
micro-batch shape); parameters that keep their storage (DeepSpeed's ZeRO-1 updates them in place;
checked at every boundary, a change recaptures); random numbers from generators registered with
the graph (megatron's graph-safe RNG tracker, seeded in place: distributed.seed_everything); no
host synchronisation inside the step (models.forward_step reads nothing back).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from ..models import forward_step, loss_names
from ..monarch import MonarchOptions
from .engine import hand_over_gradients, loss_scale

logger = logging.getLogger("monarch_megatron.training")


def _values_vector(loss: torch.Tensor, values: dict[str, torch.Tensor], names: tuple[str, ...]) -> torch.Tensor:
    """``[len(names)]`` fp32: the loss then the named values, in the order of ``names``."""
    return torch.stack([loss.detach().float(), *(values[n].float() for n in names[1:])])


class EagerMicroSteps:
    """DeepSpeed's engine forward and backward per micro-batch (see the module docstring)."""

    def __init__(self, engine, kind: str, sentence_order: bool, masked_positions_bound: int | None) -> None:
        self.engine, self.kind = engine, kind
        self.names = loss_names(kind, sentence_order)
        self.masked_positions_bound = masked_positions_bound

    def run(self, batches: Iterator[dict[str, torch.Tensor]], accumulation: int) -> torch.Tensor:
        total = None
        for _ in range(accumulation):
            loss, values = forward_step(self.engine, next(batches), self.kind,
                                        masked_positions_bound=self.masked_positions_bound)
            self.engine.backward(loss)  # divides by the accumulation, applies the fp16 loss scale
            v = _values_vector(loss, values, self.names)
            total = v if total is None else total + v
        return total / accumulation

    def close(self) -> None:
        self.engine = None


class StaticMicroSteps:
    """The fast path: a static micro-step, captured as a CUDA graph on CUDA (module docstring).

    ``engine``: the phase's DeepSpeed engine (its ``module`` is run directly, its optimizer takes
    the gradients); ``capture``: record a CUDA graph (CUDA only); ``warmup``: eager runs before
    the capture (lazy initialisation, kernel compilation and autotuning must not be recorded).
    """

    def __init__(self, engine, kind: str, sentence_order: bool, masked_positions_bound: int | None,
                 capture: bool, warmup: int = 2) -> None:
        self.engine, self.kind = engine, kind
        self.module = engine.module
        self.names = loss_names(kind, sentence_order)
        self.masked_positions_bound = masked_positions_bound
        self.capture = capture and torch.cuda.is_available()
        self.warmup = warmup
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        device = self.params[0].device
        dtype = self.params[0].dtype
        sizes = [p.numel() for p in self.params]
        # One flat buffer: zeroed with one kernel per step, summed into with one foreach call.
        self.flat_grads = torch.zeros(sum(sizes), dtype=dtype, device=device)
        self.grad_slices = list(torch.split(self.flat_grads, sizes))
        self.grads = [s.view_as(p) for s, p in zip(self.grad_slices, self.params)]
        self.value_sums = torch.zeros(len(self.names), dtype=torch.float32, device=device)
        # Scalars the captured step reads from device memory, so that changing them needs no recapture.
        self.divisor = torch.ones((), dtype=torch.float32, device=device)
        self.scale = torch.ones((), dtype=torch.float32, device=device)
        self.inputs: dict[str, torch.Tensor] | None = None
        self.used: list[bool] | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.param_pointers: list[int] = []

    # -- the micro-step ------------------------------------------------------------------------
    def _micro_step(self) -> None:
        """Forward, backward and accumulation of the micro-batch in ``self.inputs`` (what is captured)."""
        loss, values = forward_step(self.module, self.inputs, self.kind, masked_positions_bound=self.masked_positions_bound)
        # engine.backward's scaling: the mean over the accumulation, times the fp16 loss scale.
        scaled = loss / self.divisor * self.scale
        grads = torch.autograd.grad(scaled, self.params, allow_unused=True)
        if self.used is None:
            self.used = [g is not None for g in grads]
        # Parameters without a gradient (none in the shipped models) keep zeros, as DeepSpeed's
        # ZeRO-1 gives them.
        torch._foreach_add_([g for g, u in zip(self.grads, self.used) if u], [g for g in grads if g is not None])
        self.value_sums.add_(_values_vector(loss, values, self.names))

    def _load(self, batch: dict[str, torch.Tensor]) -> None:
        """Copy ``batch`` into the static input buffers (asynchronously: the loader pins memory)."""
        device = self.flat_grads.device
        if self.inputs is None:
            self.inputs = {k: v.to(device).clone() for k, v in batch.items() if torch.is_tensor(v)}
            return
        for k, buf in self.inputs.items():
            src = batch[k]
            if src.shape != buf.shape:
                raise RuntimeError(f"micro-batch {k!r} has shape {tuple(src.shape)}, the captured step "
                                   f"{tuple(buf.shape)}: a phase's micro-batches must all have one shape")
            buf.copy_(src, non_blocking=True)

    def _capture(self) -> None:
        """Warm up, then record :meth:`_micro_step` into a CUDA graph, both on the current stream.

        The current stream is the run's own non-default stream (run.py): autograd nodes remember
        the stream they were created on and the backward syncs with it, so a node made on any
        other stream (the legacy default one above all) would pull that stream into the capture
        and invalidate it (pytorch/pytorch#164302). Capturing on the stream all the work runs on
        leaves nothing to cross.
        """
        from megatron.core.tensor_parallel.random import get_all_rng_states

        stream = torch.cuda.current_stream()
        if stream == torch.cuda.default_stream():
            raise RuntimeError("the fast step captures on the run's own CUDA stream; run it under "
                               "torch.cuda.stream(...) (training.run.train does)")
        for _ in range(self.warmup):
            self._micro_step()
        # The warm-up steps added into the accumulators: start the real accumulation from zero.
        self.flat_grads.zero_()
        self.value_sums.zero_()
        graph = torch.cuda.CUDAGraph()
        # Dropout under megatron's RNG tracker (attention) draws from these generator states;
        # registered, each replay advances them as an eager step would advance its own.
        for state in get_all_rng_states().values():
            graph.register_generator_state(state)
        # thread_local: the data loader's pin-memory thread may allocate host memory meanwhile.
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            self._micro_step()
        self.graph = graph
        self.param_pointers = [p.data_ptr() for p in self.params]
        logger.info("captured the micro-step as a CUDA graph (%d warm-up runs)", self.warmup)

    def run(self, batches: Iterator[dict[str, torch.Tensor]], accumulation: int) -> torch.Tensor:
        self.flat_grads.zero_()
        self.value_sums.zero_()
        self.divisor.fill_(float(accumulation))
        self.scale.fill_(loss_scale(self.engine))
        if self.graph is not None and [p.data_ptr() for p in self.params] != self.param_pointers:
            # Something replaced a parameter's storage (the graph would read the old one): recapture.
            logger.warning("parameter storage moved since the CUDA graph was captured; capturing again")
            self.graph = None
        for _ in range(accumulation):
            self._load(next(batches))
            if self.capture and self.graph is None:
                try:
                    self._capture()
                except RuntimeError as err:  # torch.AcceleratorError is one
                    # A run that cannot be captured still trains, on the same static step, eagerly.
                    logger.warning("WARNING: CUDA graph capture failed, running the micro-steps without "
                                   "graphs (training.cuda_graphs=false silences this): %s", str(err).splitlines()[0])
                    self.capture, self.graph = False, None
                    self.flat_grads.zero_()
                    self.value_sums.zero_()
            if self.graph is not None:
                self.graph.replay()
            else:
                self._micro_step()
        # New view objects every step: DeepSpeed re-points the .data of the gradients it is given.
        hand_over_gradients(self.engine, self.params,
                            [s.view_as(p) for s, p in zip(self.grad_slices, self.params)])
        return self.value_sums / accumulation

    def close(self) -> None:
        """Drop the graph and buffers (before the next phase's engine is built)."""
        self.graph = None
        self.inputs = None
        self.grads = self.grad_slices = []
        self.flat_grads = None
        self.engine = self.module = None
        self.params = []


def captures_graphs(cfg) -> bool:
    """Whether the run's micro-steps are CUDA graphs (fast step, ``training.cuda_graphs``, CUDA)."""
    return cfg.training.fast_step and cfg.training.cuda_graphs and torch.cuda.is_available()


def monarch_options(cfg) -> MonarchOptions:
    """How the Monarch layers multiply in this run: under CUDA graphs the host's launch cost is
    gone and ``auto`` picks the path by GPU time; ``MONARCH_MULTIPLY_BACKEND`` overrides ``auto``."""
    return MonarchOptions.from_env(MonarchOptions(graphed=captures_graphs(cfg)))


def build_micro_steps(cfg, engine, masked_positions_bound: int | None):
    """The runner ``cfg.training`` selects for ``engine`` (see the module docstring)."""
    t, m = cfg.training, cfg.model
    if t.fast_step:
        return StaticMicroSteps(engine, m.kind, m.sentence_order, masked_positions_bound, capture=captures_graphs(cfg))
    return EagerMicroSteps(engine, m.kind, m.sentence_order, masked_positions_bound)
