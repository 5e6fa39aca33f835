"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from monarch_megatron.parallel import init_tensor_parallel
from monarch_megatron.parallel.distributed import free_port


@pytest.fixture(scope="module")
def tp1():
    """A single-process gloo group with megatron-core's parallel state at TP=1, for one test module."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    init_tensor_parallel(1)
    yield
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()
