"""Process groups: torch.distributed (single process or any launcher), megatron's parallel_state
(TP x DP) and the ``mpu`` adapter DeepSpeed reads the layout from; per-step seeding.

Launch modes: ``python launcher/pretrain.py`` (no launcher: a world of one is created here, with a
free local port), ``torchrun`` and ``deepspeed`` (they export RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT). Backend: nccl with CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from ..parallel import apply_cpu_stand_ins


_OWN_ENV: list[str] = []  # environment variables init_distributed set (single process)


@dataclass(frozen=True)
class Layout:
    """This process's place in the TP x DP grid."""

    world: int
    rank: int
    tp: int
    tp_rank: int
    dp: int
    dp_rank: int

    @property
    def is_logger(self) -> bool:
        """The one rank that writes TensorBoard, train.log and run_state.json."""
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(tensor_model_parallel_size: int) -> Layout:
    """Initialise torch.distributed (if needed) and megatron's parallel_state; return the layout."""
    apply_cpu_stand_ins()
    if "RANK" not in os.environ:
        # Plain `python launcher/pretrain.py`: a world of one on a free port. DeepSpeed asserts
        # LOCAL_RANK. The variables are removed again by shutdown(), so that several runs in one
        # process (tests) and child launchers started afterwards do not inherit them.
        own = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        for key, value in own.items():
            if key not in os.environ:
                os.environ[key] = value
                _OWN_ENV.append(key)
    os.environ.setdefault("LOCAL_RANK", "0")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_model_parallel_size)
    return current_layout()


def current_layout() -> Layout:
    return Layout(
        world=dist.get_world_size(), rank=dist.get_rank(),
        tp=parallel_state.get_tensor_model_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        dp=parallel_state.get_data_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
    )


def shutdown() -> None:
    """Tear down parallel_state and the default process group (end of a run, tests)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    while _OWN_ENV:
        os.environ.pop(_OWN_ENV.pop(), None)


class MegatronMPU:
    """The ``mpu`` object DeepSpeed queries for the model- and data-parallel groups.

    DeepSpeed uses it to reduce gradients over the data-parallel group only, to partition ZeRO
    state over it, and to count the norm of tensor-parallel (``tensor_model_parallel``) parameters
    once across the TP group when clipping. Pipeline parallelism is not used (size 1).
    """

    def get_model_parallel_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return parallel_state.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return parallel_state.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group
    get_slice_parallel_rank = get_model_parallel_rank
    get_slice_parallel_world_size = get_model_parallel_world_size
    get_slice_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return parallel_state.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return parallel_state.get_data_parallel_world_size()

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return parallel_state.get_data_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup | None:
        return parallel_state.get_pipeline_model_parallel_group()


def seed_everything(seed: int, cuda_graph_safe: bool = False) -> None:
    """Seed torch's default generators and megatron's TP RNG tracker (dropout in TP regions).

    Called before building a model (the same seed on every rank gives the same global weights)
    and at every step with a seed derived from (run seed, step, DP rank), which makes dropout a
    pure function of the step: a resumed run draws exactly what an uninterrupted one would.

    ``cuda_graph_safe``: the tracker keeps graph-safe generator states (megatron's
    ``use_cudagraphable_rng``), and a tracker that already has them is reseeded *in place*: a
    captured CUDA graph holds on to the state objects it was captured with (training/step.py).
    """
    torch.manual_seed(seed)
    if not (cuda_graph_safe and torch.cuda.is_available()):
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return
    from megatron.core.tensor_parallel.random import is_graph_safe_cuda_rng_tracker

    tracker = tensor_parallel.get_cuda_rng_tracker()
    kept = dict(tracker.get_states()) if is_graph_safe_cuda_rng_tracker(tracker) else {}
    tensor_parallel.model_parallel_cuda_manual_seed(seed, use_cudagraphable_rng=True, force_reset_rng=not kept)
    for name, fresh in list(tracker.states_.items()):
        if name in kept:
            kept[name].set_state(fresh.get_state())
            tracker.states_[name] = kept[name]


def step_seed(seed: int, step: int, dp_rank: int) -> int:
    """Per-(step, DP rank) seed in [0, 2**31)."""
    return (seed * 1_000_003 + step * 7919 + dp_rank * 104_729) % (2**31 - 1)


def mean_over(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``t`` in float64, averaged elementwise over ``group`` (one all-reduce; a float64 ``t`` is
    reduced in place, so pass a tensor of your own)."""
    t = t.to(torch.float64)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
        t /= dist.get_world_size(group)
    return t


def all_reduce_mean(values: list[float], group: dist.ProcessGroup | None) -> list[float]:
    """Mean of each value over ``group`` (float64 on the accelerator or CPU)."""
    if not values:
        return []
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return mean_over(torch.tensor(values, dtype=torch.float64, device=device), group).tolist()
