"""Process-group setup for megatron-core's tensor parallelism, on GPU (NCCL) or CPU (gloo).

``init_tensor_parallel`` is what a worker calls once ``torch.distributed`` knows its rank (torchrun,
DeepSpeed, or :func:`spawn`); ``spawn`` runs a function on ``world_size`` local processes with gloo,
which is how the CPU tests exercise TP=2 on one machine.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from megatron.core import parallel_state, tensor_parallel

from .cpu_compat import apply_cpu_stand_ins


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a local rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_tensor_parallel(tp_size: int, seed: int = 1234, backend: str | None = None) -> None:
    """Initialise ``torch.distributed`` (from the environment, if not done yet), megatron's
    ``parallel_state`` with tensor-parallel size ``tp_size`` and its RNG streams from ``seed``.

    On a host without CUDA the CPU stand-ins are applied first and ``backend`` defaults to gloo;
    with CUDA each process uses ``cuda:LOCAL_RANK`` and NCCL. Re-initialising ``parallel_state`` with
    another TP size (same world) is allowed: the old groups are destroyed first.
    """
    apply_cpu_stand_ins()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp_size)
    # No force_reset: on CPU that would replace the stand-in tracker by the CUDA one.
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _spawn_entry(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    # One intra-op thread per process: the test hosts have as many cores as ranks.
    torch.set_num_threads(1)
    apply_cpu_stand_ins()
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` CPU processes joined by gloo.

    ``fn`` must be importable (module level). ``torch.distributed`` is initialised before it runs;
    ``parallel_state`` is not (call :func:`init_tensor_parallel`). Returns each rank's return value
    (``torch.save``-able), in rank order; an exception in any rank is raised here.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_spawn_entry, args=(world_size, free_port(), out_dir, fn, args), nprocs=world_size, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
