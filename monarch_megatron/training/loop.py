"""The training service: phases, steps, validation, checkpoints, resume, signals.

``Trainer(cfg, layout).run()`` trains every phase of the plan in order. It resumes from the latest
complete checkpoint under ``<output_dir>/checkpoints`` (so re-running the same command continues a
killed run), performs phase transitions (the Monarch -> dense switch included, :mod:`.switch`)
in-process, and on SIGTERM / SIGUSR1 (Slurm pre-emption) / SIGINT (Ctrl-C; a second one exits at
once) saves a checkpoint at the end of the step and returns. Non-finite losses stop it without a
save (:mod:`.guard`).

Determinism: the data order is a function of the step (:mod:`.batches`), dropout is reseeded
from (seed, step, DP rank) at every step, the learning rate is a function of the step
(:mod:`.schedule`), and phase transitions are re-done identically from the phase's last
checkpoint. So on CPU in fp32 the losses after a resume equal those of an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.profiler import record_function

from ..data import load_tokenizer
from ..models import ModelConfig, forward_step
from .batches import PhaseData, prepare_data
from ..checkpointing.run_state import RunState
from ..checkpointing.store import checkpoint_tag
from .checkpoint import CheckpointManager, restore_optimizer_state
from .config import RunConfig
from .dryrun import plan_lines
from .distributed import Layout, all_reduce_mean, mean_over, seed_everything, step_seed
from .engine import grad_norm, loss_scale, set_learning_rate
from .flops import train_flops_per_sequence
from .guard import NonFiniteGuard
from .init_from import check_init_from, load_init_weights
from .metrics import Metrics, StepClock, logger
from .phases import Phase, build_plan, total_steps
from .profiling import StepProfiler
from .schedule import learning_rate
from .step import build_micro_steps, captures_graphs
from .switch import build_phase_engine, transition
from .schema_io import to_plain


class Trainer:
    """One training run (see module docstring). All ranks construct it and call :meth:`run`."""

    def __init__(self, cfg: RunConfig, layout: Layout) -> None:
        self.cfg, self.layout = cfg, layout
        self.plan = build_plan(cfg)
        self.total = total_steps(self.plan)
        self.ckpt = CheckpointManager(cfg.output_dir, layout, cfg.training.keep_last)
        self.metrics = Metrics(cfg.output_dir, layout.is_logger, self.total,
                               show_loss_scale=cfg.precision.dtype == "fp16")
        self.guard = NonFiniteGuard(cfg.training.max_nonfinite_steps, cfg.precision.dtype == "fp16", self.ckpt)
        self.profiler = StepProfiler(cfg.training.profile, cfg.output_dir, layout.rank, layout.is_logger)
        # The stop flag is agreed on over a gloo group: a host-side collective, so checking it at
        # every step does not make the host wait for the GPU.
        self._signal_group = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            self._signal_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        self.engine: Any = None
        self.optimizer_desc = ""
        self.step = 0
        self._stop_signal = 0
        self._first_sigint: float | None = None
        self._data: dict[int, PhaseData] = {}
        self.model_cfg = self.model_config(cfg)
        self.source = prepare_data(cfg)
        self.tokenizer = load_tokenizer(self.source.tokenizer_model)
        if self.tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but model.vocab_size is {cfg.vocab_size}")

    # -- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def model_config(cfg: RunConfig) -> ModelConfig:
        """The models package's ``ModelConfig`` of ``cfg`` (vocabulary resolved)."""
        m = cfg.model
        return ModelConfig(
            kind=m.kind, num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
            ffn_hidden_size=m.ffn_hidden_size, vocab_size=cfg.vocab_size, max_position_embeddings=m.max_position_embeddings,
            hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout, init_method_std=m.init_method_std,
            sentence_order=m.sentence_order, make_vocab_size_divisible_by=m.make_vocab_size_divisible_by,
            activation=m.activation)

    def data(self, phase: Phase) -> PhaseData:
        """The phase's datasets (built on first use; earlier phases' are dropped)."""
        if phase.index not in self._data:
            self._data = {k: v for k, v in self._data.items() if k >= phase.index - 1}
            self._data[phase.index] = PhaseData(self.cfg, phase, self.layout, self.source, self.tokenizer)
        return self._data[phase.index]

    def phase_end_tag(self, phase: Phase) -> str:
        return checkpoint_tag(phase.end, phase.name)

    def consumed(self, step: int) -> tuple[int, int]:
        """(samples, tokens) the whole job has trained on after global step ``step``."""
        done = [min(max(step - p.start, 0), p.steps) * p.global_batch_size for p in self.plan]
        return sum(done), sum(n * p.seq_length for n, p in zip(done, self.plan))

    def run_state(self, phase: Phase, losses_finite: bool = True) -> RunState:
        """The ``run_state.json`` record of the current step (checkpointing/run_state.py)."""
        done = self.consumed(self.step)[0]
        return RunState(
            step=self.step, total_steps=self.total, phase_index=phase.index, phase=phase.name,
            phase_kind=phase.kind, phase_step=self.step - phase.start, phase_steps=phase.steps,
            phase_end=self.step == phase.end, consumed_samples=done,
            phase_consumed_samples=(self.step - phase.start) * phase.global_batch_size,
            config_hash=self.cfg.config_hash(), run_name=self.cfg.run_name,
            model={**to_plain(self.cfg.model), "vocab_size": self.cfg.vocab_size},
            monarch=None if phase.monarch is None else phase.monarch.to_state(),
            precision=self.cfg.precision.dtype, tensor_model_parallel_size=self.layout.tp,
            data_parallel_size=self.layout.dp, world_size=self.layout.world, losses_finite=losses_finite,
        )

    def save(self, phase: Phase) -> str:
        # The guard first: no checkpoint of a non-finite step or of non-finite weights.
        tag = self.ckpt.save(self.engine, self.run_state(phase, self.guard.before_save(self.engine, self.step)))
        logger.info("saved checkpoint %s", self.ckpt.path(tag))
        return tag

    def _save_current(self, phase: Phase) -> None:
        """Save the current step in ``phase`` unless that checkpoint exists and verifies (e.g. saved at the switch)."""
        if not self.ckpt.is_saved(checkpoint_tag(self.step, phase.name)):
            self.save(phase)

    def _stopped(self) -> dict[str, Any]:
        self.metrics.flush()
        return {"stopped": True, "step": self.step}

    def _on_signal(self, signum: int, _frame) -> None:
        if signum == signal.SIGINT:
            # A second Ctrl-C exits at once, without saving. Under torchrun every worker gets the
            # first one twice (from the terminal and forwarded by torchrun): within a second it is one.
            if self._first_sigint is not None and time.monotonic() - self._first_sigint > 1.0:
                raise KeyboardInterrupt
            self._first_sigint = self._first_sigint or time.monotonic()
        self._stop_signal = signum

    def _stop_requested(self) -> bool:
        """True on every rank when any rank got SIGTERM / SIGUSR1 / SIGINT (a host-side all-reduce per step)."""
        if self._signal_group is None:
            return self._stop_signal > 0
        flag = torch.tensor([float(self._stop_signal)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._signal_group)
        return bool(flag.item() > 0)

    def _flush_metrics(self) -> None:
        """Write the steps queued since the last flush (waits for them to finish on the device) and
        hand them to the non-finite guard (which stops the run: training/guard.py)."""
        from megatron.core import parallel_state

        group = parallel_state.get_data_parallel_group()
        self.guard.observe(self.metrics.flush_steps(lambda table: mean_over(table, group)))

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, phase: Phase) -> dict[str, float]:
        """Mean validation losses over the fixed validation micro-batches (all DP ranks)."""
        from megatron.core import parallel_state

        module = self.engine.module
        module.eval()
        sums: dict[str, float] = {}
        batches = self.data(phase).valid_micro_batches()
        for batch in batches:
            loss, values = forward_step(module, batch, self.cfg.model.kind, masked_positions_bound=phase.head_positions)
            for k, v in {"loss": loss, **values}.items():
                sums[k] = sums.get(k, 0.0) + float(v) / len(batches)  # a sync per batch: not the hot path
        module.train()
        keys = sorted(sums)
        return dict(zip(keys, all_reduce_mean([sums[k] for k in keys], parallel_state.get_data_parallel_group())))

    # -- training --------------------------------------------------------------------------------
    def train_phase(self, phase: Phase) -> bool:
        """Train from ``self.step`` to the end of ``phase``; True if stopped by a signal.

        One step: the micro-steps (training/step.py) leave the step's gradients and its losses on
        the device, ``engine.step()`` reduces and applies the gradients. Nothing waits for the
        device except where the log, a validation, a checkpoint or the profiler needs its values.
        """
        cfg, lay, t = self.cfg, self.layout, self.cfg.training
        batches = self.data(phase).train_micro_batches(self.step - phase.start)
        acc = phase.grad_accumulation(lay.dp)
        tokens = phase.global_batch_size * phase.seq_length
        flops = train_flops_per_sequence(cfg.model, cfg.vocab_size, phase.monarch, phase.seq_length,
                                         phase.head_positions) * phase.global_batch_size
        graph_safe_rng = captures_graphs(cfg)
        runner = build_micro_steps(cfg, self.engine, phase.head_positions)
        self.engine.train()
        try:
            while self.step < phase.end:
                self.profiler.step_begin(self.step + 1)
                start = StepClock.mark()
                seed_everything(step_seed(cfg.seed, self.step, lay.dp_rank), cuda_graph_safe=graph_safe_rng)
                lr = learning_rate(phase, self.step, self.total)
                set_learning_rate(self.engine, lr)
                with record_function("micro-steps"):  # named ranges in the profiler's trace
                    values = runner.run(batches, acc)
                with record_function("optimizer-step"):
                    self.engine.step()
                self.step += 1
                samples, tokens_seen = self.consumed(self.step)
                optimizer_values = {"learning-rate": lr, "loss-scale": loss_scale(self.engine),
                                    "grad-norm": grad_norm(self.engine), "consumed-samples": samples,
                                    "consumed-tokens": tokens_seen}
                self.metrics.train_step(self.step, phase.index, values, runner.names, optimizer_values,
                                        (start, StepClock.mark()), tokens, flops, lay.world)
                self.profiler.step_end(self.step)
                if self.step % t.log_interval == 0 or self.step == phase.end:
                    self._flush_metrics()
                    self.metrics.progress_line(self.step, phase.name)
                if self.step % t.eval_interval == 0:
                    self.metrics.validation(self.step, self.validate(phase), phase.name)
                if self.step % t.save_interval == 0 and self.step != phase.end:
                    self._flush_metrics()
                    self.save(phase)
                if self._stop_requested():
                    # The caller saves (at a phase's last step too: that is the phase-end checkpoint).
                    self._flush_metrics()
                    logger.info("signal %d received: saving and exiting at step %d", self._stop_signal, self.step)
                    return True
            return False
        finally:
            self._flush_metrics()
            runner.close()

    def _start(self) -> Phase:
        """Build the engine for the first step to run: fresh, or from the latest checkpoint."""
        latest = self.ckpt.latest()
        init_from = self.cfg.training.init_from
        if latest is None:
            phase = self.plan[0]
            weights = None
            if init_from:
                source = check_init_from(self.cfg)  # again (cheap): run.train checked it before the process groups
                weights = load_init_weights(init_from, self.layout.tp_rank)
            self.engine, self.optimizer_desc = build_phase_engine(self.cfg, self.model_cfg, phase, self.layout, weights)
            del weights
            self.step = 0
            logger.info("starting a new run: %d steps in %d phase(s); output in %s", self.total, len(self.plan), self.cfg.output_dir)
            if init_from:
                conv = source.converted_from or {}
                logger.info("initialised from the model weights of %s (%s%s, step %s of its run%s); fresh optimizer "
                            "moments, step 0", init_from, source.phase_kind,
                            f" {source.monarch}" if source.monarch else "", source.step,
                            f"; converted from {conv.get('phase_kind')} {conv.get('path')}" if conv else "")
            return phase
        tag, state = latest
        if init_from:
            logger.info("training.init_from=%s is ignored: output_dir has a checkpoint to resume from (%s); resuming "
                        "always wins", init_from, self.ckpt.path(tag))
        if state.config_hash != self.cfg.config_hash():
            logger.warning("WARNING: the config changed since checkpoint %s was written (hash %s, now %s)",
                           tag, state.config_hash, self.cfg.config_hash())
        phase = self.plan[state.phase_index]
        if self.ckpt.same_layout(state):
            self.engine, self.optimizer_desc = build_phase_engine(self.cfg, self.model_cfg, phase, self.layout, None)
            self.ckpt.load(self.engine, tag, load_optimizer=True)
        else:
            (tp, dp), lay = state.layout, self.layout
            logger.info("checkpoint %s was written by TP=%d x DP=%d processes; resharding its fp32 master weights, "
                        "optimizer moments, optimizer step and loss scale to this job's TP=%d x DP=%d",
                        self.ckpt.path(tag), tp, dp, lay.tp, lay.dp)
            local = self.ckpt.read_resharded(tag, state)
            self.engine, self.optimizer_desc = build_phase_engine(self.cfg, self.model_cfg, phase, lay, local.module)
            restore_optimizer_state(self.engine, local)
            del local
        self.step = state.step
        logger.info("resuming from checkpoint %s (step %d/%d, phase %s, %s)", self.ckpt.path(tag), self.step,
                    self.total, phase.name, phase.kind)
        return phase

    def _switch(self, old: Phase, new: Phase) -> Phase:
        t0 = time.perf_counter()
        logger.info("phase %s (%s) done at step %d; entering phase %s (%s, optimizer state: %s)",
                    old.name, old.kind, self.step, new.name, new.kind, new.optimizer_state)
        self.engine, losses = transition(self, old, new)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # so each phase's max-memory-gb is its own
        if losses is not None:
            self.metrics.scalar("switch/val-loss-before", losses["before"], self.step)
            self.metrics.scalar("switch/val-loss-after", losses["after"], self.step)
            rel = abs(losses["after"] - losses["before"]) / max(abs(losses["before"]), 1e-12)
            self.metrics.record("switch", self.step, {"val-loss-before": losses["before"],
                                                      "val-loss-after": losses["after"], "rel-diff": rel,
                                                      "seconds": time.perf_counter() - t0})
            logger.info("switch %s -> %s at step %d: fixed-batch val loss before %.6f, after %.6f (rel diff %.2e), %.1fs",
                        old.kind, new.kind, self.step, losses["before"], losses["after"], rel, time.perf_counter() - t0)
            if self.cfg.training.save_at_switch:
                self.save(new)
        return new

    def run(self) -> dict[str, Any]:
        """Train to the end (or until a signal); returns a summary dict."""
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
        try:
            return self._run()
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            self.profiler.close()
            self.metrics.close()

    def _run(self) -> dict[str, Any]:
        if self.layout.is_logger:
            with open(os.path.join(self.cfg.output_dir, "config.yaml"), "w") as f:
                f.write(self.cfg.to_yaml())
        self.ckpt.clean_staging()
        # train.log appends across resumes: each start is marked, with the plan it runs.
        logger.info("===== run started on %s (pid %d), %s: %s =====", socket.gethostname(), os.getpid(),
                    time.strftime("%Y-%m-%d %H:%M:%S %Z"), self.cfg.output_dir)
        for line in plan_lines(self.cfg):
            logger.info("%s", line)
        phase = self._start()
        self.metrics.resume_at(self.step)  # metrics.jsonl: each step once, whatever was logged past it before
        logger.info("optimizer: %s; precision %s; TP %d x DP %d", self.optimizer_desc, self.cfg.precision.dtype,
                    self.layout.tp, self.layout.dp)
        logger.info("TensorBoard logs: %s  (tensorboard --logdir %s)", self.metrics.tb_dir, self.metrics.tb_dir)
        while True:
            stopped = self.step < phase.end and self.train_phase(phase)
            # The current step's checkpoint: the phase-end one (what the switch and resume start
            # from), or, when a signal stopped the phase early, the last step done. A signal that
            # arrived during the phase's last step lands here too, so its phase-end checkpoint is
            # written before exiting (it used to be skipped: the resume then repeated the steps
            # since the previous checkpoint).
            self._save_current(phase)
            if stopped:
                return self._stopped()
            if phase.index == len(self.plan) - 1:
                break
            phase = self._switch(phase, self.plan[phase.index + 1])
            if self._stop_requested():  # a signal during the switch: keep its result, exit before training on
                logger.info("signal %d received during the switch: saving and exiting at step %d",
                            self._stop_signal, self.step)
                self._save_current(phase)
                return self._stopped()
        final = self.validate(phase)
        if self.step % self.cfg.training.eval_interval != 0:
            self.metrics.validation(self.step, final, phase.name)
        self.metrics.flush()
        logger.info("run complete: %d steps; final validation loss %.4f; TensorBoard logs in %s",
                    self.step, final["loss"], self.metrics.tb_dir)
        return {"stopped": False, "step": self.step, "final_valid": final}


__all__ = ["Trainer"]
