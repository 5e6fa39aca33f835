"""Fault injection on CPU (issue 12): what the service does when things go wrong around a run.

One test per case: a NaN learning rate (and the other out-of-range settings) refused before any
work; flipped bytes in the newest model / optimizer file, a truncated and a deleted file, an
unreadable or inconsistent run_state.json: each detected, named, and the run falls back to the
previous checkpoint and reproduces the uninterrupted run's losses (metrics.jsonl then holds every
step once); a directory in the way of the final save; a full disk during a save (a small tmpfs,
as root); missing and truncated data, a broken tokenizer; a resume with another model size; TP
larger than the process count; two trainers on one output_dir; SIGINT; a run going non-finite;
complex Monarch matrices (gradients against a float64 complex reference, the DFT recovered).

Tiny model (one layer, width 32), six steps; runs in process through the launcher's ``main`` where
the exit code matters, and in a subprocess only for the signal and the second trainer.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from tiny_demo import DATA, DEMO, ROOT, load_launcher, metrics_by_step, tiny_overrides

TINY = tiny_overrides(
    "training.total_steps=6", "training.log_interval=1", "training.eval_interval=100", "training.eval_iters=1",
    "training.save_interval=2", "training.keep_last=10", "phases=[{name: monarch, steps: 6, monarch: {nblocks: 2}}]",
)
MODEL, OPTIM = "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"


PRETRAIN = load_launcher("pretrain")


def pretrain(out: str, *extra: str, dry_run: bool = False) -> tuple[int, str]:
    """``launcher/pretrain.py`` in this process: (exit code, stderr)."""
    err = io.StringIO()
    args = ["--config", DEMO, *(["--dry-run"] if dry_run else []), f"output_dir={out}", *TINY, *extra]
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = PRETRAIN.main(args)
    return rc, err.getvalue()


def ckpt(out: str, step: int) -> str:
    return os.path.join(out, "checkpoints", f"step{step:07d}-monarch")


def train_lines(out: str) -> list[dict]:
    """Every train row of metrics.jsonl, as a plain reader sees them."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "train"]


def log(out: str) -> str:
    with open(os.path.join(out, "train.log")) as f:
        return f.read()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    """The uninterrupted run: checkpoints at steps 2, 4 and 6."""
    out = str(tmp_path_factory.mktemp("reference"))
    rc, err = pretrain(out)
    assert rc == 0, err
    return out


def interrupted(reference: str, out: str, steps=(2, 4)) -> str:
    """``out`` as a run killed after step 4 leaves it: its checkpoints and its metrics.jsonl (which,
    as after a kill during step 5's save, already holds rows past the newest checkpoint)."""
    for step in steps:
        shutil.copytree(ckpt(reference, step), ckpt(out, step))
    shutil.copy(os.path.join(reference, "metrics.jsonl"), os.path.join(out, "metrics.jsonl"))
    return out


def weights(path: str) -> dict[str, torch.Tensor]:
    module = torch.load(os.path.join(path, MODEL), map_location="cpu", weights_only=False)["module"]
    return {k: v for k, v in module.items() if torch.is_tensor(v)}


def assert_resumed_like_reference(out: str, reference: str, first: int) -> None:
    """``out`` resumed from step ``first`` and ended as the uninterrupted run did, and its
    metrics.jsonl holds every step once, with the reference's losses."""
    rows = train_lines(out)
    assert sorted(r["step"] for r in rows) == list(range(1, 7))  # each step once
    ref = metrics_by_step(reference, "train")
    assert {r["step"]: r["loss"] for r in rows} == {s: r["loss"] for s, r in ref.items()}  # bitwise (CPU, fp32)
    assert f"resuming from checkpoint {ckpt(out, first)} (step {first}/6" in log(out)
    final, ref_final = weights(ckpt(out, 6)), weights(ckpt(reference, 6))
    assert final.keys() == ref_final.keys() and all(torch.equal(final[k], ref_final[k]) for k in final)


def flip(path: str, offset: int, n: int = 64) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(n))
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


