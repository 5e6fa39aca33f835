"""Offline checkpoint conversion (Monarch / block-diagonal <-> dense, TP resharding, Hugging Face
import and export): a leaf package that only the launchers import. The in-memory conversion the
phase switch uses is :mod:`monarch_megatron.parallel.densify`; the checkpoint format is
:mod:`monarch_megatron.checkpointing`."""
