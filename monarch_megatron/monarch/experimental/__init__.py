"""Experimental Monarch paths: kept and tested, never chosen by ``backend="auto"``.

:mod:`.fused` (with its kernels in :mod:`.fused_kernels`) is the fused Triton kernel, reached by
``MonarchOptions(backend="fused")`` or by ``"triton"`` where the TMA path does not apply; why it is
here: benchmarks/KERNEL_NOTES.md, "Where the fused kernel went".
"""