# -- config ranges ----------------------------------------------------------------------------------
@pytest.mark.parametrize("override,message", [
    ("optimizer.lr=.nan", "optimizer.lr: must be a finite number, got nan"),
    ("phases.0.optimizer={lr: .inf}", "phases[0].optimizer.lr: must be a finite number, got inf"),
    ("data.num_workers=-1", "data.num_workers: must be >= 0"),
    ("model.init_method_std=-0.02", "model.init_method_std: must be > 0"),
    ("data.masking_max_ngram=0", "data.masking_max_ngram: must be > 0"),
    ("data.short_seq_prob=5", "data.short_seq_prob: must be in [0, 1]"),
    ("optimizer.weight_decay=-1", "optimizer.weight_decay: must be >= 0"),
])
def test_out_of_range_settings_are_refused_before_any_work(tmp_path, override: str, message: str) -> None:
    out = str(tmp_path / "run")
    for dry_run in (True, False):
        rc, err = pretrain(out, override, dry_run=dry_run)
        assert rc == 2 and err.strip().count("\n") == 0 and message in err, err
    assert not os.path.exists(out)


# -- damaged checkpoints ----------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["flip model", "flip optimizer", "truncate model", "delete optimizer"])
def test_damaged_newest_checkpoint_is_skipped_naming_the_file(reference: str, tmp_path, damage: str) -> None:
    out = interrupted(reference, str(tmp_path))
    action, which = damage.split()
    path = os.path.join(ckpt(out, 4), MODEL if which == "model" else OPTIM)
    if action == "flip":
        flip(path, os.path.getsize(path) // 2)
    elif action == "truncate":
        os.truncate(path, os.path.getsize(path) // 2)
    else:
        os.remove(path)
    rc, err = pretrain(out)
    assert rc == 0, err
    text = log(out)
    assert f"skipping checkpoint {ckpt(out, 4)}: {path}" in text
    assert {"flip": "does not match the sha256", "truncate": "bytes but", "delete": "is missing"}[action] in text
    assert_resumed_like_reference(out, reference, first=2)
    # the damaged directory was in the way of the step-4 save: moved aside, not trusted, not deleted
    aside = os.listdir(os.path.join(out, "checkpoints", ".invalid"))
    assert len(aside) == 1 and aside[0].startswith("step0000004-monarch.")


@pytest.mark.parametrize("damage", ["unreadable", "other step", "all unreadable"])
def test_bad_run_state_is_a_skipped_checkpoint_never_a_silent_restart(reference: str, tmp_path, damage: str) -> None:
    out = interrupted(reference, str(tmp_path))
    for step in (2, 4) if damage == "all unreadable" else (4,):
        state_path = os.path.join(ckpt(out, step), "run_state.json")
        if damage == "other step":
            state = json.load(open(state_path))
            json.dump({**state, "step": 3}, open(state_path, "w"))
        else:
            with open(state_path, "r+") as f:
                f.truncate(100)  # torn JSON
    rc, err = pretrain(out)
    if damage == "all unreadable":
        assert rc == 2 and "config error: output_dir:" in err and "none verifies" in err and "step0000002-monarch" in err
        assert not os.path.exists(os.path.join(out, "train.log"))  # nothing started
        return
    assert rc == 0, err
    why = "is unreadable" if damage == "unreadable" else "says step 3 of phase 'monarch', which is not the checkpoint"
    assert f"skipping checkpoint {ckpt(out, 4)}: {ckpt(out, 4)}/run_state.json" in log(out) and why in log(out)
    assert_resumed_like_reference(out, reference, first=2)


def test_invalid_directory_with_the_final_tag_is_moved_aside_and_saved_over(reference: str, tmp_path) -> None:
    out = interrupted(reference, str(tmp_path))
    os.makedirs(ckpt(out, 6))
    open(os.path.join(ckpt(out, 6), "notes.txt"), "w").write("not a checkpoint")
    rc, err = pretrain(out)
    assert rc == 0, err
    assert_resumed_like_reference(out, reference, first=4)
    from monarch_megatron.checkpointing.store import inspect_checkpoint

    state, problem = inspect_checkpoint(ckpt(out, 6))
    assert problem is None and state.step == 6 and set(state.files) == {MODEL, OPTIM}
    (aside,) = os.listdir(os.path.join(out, "checkpoints", ".invalid"))
    assert os.path.isfile(os.path.join(out, "checkpoints", ".invalid", aside, "notes.txt"))
    assert "was in the way of this save" in log(out)


def test_checkpoint_records_size_and_sha256_of_every_file(reference: str) -> None:
    import hashlib

    state = json.load(open(os.path.join(ckpt(reference, 6), "run_state.json")))
    assert set(state["files"]) == {MODEL, OPTIM} and state["losses_finite"] is True
    for name, rec in state["files"].items():
        data = open(os.path.join(ckpt(reference, 6), name), "rb").read()
        assert rec == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# -- disk full --------------------------------------------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path):
    """A 4 MiB tmpfs (one tiny checkpoint is 2.3 MB): root only."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    mount = str(tmp_path / "disk")
    os.makedirs(mount)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", mount], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", mount], check=False)


def test_disk_full_during_a_save_says_so_and_keeps_the_previous_checkpoint(reference: str, small_tmpfs) -> None:
    out = os.path.join(small_tmpfs, "run")
    rc, err = pretrain(out)
    assert rc == 1 and "no space left on device while saving checkpoint" in err, err
    assert os.path.join(out, "checkpoints", ".staging", "step0000004-monarch") in err
    from monarch_megatron.checkpointing.store import check_files, inspect_checkpoint

    state, problem = inspect_checkpoint(ckpt(out, 2))
    assert problem is None and check_files(ckpt(out, 2), state.files) is None  # intact
    assert not os.path.exists(os.path.join(out, "checkpoints", ".staging"))  # the torn save is gone
    # The next start cleans .staging before it writes anything else, even on a disk that is full.
    subprocess.run(["mount", "-o", "remount,size=16m", small_tmpfs], check=True)
    filler = os.path.join(out, "checkpoints", ".staging", "debris")
    os.makedirs(os.path.dirname(filler))
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    assert shutil.disk_usage(small_tmpfs).free < 2**16
    rc, err = pretrain(out)
    assert rc == 0, err
    assert_resumed_like_reference(out, reference, first=2)


# -- data -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def indexed(tmp_path_factory) -> str:
    """A copy of the demo's indexed BERT data and tokenizer: ``<dir>/demo``, ``<dir>/demo.model``."""
    from monarch_megatron.data.demo_corpus import prepare_demo_data

    prefix, model = prepare_demo_data(DATA)
    out = str(tmp_path_factory.mktemp("indexed"))
    for src in (model, prefix + "_text_sentence.bin", prefix + "_text_sentence.idx"):
        shutil.copy(src, out)
    return os.path.join(out, "demo")


@pytest.mark.parametrize("damage,key,message", [
    ("no prefix", "data.prefix", "_text_sentence.idx not found"),
    ("truncated bin", "data.prefix", "_text_sentence.bin has"),
    ("no tokenizer", "data.tokenizer_model", "missing.model not found"),
    ("bad tokenizer", "data.tokenizer_model", "is not a sentencepiece model"),
])
def test_missing_or_damaged_data_is_one_error_before_any_work(indexed: str, tmp_path, damage, key, message) -> None:
    prefix, model = indexed, indexed + ".model"
    if damage == "no prefix":
        prefix = str(tmp_path / "nowhere")
    elif damage == "truncated bin":
        prefix = str(tmp_path / "demo")
        shutil.copy(indexed + "_text_sentence.idx", prefix + "_text_sentence.idx")
        shutil.copy(indexed + "_text_sentence.bin", prefix + "_text_sentence.bin")
        os.truncate(prefix + "_text_sentence.bin", os.path.getsize(prefix + "_text_sentence.bin") - 10)
    elif damage == "no tokenizer":
        model = str(tmp_path / "missing.model")
    else:
        model = str(tmp_path / "bad.model")
        open(model, "w").write("not a model")
    out = str(tmp_path / "run")
    data = ["data.source=indexed", f"data.prefix={prefix}", f"data.tokenizer_model={model}"]
    for dry_run in (True, False):
        rc, err = pretrain(out, *data, dry_run=dry_run)
        assert rc == 2 and err.startswith(f"config error: {key}: ") and message in err, err
        assert err.strip().count("\n") == 0
    assert not os.path.exists(out)
    assert pretrain(out, *data[:1], f"data.prefix={indexed}", f"data.tokenizer_model={indexed}.model",
                    dry_run=True)[0] == 0  # the intact copy passes


def test_preprocess_exits_2_on_an_empty_corpus(indexed: str, tmp_path) -> None:
    from monarch_megatron.data.preprocess import main

    corpus = tmp_path / "empty.jsonl"
    corpus.write_text("\n\n")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["--input", str(corpus), "--output-prefix", str(tmp_path / "x"), "--tokenizer-model",
                   indexed + ".model", "--no-progress"])
    assert rc == 2 and "holds no documents" in err.getvalue()
    assert not any(p.name.startswith("x") for p in tmp_path.iterdir())


# -- resume with another model, TP > processes ------------------------------------------------------
def test_resume_with_another_model_size_names_each_key_and_keeps_config_yaml(reference: str) -> None:
    config = open(os.path.join(reference, "config.yaml")).read()
    listing = sorted(os.listdir(os.path.join(reference, "checkpoints")))
    for dry_run in (True, False):
        rc, err = pretrain(reference, "model.hidden_size=64", "model.ffn_hidden_size=128", dry_run=dry_run)
        assert rc == 2 and err.startswith("config error: model: resuming from checkpoint"), err
        assert "model.hidden_size is 32 in the checkpoint, 64 in this run" in err
        assert "model.ffn_hidden_size is 64 in the checkpoint, 128 in this run" in err
    assert open(os.path.join(reference, "config.yaml")).read() == config
    assert sorted(os.listdir(os.path.join(reference, "checkpoints"))) == listing


def test_tensor_parallel_larger_than_the_process_count_is_one_error(tmp_path) -> None:
    out = str(tmp_path / "run")
    rc, err = pretrain(out, "parallel.tensor_model_parallel_size=2")
    assert rc == 2 and err.startswith("config error: parallel.tensor_model_parallel_size: ") and \
        "needs a multiple of 2 processes, but this job has 1" in err, err
    assert not os.path.exists(out)


# -- non-finite -------------------------------------------------------------------------------------
@pytest.mark.parametrize("nan_from,limit,stops_at,message", [
    (3, 2, 6, "2 consecutive steps had non-finite values (training.max_nonfinite_steps=2); steps 5..6: loss nan"),
    (5, 3, 6, "the model's parameters are not finite after step 6"),
])
def test_run_going_non_finite_stops_without_saving_or_pruning(tmp_path, monkeypatch, nan_from, limit, stops_at,
                                                              message) -> None:
    from monarch_megatron.training import loop

    original = loop.learning_rate
    monkeypatch.setattr(loop, "learning_rate",
                        lambda phase, step, total: float("nan") if step >= nan_from else original(phase, step, total))
    out = str(tmp_path)
    rc, err = pretrain(out, "training.total_steps=8", "phases.0.steps=8", "training.save_interval=3",
                       "training.keep_last=1", f"training.max_nonfinite_steps={limit}")
    assert rc == 3 and message in err, err
    assert "Stopped without saving or pruning; the newest checkpoint saved with finite losses is " \
           f"{ckpt(out, 3)} (step 3)" in err
    assert sorted(t for t in os.listdir(os.path.join(out, "checkpoints")) if t.startswith("step")) == ["step0000003-monarch"]
    assert max(r["step"] for r in train_lines(out)) == stops_at


def test_guard_counts_fp16_overflow_skips_and_prune_keeps_the_newest_finite_checkpoint(tmp_path) -> None:
    from monarch_megatron.checkpointing.run_state import RunState
    from monarch_megatron.checkpointing.store import checkpoint_tag, write_run_state
    from monarch_megatron.training.checkpoint import CheckpointManager
    from monarch_megatron.training.distributed import Layout
    from monarch_megatron.training.guard import NonFiniteError, NonFiniteGuard

    manager = CheckpointManager(str(tmp_path), Layout(1, 0, 1, 0, 1, 0), keep_last=1)
    rows = [(s, {"loss": 1.0, "lm loss": 1.0, "grad-norm": float("inf"), "loss-scale": 2.0 ** -s}) for s in range(1, 6)]
    fp16 = NonFiniteGuard(2, True, manager)
    fp16.observe(rows)  # overflow-skipped steps: normal in fp16
    assert fp16.skipped == 5 and fp16.consecutive == 0
    with pytest.raises(NonFiniteError, match="2 consecutive steps.*steps 1..2: grad-norm inf"):
        NonFiniteGuard(2, False, manager).observe(rows)  # in bf16 / fp32 they are not
    with pytest.raises(NonFiniteError, match="step 3: loss nan"):
        NonFiniteGuard(1, True, manager).observe([(3, {"loss": float("nan"), "grad-norm": float("inf")})])
    for step, finite in ((1, True), (2, True), (3, False), (4, False)):
        path = manager.path(checkpoint_tag(step, "p"))
        os.makedirs(path)
        write_run_state(path, RunState(step=step, phase="p", phase_index=0, tag=os.path.basename(path),
                                       complete=True, losses_finite=finite))
    manager.prune()
    assert sorted(os.listdir(manager.root)) == ["step0000002-p", "step0000004-p"]


# -- two trainers, SIGINT ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """A trainer in a subprocess, past its second step (long enough to be stopped by a test)."""
    out = str(tmp_path_factory.mktemp("running"))
    cmd = [sys.executable, os.path.join(ROOT, "launcher", "pretrain.py"), "--config", DEMO, f"output_dir={out}", *TINY,
           "training.total_steps=400", "phases.0.steps=400", "training.save_interval=1000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (os.path.exists(os.path.join(out, "metrics.jsonl")) and len(train_lines(out)) >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
        time.sleep(0.1)
    yield proc, out
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_second_trainer_on_the_same_output_dir_exits_2_naming_the_holder(running) -> None:
    proc, out = running
    if proc.poll() is not None:
        pytest.skip("the first trainer already ended")
    rc, err = pretrain(out, "training.total_steps=400", "phases.0.steps=400", "training.save_interval=1000")
    assert rc == 2, err
    assert f"config error: output_dir: {out} is in use by another trainer (host {socket.gethostname()}, " \
           f"PID {proc.pid}, started " in err
    assert proc.poll() is None  # the first one runs on, undisturbed


def test_sigint_saves_at_the_end_of_the_step_and_exits_0(running) -> None:
    proc, out = running
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    assert "signal 2 received: saving and exiting" in output and "Traceback" not in output
    stopped = max(r["step"] for r in train_lines(out))
    from monarch_megatron.training.checkpoint import CheckpointManager
    from monarch_megatron.training.distributed import Layout

    tag, state = CheckpointManager(out, Layout(1, 0, 1, 0, 1, 0), 3).latest()
    assert state.step == stopped and tag == f"step{stopped:07d}-monarch"
    assert open(os.path.join(out, "run.lock")).read() == ""  # released


def test_second_ctrl_c_exits_at_once() -> None:
    from monarch_megatron.training.loop import Trainer

    trainer = Trainer.__new__(Trainer)
    trainer._stop_signal, trainer._first_sigint = 0, None
    trainer._on_signal(signal.SIGINT, None)  # the first: stop at the end of the step
    trainer._on_signal(signal.SIGINT, None)  # the same Ctrl-C forwarded by torchrun: still the first
    assert trainer._stop_signal == signal.SIGINT
    trainer._first_sigint -= 2.0
    with pytest.raises(KeyboardInterrupt):
        trainer._on_signal(signal.SIGINT, None)


def test_stale_lock_of_a_dead_trainer_is_taken_over(reference: str, tmp_path) -> None:
    out = interrupted(reference, str(tmp_path), steps=(2, 4))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = {"host": socket.gethostname(), "pid": int(dead.stdout), "started": "2026-01-01T00:00:00"}
    with open(os.path.join(out, "run.lock"), "w") as f:
        json.dump(holder, f)
    rc, err = pretrain(out)
    assert rc == 0, err
    assert f"took over the stale lock {out}/run.lock of a trainer that is gone (host {socket.gethostname()}, " \
           f"PID {holder['pid']}" in log(out)


def test_lock_without_flock_decides_by_the_recorded_holder(tmp_path, monkeypatch) -> None:
    import errno

    from monarch_megatron.training import runlock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "no locks available")

    monkeypatch.setattr(runlock.fcntl, "flock", no_flock)
    first = runlock.RunLock(str(tmp_path))
    assert first.acquire() is None  # recorded: this process (alive)
    with pytest.raises(runlock.RunLocked, match=f"PID {os.getpid()}, .*this filesystem has no flock"):
        runlock.RunLock(str(tmp_path)).acquire()
    first.release()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = {"host": socket.gethostname(), "pid": int(dead.stdout), "started": "then"}
    (tmp_path / runlock.LOCK_FILE).write_text(json.dumps(holder))
    lock = runlock.RunLock(str(tmp_path))
    assert lock.acquire() == holder  # a dead holder's lock is taken over (and reported)
    lock.release()


# -- complex Monarch matrices -----------------------------------------------------------------------
def _reference_multiply(x, w1, w2, output_permutation):
    """DESIGN.md's definition, row by row and block by block, in complex128 with torch's autograd."""
    k, q, p = w1.shape
    l, s, r = w2.shape
    outs = []
    for row in x.reshape(-1, k * p):
        u = torch.cat([w1[i] @ row[i * p:(i + 1) * p] for i in range(k)])
        v = u.reshape(r, l).t()
        y = torch.stack([w2[j] @ v[j] for j in range(l)])
        outs.append(y.t().reshape(s * l) if output_permutation else y.reshape(l * s))
    return torch.stack(outs)


@pytest.mark.parametrize("output_permutation", [True, False])
@pytest.mark.parametrize("in_f,out_f,nblocks", [(16, 16, 4), (8, 24, 2), (24, 8, 2)])
def test_complex_monarch_gradients_match_a_complex128_reference(in_f, out_f, nblocks, output_permutation) -> None:
    from monarch_megatron.monarch import monarch_factor_shapes, monarch_multiply

    gen = torch.Generator().manual_seed(in_f * out_f + nblocks)
    shp = monarch_factor_shapes(in_f, out_f, nblocks)
    x, w1, w2 = (torch.randn(*shape, dtype=torch.complex128, generator=gen)
                 for shape in ((5, shp.padded_in), shp.w1_shape, shp.w2_shape))
    probe = torch.randn(5, shp.padded_out, dtype=torch.complex128, generator=gen)
    grads = []
    for multiply in (lambda *a: monarch_multiply(*a, output_permutation, backend="torch"),
                     lambda *a: _reference_multiply(*a, output_permutation)):
        leaves = [t.clone().requires_grad_() for t in (x, w1, w2)]
        y = multiply(*leaves)
        (y * probe).real.sum().backward()  # a real loss of a complex output
        grads.append([y.detach()] + [t.grad for t in leaves])
    for ours, ref in zip(*grads):
        assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-12)
    leaves = [t[:2].clone().requires_grad_() if i == 0 else t.clone().requires_grad_() for i, t in enumerate((x, w1, w2))]
    assert torch.autograd.gradcheck(lambda *a: monarch_multiply(*a, output_permutation, backend="torch"), leaves)


