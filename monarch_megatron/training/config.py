"""The run configuration: typed schema, YAML loading with overrides, and validation.

A run is one YAML file (see configs/demo.yaml for an annotated example). Top-level sections:

    run_name, output_dir, seed
    model:      kind bert|gpt, num_layers, hidden_size, num_attention_heads, ffn_hidden_size,
                vocab_size (null = data.vocab_size), max_position_embeddings, dropouts, init std,
                sentence_order
    data:       source demo|indexed, prefix, tokenizer_model, vocab_size, split, masking, cache_dir
    parallel:   tensor_model_parallel_size, world_size (null = whatever the launcher starts)
    precision:  dtype fp32|fp16|bf16 (fp16 = "AMP O2": half model, fp32 master weights in the
                ZeRO-1 optimizer, dynamic loss scaling), loss-scaling knobs
    optimizer:  name lamb|adamw, lr, weight_decay, betas, eps, grad_clip
    lr_schedule: warmup_steps | warmup_fraction, decay_style linear|polynomial|cosine|constant,
                power, min_lr, scope run|phase
    training:   total_steps, micro_batch_size, global_batch_size, seq_length, intervals, keep_last,
                max_nonfinite_steps (the non-finite guard), init_from (start a new run from a
                checkpoint's model weights)
    phases:     list; each: name, steps | share, monarch {kind monarch|blockdiag, layers, nblocks} |
                null (dense), and
                optional seq_length / micro_batch_size / global_batch_size / optimizer /
                lr_schedule overrides, optimizer_state fresh|keep, rewarmup_steps

Validation happens before any process group or accelerator work; every problem is a
:class:`~monarch_megatron.training.schema_io.ConfigError` naming the key: types, every numeric
range (NaN and infinities nowhere), batch arithmetic, Monarch shapes. Checks that read files (data,
tokenizer, the resume point) follow in :func:`.run.preflight`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from ..models.config import ffn_width, linear_widths, padded_vocab_size
from ..models.family import model_family
from ..parallel.kinds import KINDS
from ..parallel.specs import MONARCH_LAYERS
from .schema_io import ConfigError, apply_override, build, load_yaml, parse_override, to_plain


@dataclass
class ModelSection:
    """``model:`` the architecture (models/config.py's ``ModelConfig`` is built from it).

    Attributes:
        kind: ``bert`` (masked LM, megatron-core ``BertModel``) or ``gpt`` (causal LM, ``GPTModel``).
        num_layers, hidden_size, num_attention_heads: the transformer's depth, width and heads.
        ffn_hidden_size: the MLP's inner width; null = 4 x hidden_size.
        vocab_size: the tokenizer's vocabulary; null = ``data.vocab_size``. The model pads it to a
            multiple of ``make_vocab_size_divisible_by`` (independent of the TP size).
        max_position_embeddings: learned absolute positions (>= every phase's sequence length).
        hidden_dropout, attention_dropout, init_method_std: as megatron-core's TransformerConfig.
        sentence_order: BERT's sentence-order (binary) head and loss.
        activation: ``gelu`` (exact, erf) or ``gelu_tanh`` (its tanh approximation: original BERT's
            and GPT-2's, and the one megatron-core fuses with the fc1 bias; training.fused_bias_gelu).
    """

    kind: Literal["bert", "gpt"]
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int | None = None
    vocab_size: int | None = None
    max_position_embeddings: int = 512
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    sentence_order: bool = True
    make_vocab_size_divisible_by: int = 128
    activation: Literal["gelu", "gelu_tanh"] = "gelu"


@dataclass
class DataSection:
    """``data:`` where the tokens come from.

    Attributes:
        source: ``demo`` (the embedded corpus, tokenizer and datasets built under ``cache_dir``) or
            ``indexed`` (``launcher/preprocess.py``'s output).
        prefix: the indexed dataset's path prefix (``<prefix>.bin`` / ``.idx``; ``source: indexed``).
        tokenizer_model: the sentencepiece model the data was tokenized with.
        vocab_size: that tokenizer's vocabulary (``model.vocab_size`` defaults to it).
        split: train / validation weights, split by document.
        masked_lm_prob, short_seq_prob, masking_max_ngram: BERT's masking as Megatron's BERT dataset
            (share of masked tokens, probability of a shorter sample, longest masked n-gram).
        cache_dir: where built sample indices (and the demo data) are kept; not part of the run's
            identity (left out of the config hash).
        num_workers: data-loader worker processes (0 = in the training process).
    """

    source: Literal["demo", "indexed"] = "demo"
    prefix: str | None = None
    tokenizer_model: str | None = None
    vocab_size: int | None = None
    split: list[float] = field(default_factory=lambda: [98.0, 2.0])
    masked_lm_prob: float = 0.15
    short_seq_prob: float = 0.1
    masking_max_ngram: int = 1
    cache_dir: str | None = None
    num_workers: int = 0


@dataclass
class ParallelSection:
    """``parallel:`` the layout. The data-parallel size is the world size over
    ``tensor_model_parallel_size``; a resume may change either (checkpointing/reshard.py).

    Attributes:
        tensor_model_parallel_size: megatron-core tensor parallelism (divides the heads, the
            vocabulary padding and every structured layer's blocks).
        world_size: processes expected; null = whatever the launcher starts (``WORLD_SIZE``).
    """

    tensor_model_parallel_size: int = 1
    world_size: int | None = None


@dataclass
class PrecisionSection:
    """``precision:`` ``dtype`` fp32 | bf16 | fp16 ("AMP O2": half-precision model, fp32 master
    weights in the ZeRO-1 optimizer, dynamic loss scaling with DeepSpeed's knobs below: the initial
    scale is ``2**initial_loss_scale_power``, raised after ``loss_scale_window`` overflow-free steps,
    lowered after ``hysteresis`` overflows, never below ``min_loss_scale``)."""

    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    initial_loss_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0


@dataclass
class OptimizerSection:
    """``optimizer:`` ``name`` lamb (training/optim.py's ZeRO-aware LAMB, the paper's BERT recipe)
    or adamw; peak ``lr`` (the schedule scales it), decoupled ``weight_decay`` (not on biases and
    norms), Adam's ``beta1``, ``beta2``, ``eps``, and the global gradient-norm clip ``grad_clip``."""

    name: Literal["lamb", "adamw"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-6
    grad_clip: float = 1.0


@dataclass
class ScheduleSection:
    """``lr_schedule:`` linear warm-up over ``warmup_steps`` (or ``warmup_fraction`` of the steps
    when null), then ``decay_style`` linear | polynomial (``power``) | cosine | constant down to
    ``min_lr``; ``scope`` run (one schedule over the whole run) or phase (one per phase)."""

    warmup_steps: int | None = None
    warmup_fraction: float = 0.0
    decay_style: Literal["linear", "polynomial", "cosine", "constant"] = "linear"
    power: float = 1.0
    min_lr: float = 0.0
    scope: Literal["run", "phase"] = "run"


@dataclass
class ProfileSection:
    """torch.profiler over ``num_steps`` optimizer steps from ``start_step`` (1-based; a list gives
    several windows, e.g. one per phase; null = off): a trace per window in
    ``<output_dir>/profile/`` and a one-screen summary in the log (training/profiling.py)."""

    start_step: int | list[int] | None = None
    num_steps: int = 4


@dataclass
class TrainingSection:
    """``training:`` the run's length and shape, its rhythm, and how a step runs.

    Attributes:
        total_steps: optimizer steps of the whole run (phases take ``steps`` or a ``share`` of it).
        micro_batch_size, global_batch_size, seq_length: per-rank micro batch, samples per
            optimizer step (all ranks, all micro-steps: the accumulation is derived from them and
            the data-parallel size) and tokens per sample; a phase may override each.
        log_interval, eval_interval, eval_iters, save_interval: progress line, validation (over
            ``eval_iters`` micro-batches) and checkpoint every so many steps.
        keep_last: checkpoints kept (older ones pruned after a save succeeds).
        save_at_switch: right after a structured -> dense switch, also save the converted dense
            model (a second checkpoint at that step, tagged with the new phase).
        The keys below the guard and ``init_from`` change how fast a step runs, never what it
        computes, and are left out of the config hash (:data:`PERFORMANCE_KEYS`).
    """

    total_steps: int | None = None
    micro_batch_size: int = 8
    global_batch_size: int = 8
    seq_length: int = 128
    log_interval: int = 10
    eval_interval: int = 100
    eval_iters: int = 4
    save_interval: int = 100
    keep_last: int = 3
    save_at_switch: bool = True
    # Stop the run (exit code 3, nothing saved) after this many consecutive steps with a non-finite
    # loss or gradient norm; fp16's overflow-skipped steps do not count (training/guard.py).
    max_nonfinite_steps: int = 3
    # A checkpoint directory (the trainer's or convert_checkpoint.py's) whose model weights a NEW
    # run starts from (fresh optimizer, step 0); ignored when output_dir has a checkpoint to
    # resume from. See training/init_from.py.
    init_from: str | None = None
    # How a step runs; none of these changes the function trained (training/step.py):
    # fast_step: static micro-step (inputs in fixed buffers, gradients accumulated by the runner,
    # losses kept on the device); false = DeepSpeed's engine forward/backward per micro-step.
    fast_step: bool = True
    # The fast micro-step captured once as a CUDA graph and replayed (CUDA only; ignored on CPU).
    cuda_graphs: bool = True
    # BERT: LM head and cross entropy on the masked positions only (at most the masking budget per
    # sequence), as NVIDIA's MLPerf BERT does; the loss is the same.
    mlm_head_masked_only: bool = True
    # The LM loss by two-pass Triton kernels instead of megatron-core's fp32 passes (CUDA, TP = 1:
    # models/cross_entropy.py); same loss to fp32 rounding.
    fused_cross_entropy: bool = True
    # megatron-core's fused bias + dropout + residual add (torch.compile'd; CUDA only: on CPU the
    # compile costs more than it saves). Same function, another dropout stream.
    fused_bias_dropout: bool = True
    # megatron-core's fused fc1 bias + GELU (torch.compile'd; CUDA only) for model.activation:
    # gelu_tanh, the activation it computes; the exact GELU runs unfused.
    fused_bias_gelu: bool = True
    # The layers' LayerNorms as torch.compile'd kernels (parallel/norms.py; CUDA only): torch's own
    # LayerNorm backward is several times slower than its bytes at these shapes.
    compiled_layer_norm: bool = True
    # The attention qkv linear's bias inside its GEMM (dense: cuBLASLt epilogue) or as a compiled
    # add (structured); parallel/bias.py. CUDA only.
    fused_linear_bias: bool = True
    profile: ProfileSection = field(default_factory=ProfileSection)


@dataclass
class MonarchSection:
    """A phase's structured layers: ``kind`` monarch (default) | blockdiag (parallel/kinds.py),
    which ``layers`` of every transformer layer, ``nblocks`` blocks."""

    layers: list[str] = field(default_factory=lambda: list(MONARCH_LAYERS))
    nblocks: int = 4
    kind: str = "monarch"


@dataclass
class PhaseSection:
    """One entry of ``phases:``, in order.

    Attributes:
        name: the phase's name (in checkpoint tags: ``step<N>-<name>``).
        steps, share: its length, in steps or as a share of ``training.total_steps`` (one of them).
        monarch: its structured layers; null = dense (megatron-core's stock layer spec).
        seq_length, micro_batch_size, global_batch_size: overrides of ``training``'s.
        optimizer, lr_schedule: overrides of those sections' keys for this phase.
        optimizer_state: ``fresh`` moments (required after a structured -> dense switch) or ``keep``
            the previous phase's (same layer structure only).
        rewarmup_steps: a learning-rate ramp over the phase's first steps (for fresh moments).
    """

    name: str
    steps: int | None = None
    share: float | None = None
    monarch: MonarchSection | None = None
    seq_length: int | None = None
    micro_batch_size: int | None = None
    global_batch_size: int | None = None
    optimizer: dict | None = None
    lr_schedule: dict | None = None
    optimizer_state: Literal["fresh", "keep"] = "fresh"
    rewarmup_steps: int = 0


@dataclass
class RunConfig:
    model: ModelSection
    phases: list[PhaseSection]
    run_name: str = "run"
    output_dir: str = "runs/run"
    seed: int = 1234
    data: DataSection = field(default_factory=DataSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    lr_schedule: ScheduleSection = field(default_factory=ScheduleSection)
    training: TrainingSection = field(default_factory=TrainingSection)

    @property
    def vocab_size(self) -> int:
        """The tokenizer vocabulary the model is built for (model.vocab_size or data.vocab_size)."""
        return self.model.vocab_size or self.data.vocab_size  # type: ignore[return-value]

    def to_dict(self) -> dict:
        return to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def config_hash(self) -> str:
        """Hash of everything that determines the trained weights (not paths or log cadence)."""
        d = self.to_dict()
        d.pop("output_dir")
        d.pop("run_name")
        for k in ("log_interval", "eval_interval", "eval_iters", "save_interval", "keep_last", "max_nonfinite_steps",
                  *PERFORMANCE_KEYS):
            d["training"].pop(k)
        d["data"].pop("cache_dir")
        d["data"].pop("num_workers")
        # Defaults of keys added later are left out, so older configs keep their hash.
        if d["model"]["activation"] == "gelu":
            del d["model"]["activation"]
        for phase in d["phases"]:
            # The default kind is left out, so configs written before kinds existed keep their hash.
            if phase["monarch"] is not None and phase["monarch"]["kind"] == "monarch":
                del phase["monarch"]["kind"]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# training.* keys that change how fast a step runs, not what it computes (left out of the config hash).
PERFORMANCE_KEYS = ("fast_step", "cuda_graphs", "mlm_head_masked_only", "fused_cross_entropy", "fused_bias_dropout",
                    "fused_bias_gelu", "compiled_layer_norm", "fused_linear_bias",
                    "profile")


def _positive(value: Any, path: str, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(path, f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def launch_world_size(cfg: RunConfig) -> int:
    """The world size the run will have: WORLD_SIZE from the launcher, else parallel.world_size,
    else the TP size (one data-parallel replica; what ``--dry-run`` assumes on a laptop)."""
    env = os.environ.get("WORLD_SIZE")
    if env is not None:
        return int(env)
    return cfg.parallel.world_size or cfg.parallel.tensor_model_parallel_size


def _validate_model(cfg: RunConfig) -> None:
    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    for key in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size",
                "max_position_embeddings", "make_vocab_size_divisible_by"):
        _positive(getattr(m, key), f"model.{key}")
    for key in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(m, key) < 1.0:
            raise ConfigError(f"model.{key}", f"must be in [0, 1), got {getattr(m, key)}")
    _positive(m.init_method_std, "model.init_method_std")
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError("model.num_attention_heads",
                          f"hidden_size={m.hidden_size} is not divisible by num_attention_heads={m.num_attention_heads}")
    if m.num_attention_heads % tp:
        raise ConfigError("parallel.tensor_model_parallel_size",
                          f"tensor_model_parallel_size={tp} does not divide model.num_attention_heads={m.num_attention_heads}")
    if ffn_width(m.hidden_size, m.ffn_hidden_size) % tp:
        raise ConfigError("parallel.tensor_model_parallel_size", f"tensor_model_parallel_size={tp} does not divide the "
                          f"MLP width {ffn_width(m.hidden_size, m.ffn_hidden_size)}")
    if cfg.vocab_size is None:
        raise ConfigError("model.vocab_size", "required (or set data.vocab_size, the tokenizer's vocabulary)")
    padded = padded_vocab_size(cfg.vocab_size, m.make_vocab_size_divisible_by)
    if padded % tp:
        raise ConfigError("model.make_vocab_size_divisible_by",
                          f"the padded vocabulary {padded} is not divisible by tensor_model_parallel_size={tp}")
    if m.sentence_order and not model_family(m.kind).sentence_order:
        m.sentence_order = False  # e.g. GPT: no sentence-order head; the default is BERT's


def monarch_layer_widths(m: ModelSection) -> dict[str, tuple[int, int, str]]:
    """(in_features, out_features, TP style) of each Monarch-capable linear of a layer."""
    return linear_widths(m.hidden_size, ffn_width(m.hidden_size, m.ffn_hidden_size))


def _validate_monarch(cfg: RunConfig, mon: MonarchSection, path: str) -> None:
    tp = cfg.parallel.tensor_model_parallel_size
    if mon.kind not in KINDS:
        raise ConfigError(f"{path}.kind", f"unknown layer kind {mon.kind!r}; choose from {', '.join(KINDS)}")
    if not mon.layers:
        raise ConfigError(f"{path}.layers", "must name at least one of fc1, fc2, qkv, proj (use monarch: null for dense)")
    for i, name in enumerate(mon.layers):
        if name not in MONARCH_LAYERS:
            raise ConfigError(f"{path}.layers[{i}]", f"unknown layer {name!r}; choose from {', '.join(MONARCH_LAYERS)}")
    if len(set(mon.layers)) != len(mon.layers):
        raise ConfigError(f"{path}.layers", "names a layer twice")
    _positive(mon.nblocks, f"{path}.nblocks")
    # Ranks own whole blocks, in both kinds: the one TP-vs-nblocks rule (the kind's layout may add one).
    if mon.nblocks % tp:
        raise ConfigError(f"{path}.nblocks", f"nblocks={mon.nblocks} is not divisible by tensor_model_parallel_size={tp}")
    widths = monarch_layer_widths(cfg.model)
    for name in mon.layers:
        n_in, n_out, style = widths[name]
        try:
            KINDS[mon.kind].check_tp(n_in, n_out, mon.nblocks, tp, style, name)
        except ValueError as err:
            raise ConfigError(f"{path}.nblocks", f"layer {name}: {err}") from None


def _validate_phases(cfg: RunConfig, world: int) -> None:
    t = cfg.training
    if not cfg.phases:
        raise ConfigError("phases", "at least one phase is required")
    names = set()
    for i, ph in enumerate(cfg.phases):
        path = f"phases[{i}]"
        if ph.name in names:
            raise ConfigError(f"{path}.name", f"duplicate phase name {ph.name!r}")
        names.add(ph.name)
        if (ph.steps is None) == (ph.share is None):
            raise ConfigError(path, "give exactly one of steps or share")
        _positive(ph.steps, f"{path}.steps")
        if ph.share is not None:
            if not 0.0 < ph.share <= 1.0:
                raise ConfigError(f"{path}.share", f"must be in (0, 1], got {ph.share}")
            if t.total_steps is None:
                raise ConfigError(f"{path}.share", "a share needs training.total_steps")
        _positive(ph.rewarmup_steps, f"{path}.rewarmup_steps", allow_zero=True)
        if ph.monarch is not None:
            _validate_monarch(cfg, ph.monarch, f"{path}.monarch")
        seq = ph.seq_length or t.seq_length
        if seq > cfg.model.max_position_embeddings:
            key = f"{path}.seq_length" if ph.seq_length else "training.seq_length"
            raise ConfigError(key, f"{seq} exceeds model.max_position_embeddings={cfg.model.max_position_embeddings}")
        for key in ("seq_length", "micro_batch_size", "global_batch_size"):
            _positive(getattr(ph, key), f"{path}.{key}")
        _check_batch(cfg, ph, path, world)
        for key, section in (("optimizer", OptimizerSection), ("lr_schedule", ScheduleSection)):
            over = getattr(ph, key)
            if over is not None:
                base = to_plain(getattr(cfg, key))
                build(section, {**base, **over}, f"{path}.{key}")
        if i > 0 and ph.monarch is not None and to_plain(cfg.phases[i - 1].monarch) != to_plain(ph.monarch):
            raise ConfigError(f"{path}.monarch", "a phase may keep the previous phase's Monarch layers or switch to "
                              "dense (monarch: null); changing to other Monarch layers mid-run is not exact (for "
                              "dense -> Monarch use launcher/convert_checkpoint.py --to monarch and a new run)")
        if ph.optimizer_state == "keep" and i > 0:
            prev = cfg.phases[i - 1]
            if to_plain(prev.monarch) != to_plain(ph.monarch):
                raise ConfigError(f"{path}.optimizer_state",
                                  "'keep' needs the same model structure as the previous phase; a Monarch "
                                  "factor's optimizer moments have no dense counterpart (use 'fresh')")
            if resolved_optimizer(cfg, i).name != resolved_optimizer(cfg, i - 1).name:
                raise ConfigError(f"{path}.optimizer_state", "'keep' needs the same optimizer as the previous phase")
    explicit = [p.steps for p in cfg.phases if p.steps is not None]
    if t.total_steps is not None and len(explicit) == len(cfg.phases) and sum(explicit) != t.total_steps:
        raise ConfigError("training.total_steps",
                          f"{t.total_steps} differs from the sum of the phases' steps ({sum(explicit)})")
    steps = phase_steps(cfg)
    for i, n in enumerate(steps):
        if n < 1:
            raise ConfigError(f"phases[{i}]", f"resolves to {n} steps; give it more share or steps")


def _check_batch(cfg: RunConfig, ph: PhaseSection, path: str, world: int) -> None:
    t, tp = cfg.training, cfg.parallel.tensor_model_parallel_size
    dp = world // tp
    micro = ph.micro_batch_size or t.micro_batch_size
    glob = ph.global_batch_size or t.global_batch_size
    key = f"{path}.global_batch_size" if ph.global_batch_size else "training.global_batch_size"
    if glob % (micro * dp):
        raise ConfigError(key, f"global batch {glob} is not a multiple of micro batch {micro} x data-parallel "
                          f"size {dp} (world {world} / TP {tp}); global = micro x accumulation x data-parallel")


def phase_steps(cfg: RunConfig) -> list[int]:
    """Steps of every phase: explicit ``steps``, or ``round(share * total_steps)``; when every
    phase has a share the last one takes the remainder so the total is exact."""
    total = cfg.training.total_steps
    out = [p.steps if p.steps is not None else int(round(p.share * total)) for p in cfg.phases]  # type: ignore[operator]
    if total is not None and all(p.share is not None for p in cfg.phases):
        out[-1] = total - sum(out[:-1])
    return out


def resolved_optimizer(cfg: RunConfig, i: int) -> OptimizerSection:
    """Phase ``i``'s optimizer: the top-level section with the phase's overrides applied."""
    return build(OptimizerSection, {**to_plain(cfg.optimizer), **(cfg.phases[i].optimizer or {})}, f"phases[{i}].optimizer")


def resolved_schedule(cfg: RunConfig, i: int) -> ScheduleSection:
    """Phase ``i``'s learning-rate schedule (top-level section plus the phase's overrides)."""
    return build(ScheduleSection, {**to_plain(cfg.lr_schedule), **(cfg.phases[i].lr_schedule or {})},
                 f"phases[{i}].lr_schedule")


def _validate_optimizer(o: OptimizerSection, path: str) -> None:
    _positive(o.lr, f"{path}.lr")
    _positive(o.eps, f"{path}.eps")
    _positive(o.weight_decay, f"{path}.weight_decay", allow_zero=True)
    _positive(o.grad_clip, f"{path}.grad_clip", allow_zero=True)
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(o, key) < 1.0:
            raise ConfigError(f"{path}.{key}", f"must be in [0, 1), got {getattr(o, key)}")


def _validate_schedule(s: ScheduleSection, path: str) -> None:
    if not 0.0 <= s.warmup_fraction < 1.0:
        raise ConfigError(f"{path}.warmup_fraction", f"must be in [0, 1), got {s.warmup_fraction}")
    _positive(s.warmup_steps, f"{path}.warmup_steps", allow_zero=True)
    _positive(s.power, f"{path}.power")
    _positive(s.min_lr, f"{path}.min_lr", allow_zero=True)


def _validate_precision(p: PrecisionSection) -> None:
    _positive(p.initial_loss_scale_power, "precision.initial_loss_scale_power", allow_zero=True)
    if p.initial_loss_scale_power > 64:
        raise ConfigError("precision.initial_loss_scale_power", f"must be at most 64, got {p.initial_loss_scale_power}")
    for key in ("loss_scale_window", "hysteresis", "min_loss_scale"):
        _positive(getattr(p, key), f"precision.{key}")


def validate(cfg: RunConfig, world_size: int | None = None) -> RunConfig:
    """Semantic checks; ``world_size`` defaults to :func:`launch_world_size`. Returns ``cfg``."""
    world = world_size or launch_world_size(cfg)
    tp = cfg.parallel.tensor_model_parallel_size
    _positive(tp, "parallel.tensor_model_parallel_size")
    _positive(cfg.parallel.world_size, "parallel.world_size")
    if cfg.parallel.world_size is not None and os.environ.get("WORLD_SIZE") and world != cfg.parallel.world_size:
        raise ConfigError("parallel.world_size", f"the config says {cfg.parallel.world_size} processes, the launcher started {world}")
    if world % tp:
        raise ConfigError("parallel.tensor_model_parallel_size",
                          f"tensor_model_parallel_size={tp} does not divide the world size {world}")
    t = cfg.training
    for key in ("total_steps", "micro_batch_size", "global_batch_size", "seq_length", "log_interval",
                "eval_interval", "eval_iters", "save_interval", "keep_last", "max_nonfinite_steps"):
        _positive(getattr(t, key), f"training.{key}")
    starts = t.profile.start_step if isinstance(t.profile.start_step, list) else [t.profile.start_step]
    for i, start in enumerate(starts):
        _positive(start, "training.profile.start_step" + (f"[{i}]" if isinstance(t.profile.start_step, list) else ""))
    _positive(t.profile.num_steps, "training.profile.num_steps")
    _validate_optimizer(cfg.optimizer, "optimizer")
    _validate_schedule(cfg.lr_schedule, "lr_schedule")
    for i in range(len(cfg.phases)):  # a phase's overrides on top of the run's sections
        _validate_optimizer(resolved_optimizer(cfg, i), f"phases[{i}].optimizer")
        _validate_schedule(resolved_schedule(cfg, i), f"phases[{i}].lr_schedule")
    _validate_precision(cfg.precision)
    if not 0 <= cfg.seed < 2**31:
        raise ConfigError("seed", f"must be in [0, 2**31), got {cfg.seed}")
    d = cfg.data
    if d.source == "indexed" and not d.prefix:
        raise ConfigError("data.prefix", "required when data.source is 'indexed' (the preprocess --output-prefix)")
    if d.source == "indexed" and not d.tokenizer_model:
        raise ConfigError("data.tokenizer_model", "required when data.source is 'indexed'")
    if len(d.split) != 2 or min(d.split) <= 0:
        raise ConfigError("data.split", f"must be two positive weights [train, valid], got {d.split}")
    if not 0.0 < d.masked_lm_prob < 1.0:
        raise ConfigError("data.masked_lm_prob", f"must be in (0, 1), got {d.masked_lm_prob}")
    if not 0.0 <= d.short_seq_prob <= 1.0:
        raise ConfigError("data.short_seq_prob", f"must be in [0, 1], got {d.short_seq_prob}")
    _positive(d.masking_max_ngram, "data.masking_max_ngram")
    _positive(d.num_workers, "data.num_workers", allow_zero=True)
    _positive(d.vocab_size, "data.vocab_size")
    _validate_model(cfg)
    _validate_phases(cfg, world)
    return cfg


def load_config(path: str, overrides: list[str] | tuple[str, ...] = (), world_size: int | None = None) -> RunConfig:
    """Load ``path``, apply dotted ``key=value`` overrides, build the typed config and validate it.

    Raises:
        ConfigError: with a message naming the offending key.
    """
    raw = load_yaml(path)
    for text in overrides:
        parts, value = parse_override(text)
        apply_override(raw, parts, value)
    cfg = build(RunConfig, raw)
    return validate(cfg, world_size)


def describe_world(cfg: RunConfig, world: int | None = None) -> dict[str, int]:
    """``{"world": W, "tp": T, "dp": W // T}``."""
    w = world or launch_world_size(cfg)
    tp = cfg.parallel.tensor_model_parallel_size
    return {"world": w, "tp": tp, "dp": w // tp}


__all__ = [
    "ConfigError", "RunConfig", "load_config", "validate", "phase_steps", "resolved_optimizer",
    "resolved_schedule", "launch_world_size", "describe_world",
]
