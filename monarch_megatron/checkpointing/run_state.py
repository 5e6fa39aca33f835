"""``run_state.json``: the typed, versioned record every checkpoint carries (:class:`RunState`).

It says where the run is (step, phase, consumed samples), what wrote the checkpoint (model, the
phase's structured layers, precision, the TP x DP layout) and, for the integrity check, every other
file's size and SHA-256 (:mod:`.store`). The trainer writes it last, so its presence with
``"complete": true`` marks a whole checkpoint; converted and imported checkpoints carry
``converted_from``.

Versions: :data:`VERSION` is written. Version 1 is every file written before the field existed
(no ``"version"`` key); it has the same entries (``data_parallel_size`` and ``files`` can be
absent in the oldest ones) and is read as it is. A version this code does not know (a checkpoint
of a newer monarch-megatron) is refused with :class:`RunStateError` naming the file and the
versions it reads, before anything else of the checkpoint is opened.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointFormatError

VERSION = 2
READABLE_VERSIONS = (1, 2)
PHASE_KINDS = ("monarch", "dense")
# Entries a trainer's checkpoint does not have (its absence is what marks it as one): written only when set.
_ONLY_WHEN_SET = ("converted_from", "optimizer_state")


class RunStateError(CheckpointFormatError):
    """A ``run_state.json`` that this code cannot read (the message names the file and the fault)."""


@dataclass(frozen=True)
class RunState:
    """The content of one checkpoint's ``run_state.json`` (see the module docstring).

    ``step``, ``phase_index`` and ``phase`` are always there (the tag is made of them); the trainer
    writes every field, and what a reader needs beyond them it checks itself (conversion needs
    ``model`` and ``phase_kind``, a resume at another layout ``data_parallel_size``).

    ``model`` is the run's model section (sizes, ``vocab_size`` resolved); ``monarch`` the phase's
    structured layers (``MonarchConfig.to_state()``: ``kind``, ``layers``, ``nblocks``) or None for
    a dense phase. ``files`` maps every other file of the checkpoint to ``{"size", "sha256"}``.
    Entries this version does not name (a tool's own notes) are kept in ``extra`` and written back.
    """

    step: int
    phase_index: int
    phase: str
    phase_kind: str | None = None
    model: dict[str, Any] | None = None
    monarch: dict[str, Any] | None = None
    tensor_model_parallel_size: int | None = None
    data_parallel_size: int | None = None
    world_size: int | None = None
    total_steps: int | None = None
    phase_step: int | None = None
    phase_steps: int | None = None
    phase_end: bool = False
    consumed_samples: int = 0
    phase_consumed_samples: int = 0
    config_hash: str | None = None
    run_name: str | None = None
    precision: str | None = None
    losses_finite: bool = True
    tag: str | None = None
    complete: bool = False
    saved_at: str | None = None
    files: dict[str, dict[str, Any]] | None = None
    optimizer_state: Any = None
    converted_from: dict[str, Any] | None = None
    version: int = VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def layout(self) -> tuple[int, int | None]:
        """``(TP, DP)`` of the job that wrote the checkpoint (DP None in the oldest files)."""
        return self.tensor_model_parallel_size, self.data_parallel_size

    def replace(self, **changes: Any) -> RunState:
        """A copy with ``changes`` (the record is frozen)."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to ``run_state.json`` (always the current :data:`VERSION`)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("extra", "version")
               and not (f.name in _ONLY_WHEN_SET and getattr(self, f.name) is None)}
        return {"version": VERSION, **out, **self.extra}

    @classmethod
    def from_json(cls, obj: Any, path: str = "run_state.json") -> RunState:
        """Read a parsed ``run_state.json`` (any readable version).

        Raises:
            RunStateError: not an object, an unknown version, or a required entry missing or of
                the wrong type (each names ``path``).
        """
        if not isinstance(obj, dict):
            raise RunStateError(f"{path} does not hold a JSON object")
        version = obj.get("version", 1)
        if version not in READABLE_VERSIONS:
            raise RunStateError(f"{path} has version {version!r}, which this monarch-megatron does not read (it reads "
                                f"versions {', '.join(map(str, READABLE_VERSIONS))}): the checkpoint was written by "
                                "another release; use that release, or convert the checkpoint with it")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "version"}
        for key, kind in (("step", int), ("phase_index", int), ("phase", str)):
            value = obj.get(key)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise RunStateError(f"{path} lacks {'an integer' if kind is int else 'a string'} '{key}' (got {value!r})")
        for key, kind in (("phase_kind", str), ("model", dict), ("tensor_model_parallel_size", int),
                          ("data_parallel_size", int), ("files", dict)):
            value = obj.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
                raise RunStateError(f"{path} has an unreadable '{key}' entry ({value!r})")
        if obj.get("phase_kind") not in (None, *PHASE_KINDS):
            raise RunStateError(f"{path} has phase_kind {obj['phase_kind']!r}, not one of {PHASE_KINDS}")
        if obj.get("phase_kind") == "monarch" and not isinstance(obj.get("monarch"), dict):
            raise RunStateError(f"{path} says phase_kind 'monarch' but has no 'monarch' settings")
        if not all(isinstance(v, dict) for v in (obj.get("files") or {}).values()):
            raise RunStateError(f"{path} has an unreadable 'files' record")
        known = {k: v for k, v in obj.items() if k in names}
        if obj.get("phase_kind") == "dense":
            known["monarch"] = None
        extra = {k: v for k, v in obj.items() if k not in names and k != "version"}
        return cls(**known, version=version, extra=extra)


__all__ = ["PHASE_KINDS", "READABLE_VERSIONS", "RunState", "RunStateError", "VERSION"]