def test_complex_projection_recovers_the_dft_exactly_and_triton_paths_refuse_complex() -> None:
    from monarch_megatron.monarch import MonarchLinear, monarch_multiply, monarch_to_dense, project_to_monarch

    for n, b in ((16, 4), (256, 16)):
        dft = torch.fft.fft(torch.eye(n, dtype=torch.complex128), norm="ortho").t()
        perm = torch.arange(n).view(b, b).t().reshape(-1)  # swap the axes of the b x b input grid
        target = dft[:, perm]
        w1, w2 = project_to_monarch(target, b)
        assert w1.dtype == torch.complex128 and (monarch_to_dense(w1, w2) - target).abs().max() < 1e-12
    layer = MonarchLinear.from_dense(target.to(torch.complex64), nblocks=16, bias=None)
    x = torch.randn(3, 256, dtype=torch.complex64)
    assert torch.allclose(layer(x), x @ target.to(torch.complex64).t(), atol=1e-5)
    for backend in ("tma", "fused", "triton"):
        with pytest.raises(ValueError, match=f"backend='{backend}' does not support complex dtype torch.complex64"):
            monarch_multiply(x, layer.blkdiag1, layer.blkdiag2, backend=backend)


def test_init_from_a_checkpoint_whose_model_file_changed_is_refused(reference: str, tmp_path) -> None:
    source = str(tmp_path / "source")
    shutil.copytree(ckpt(reference, 2), source)
    flip(os.path.join(source, MODEL), 4096)
    out = str(tmp_path / "run")
    rc, err = pretrain(out, f"training.init_from={source}")
    assert rc == 2 and err.startswith("config error: training.init_from: ") and \
        f"{source} does not verify: {source}/{MODEL} does not match the sha256" in err, err
    assert not os.path.exists(out)
