"""CPU stand-ins for the CUDA-only pieces megatron-core touches, so its models run on CPU with gloo.

This is the only module of the project that patches anything outside it (DESIGN.md, "Running on
CPU"); :func:`apply_cpu_stand_ins` does nothing where CUDA is available. It installs exactly three
things; the first two because megatron-core calls them unconditionally on code paths the CPU runs use:

1. ``torch.cuda.current_device`` returns ``torch.device("cpu")``: megatron allocates buffers with
   ``device=torch.cuda.current_device()`` (the attention scratch buffer, some masks); on CPU those
   belong in host memory.
2. megatron's RNG-state tracker (``tensor_parallel.random``) keeps named *CPU* generator states and
   forks the CPU default generator. On GPU it forks the CUDA default generator, so that dropout
   inside tensor-parallel regions draws from a per-TP-rank stream and the default stream resumes
   unchanged afterwards; the stand-in keeps that contract with the generator CPU kernels draw from.
3. DeepSpeed's torch communication backend, when it starts on a CPU-only host, compiles a C++
   shared-memory all-reduce (``deepspeed_shm_comm_op``, 40-70 s on 2 cores, in silence, before the
   first line of a run). Only its ``inference_all_reduce`` uses it, which training never calls: the
   stand-in makes the build report "not available", DeepSpeed's own answer on hosts that cannot
   build it, so the demo starts at once.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

import torch
from megatron.core.tensor_parallel import random as mcore_random

_APPLIED = False


class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
    """megatron's ``CudaRNGStatesTracker`` contract on the CPU default generator.

    ``add(name, seed)`` records the state a generator seeded with ``seed`` starts from; ``fork(name)``
    swaps that state into the default CPU generator for the duration of the block and saves the
    advanced state back, exactly as the CUDA tracker does with the CUDA generator.
    """

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig_state = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig_state)


def _cpu_current_device() -> torch.device:
    """Where megatron's ``device=torch.cuda.current_device()`` allocations go on a CPU-only host."""
    return torch.device("cpu")


def _no_shm_comm_op() -> None:
    """DeepSpeed's ``build_shm_op`` where the op is not available (item 3 of the module docstring)."""
    return None


def apply_cpu_stand_ins() -> bool:
    """Install the CPU stand-ins if CUDA is absent; idempotent.

    Returns:
        ``True`` if the stand-ins are in place after the call, ``False`` where CUDA is available
        (nothing is changed then).
    """
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    torch.cuda.current_device = _cpu_current_device
    # Replace megatron's lazily created tracker (and mark it created, so that its own
    # initialize_rng_tracker keeps ours); model_parallel_cuda_manual_seed then seeds it as usual.
    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    try:
        # By module name: `import deepspeed.comm.torch as x` binds the package's `torch` attribute
        # (the torch module it imported), not the submodule.
        ds_comm = importlib.import_module("deepspeed.comm.torch")
    except ImportError:  # the models run without DeepSpeed too
        pass
    else:
        ds_comm.build_shm_op = _no_shm_comm_op
    _APPLIED = True
    return True
