"""Exact resume: a run killed with SIGKILL and resumed from its last.ckpt ends where an unbroken run ends.

Unit tests of the pieces (:mod:`datamodules.resumable`, :mod:`lightning_modules.resume`) and, marked
slow, the real thing on the tiny head: the distillation and GAR stages run uninterrupted, then again
in a subprocess that a callback (:class:`KillAt`, given on the command line) kills with SIGKILL at a
fixed batch, then resumed with ``--run_dir <run> --ckpt_path last``; the final weights must agree.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml

from datamodules.resumable import EpochShuffleSampler, ResumableDataLoader
from lightning_modules.resume import RandomState, get_random_state, set_random_state
from tests.conftest import EXPERIMENTS, REPO_ROOT, TINY_MESH, run_stage
from tests.lightning_modules.toy import PointColourData, PointColourModule


class KillAt(pl.Callback):
    """Test helper: SIGKILL the process once ``batches`` training batches are done (nothing runs at exit).

    Args:
        batches: training batches completed when the kill is sent.
        hook: ``"train_batch_start"`` (before the next batch) or ``"validation_start"`` (when a
            validation begins, i.e. after any checkpoint written at the end of that batch).
    """

    def __init__(self, batches: int, hook: str = "train_batch_start") -> None:
        if hook not in ("train_batch_start", "validation_start"):
            raise ValueError(f"unknown hook {hook!r}")
        self.batches, self.hook = batches, hook

    def _maybe_kill(self, trainer: pl.Trainer, hook: str) -> None:
        if hook == self.hook and trainer.fit_loop.epoch_loop.batch_progress.total.completed == self.batches:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._maybe_kill(trainer, "train_batch_start")

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._maybe_kill(trainer, "validation_start")


class ResumablePointColourData(PointColourData):
    """The toy stage's data with the resumable training loader our datamodules use."""

    def train_dataloader(self) -> ResumableDataLoader:
        return ResumableDataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)


class NoisyPointColourModule(PointColourModule):
    """The toy stage with random jitter from torch, NumPy and Python in every training step."""

    def training_step(self, batch, batch_idx):
        points, colours = batch
        jitter = 0.05 * torch.randn_like(points) + 0.05 * float(np.random.randn()) + 0.05 * random.random()
        return super().training_step((points + jitter, colours), batch_idx)


TOY = {
    "model": {"class_path": f"{__name__}.NoisyPointColourModule"},
    "data": {"class_path": f"{__name__}.ResumablePointColourData", "init_args": {"num_points": 256, "batch_size": 64}},
    "trainer": {
        "max_steps": 10, "accelerator": "cpu", "enable_model_summary": False, "enable_progress_bar": False,
        "val_check_interval": 2, "log_every_n_steps": 1,
    },
}


# -- the data position ------------------------------------------------------------------------------
def _batches(loader) -> list[list[int]]:
    return [b.tolist() for b in loader]


def test_loader_orders_differ_per_epoch_and_repeat_per_seed():
    data = torch.arange(10)
    a, b = ResumableDataLoader(data, batch_size=3, shuffle=True, seed=7), ResumableDataLoader(data, 3, True, seed=7)
    a.sampler.set_epoch(0)
    first = _batches(a)
    a.sampler.set_epoch(1)
    second = _batches(a)
    b.sampler.set_epoch(1)
    assert _batches(b) == second != first
    assert sorted(sum(first, [])) == list(range(10)) and [len(x) for x in first] == [3, 3, 3, 1]
    assert _batches(ResumableDataLoader(data, batch_size=4)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_loader_resumes_after_the_handed_out_batches_of_that_epoch():
    data = torch.arange(10)
    loader = ResumableDataLoader(data, batch_size=3, shuffle=True, seed=1)
    loader.sampler.set_epoch(2)
    full = _batches(loader)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    assert (state["epoch"], state["batches"]) == (2, 2)

    resumed = ResumableDataLoader(data, batch_size=3, shuffle=True, seed=123)  # the checkpoint's seed wins
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)  # what Lightning does at the start of the resumed epoch
    assert _batches(resumed) == full[2:]
    assert resumed.state_dict()["batches"] == 4
    resumed.sampler.set_epoch(2)
    assert _batches(resumed) == full  # the skip applies to one pass only

    other = ResumableDataLoader(data, batch_size=3, shuffle=True, seed=5)
    other.load_state_dict(state)
    other.sampler.set_epoch(3)  # Lightning moved on to the next epoch: the saved position is dropped
    assert len(sum(_batches(other), [])) == 10


def test_loader_draws_no_global_random_numbers():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    _batches(ResumableDataLoader(torch.arange(10), batch_size=2, shuffle=True))
    assert torch.equal(torch.get_rng_state(), before)


def test_loader_with_another_batch_size_restarts_the_epoch_with_a_warning():
    loader = ResumableDataLoader(torch.arange(10), batch_size=2, shuffle=True, seed=0)
    state = {**loader.state_dict(), "batches": 3, "batch_size": 3}
    with pytest.warns(UserWarning, match="restarts from its first batch"):
        loader.load_state_dict(state)
    assert len(sum(_batches(loader), [])) == 10


def test_sampler_shards_ranks_and_rejects_bad_positions():
    data = torch.arange(10)
    shards = [list(EpochShuffleSampler(data, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == list(range(10)) and len(shards[0]) == 5
    with pytest.raises(ValueError, match="samples"):
        EpochShuffleSampler(data).resume_at(0, 11)
    with pytest.raises(ValueError, match="own sampler"):
        ResumableDataLoader(data, batch_size=2, sampler=range(10))


def test_cli_rejects_a_negative_checkpoint_interval(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    conf = tmp_path / "toy.yaml"
    conf.write_text(yaml.safe_dump(TOY))
    with pytest.raises(SystemExit):
        run_stage("fit", "--config", str(conf), "--checkpoint_every_n_batches=-1")
    assert "--checkpoint_every_n_batches must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# -- the random states -------------------------------------------------------------------------------
def _draw() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_random_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    np.random.randn()  # a cached Gaussian in NumPy's state
    torch.save(get_random_state(), tmp_path / "rng.pt")
    expected = _draw()
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    set_random_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draw() == expected


def test_random_state_callback_restores_on_the_first_batch_and_isolates_validation():
    callback = RandomState()
    torch.manual_seed(0)
    callback.load_state_dict(callback.state_dict())
    expected = torch.rand(2)
    torch.rand(5)  # what happens between loading the checkpoint and the first batch
    callback.on_train_batch_start(None, None, None, 0)
    assert torch.equal(torch.rand(2), expected)

    class Trainer:  # the two attributes on_validation_end reads
        sanity_checking = False
        state = type("State", (), {"fn": "fit"})()

    callback.on_train_batch_end(None, None, None, None, 0)
    expected = torch.rand(2)
    torch.rand(7)  # validation draws
    callback.on_validation_end(Trainer(), None)
    assert torch.equal(torch.rand(2), expected)  # training continues as if validation had not run
    callback.on_validation_end(Trainer(), None)  # no training batch since: nothing to put back
    assert not torch.equal(torch.rand(2), expected)
    Trainer.sanity_checking = True
    callback.on_train_batch_end(None, None, None, None, 1)
    expected = torch.rand(2)
    callback.on_validation_end(Trainer(), None)  # the sanity check is left alone
    assert not torch.equal(torch.rand(2), expected)


# -- end to end: SIGKILL and resume -----------------------------------------------------------------
def _stage_args(stage: str, upstream_key: str, upstream_run: Path, run_dir: Path, *extra: str) -> list[str]:
    """fit arguments of ``stage`` on the tiny head: 6 batches (3 epochs of 2), validation after batch 4."""
    return [
        "fit", "--config", str(EXPERIMENTS / f"{stage}.yaml"), "--config", str(TINY_MESH),
        f"--model.init_args.{upstream_key}", str(upstream_run / "checkpoints" / "last.ckpt"),
        "--trainer.val_check_interval=1.0", "--trainer.check_val_every_n_epoch=2",
        "--trainer.enable_progress_bar=false", "--run_dir", str(run_dir), *extra,
    ]


def _cli_process(args: list[str]) -> subprocess.CompletedProcess:
    """``python -m lightning_modules.cli *args`` in a fresh process.

    Every run of a comparison gets its own process, as a resumed run does in practice: a run inside
    the test process would inherit what earlier tests left there (thread count, ops backend), and
    Adam turns the smallest numerical difference into a step of size ``lr``. One thread: reductions
    split over threads (scatter, index_add) may round differently from run to run, so two
    uninterrupted runs are bitwise equal only on one thread; exact resume is tested there.
    """
    cmd = [sys.executable, "-m", "lightning_modules.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)


def _killed_at(args: list[str], batches: int, hook: str) -> subprocess.CompletedProcess:
    kill = {"class_path": f"{__name__}.KillAt", "init_args": {"batches": batches, "hook": hook}}
    return _cli_process([*args, f"--trainer.callbacks+={json.dumps(kill)}"])


def _completed(args: list[str]) -> None:
    done = _cli_process(args)
    assert done.returncode == 0, done.stderr[-3000:]


def _final(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def _batches_done(ckpt: dict) -> int:
    return ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"]


#: Float tolerance of "the same weights". Two uninterrupted runs in separate processes can differ in a
#: few elements by ~1e-6 (SIMD summation order follows memory alignment; Adam scales such noise in
#: near-zero gradients up to steps of size lr), while a resume that replays or skips a batch, or
#: draws other random numbers, moves the weights by about lr (1e-4 .. 3e-3) everywhere.
RTOL, ATOL = 1e-5, 1e-5


def _assert_same_weights(resumed: dict, reference: dict, prefix: str = "", atol: float = ATOL) -> int:
    keys = sorted(k for k in reference["state_dict"] if k.startswith(prefix))
    assert keys and keys == sorted(k for k in resumed["state_dict"] if k.startswith(prefix))
    for key in keys:
        torch.testing.assert_close(
            resumed["state_dict"][key], reference["state_dict"][key], rtol=RTOL, atol=atol, msg=lambda m, k=key: f"{k}: {m}"
        )
    return len(keys)


def _differing_fraction(a: dict, b: dict, prefix: str = "") -> float:
    """The fraction of all weight entries under ``prefix`` that differ beyond RTOL/ATOL between two checkpoints."""
    differ = total = 0
    for key, ref in b["state_dict"].items():
        if key.startswith(prefix) and ref.is_floating_point():
            differ += int((~torch.isclose(a["state_dict"][key], ref, rtol=RTOL, atol=ATOL)).sum())
            total += ref.numel()
    return differ / total


def _kill_and_resume(tmp_path: Path, args_for, batches: int, hook: str) -> tuple[dict, dict, dict]:
    """Run ``args_for(run_dir)`` uninterrupted; again, killed at ``batches`` from ``hook``; resume the killed run.

    Returns:
        The final checkpoints of the uninterrupted and of the resumed run, and the one the killed run left.
    """
    reference_dir, broken_dir = tmp_path / "reference", tmp_path / "killed"
    _completed(args_for(reference_dir))
    killed = _killed_at(args_for(broken_dir), batches, hook)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    left = _final(broken_dir)
    _completed([*args_for(broken_dir), "--ckpt_path", "last"])
    return _final(reference_dir), left, _final(broken_dir)


@pytest.mark.slow
def test_toy_stage_with_random_steps_killed_mid_epoch_resumes_exactly(tmp_path):
    # 4 batches an epoch, validation every 2 (its loader draws from the global RNG), last.ckpt every 3
    conf = tmp_path / "toy.yaml"
    conf.write_text(yaml.safe_dump(TOY))

    def args_for(run_dir):
        return ["fit", "--config", str(conf), "--run_dir", str(run_dir), "--checkpoint_every_n_batches=3"]

    # killed as the validation after batch 6 starts: last.ckpt is the periodic one after batch 6
    # (mid-epoch 1, validation pending: the resumed run skips it)
    reference, left, resumed = _kill_and_resume(tmp_path, args_for, batches=6, hook="validation_start")
    assert _batches_done(left) == 6 and left["global_step"] == 6
    assert resumed["global_step"] == reference["global_step"] == 10
    assert _assert_same_weights(resumed, reference, "mlp.") == 4


@pytest.mark.slow
def test_teacher_killed_mid_epoch_resumes_to_the_same_points_and_weights(tmp_path):
    def args_for(run_dir):
        return [
            "fit", "--config", str(EXPERIMENTS / "teacher.yaml"), "--config", str(TINY_MESH),
            "--trainer.val_check_interval=1.0", "--trainer.check_val_every_n_epoch=2",
            "--trainer.enable_progress_bar=false", "--checkpoint_every_n_batches=1", "--trainer.max_steps=6",
            "--run_dir", str(run_dir),
        ]

    # killed before batch 4: resumed from the periodic last.ckpt after batch 3, in the middle of epoch 1,
    # whose end prunes on the visibility summed over both of its batches
    reference, left, resumed = _kill_and_resume(tmp_path, args_for, batches=3, hook="train_batch_start")
    assert _batches_done(left) == 3
    assert resumed["global_step"] == reference["global_step"] == 6
    assert int(reference["state_dict"]["teacher.active"].sum()) < 400  # the schedule pruned points
    # the pruning decision is exact (a replayed or skipped batch changes it)
    torch.testing.assert_close(resumed["state_dict"]["teacher.active"], reference["state_dict"]["teacher.active"])
    # the weights agree to ATOL but for a few entries of the geometry MLP's first layer: their gradients
    # are near zero, and Adam turns run-to-run round-off there into steps of either sign of size lr,
    # even between two unbroken runs. A tolerance of one lr (3e-4) would pass a replayed batch too; so
    # instead at most 0.1 % of the entries may differ, where a batch more or less moves most of them.
    assert _differing_fraction(resumed, reference, "teacher.") <= 1e-3
    assert _differing_fraction(left, reference, "teacher.") > 0.5  # 3 batches behind: the criterion sees it


@pytest.mark.slow
def test_distill_killed_mid_epoch_resumes_to_the_same_student(teacher_run, tmp_path):
    def args_for(run_dir):
        return _stage_args(
            "distill", "teacher_ckpt", teacher_run, run_dir, "--checkpoint_every_n_batches=1", "--trainer.max_steps=6"
        )

    # killed before batch 4: last.ckpt is the periodic one after batch 3, in the middle of epoch 1
    reference, left, resumed = _kill_and_resume(tmp_path, args_for, batches=3, hook="train_batch_start")
    assert _batches_done(left) == 3 and left["global_step"] == 3
    assert resumed["global_step"] == reference["global_step"] == 6
    assert _assert_same_weights(resumed, reference, "student.") > 10
    _assert_same_weights(resumed, reference)  # the adapter too
    torch.testing.assert_close(resumed["student"]["state_dict"], reference["student"]["state_dict"], rtol=RTOL, atol=ATOL)


@pytest.mark.slow
def test_gar_killed_during_validation_resumes_to_the_same_weights(distill_run, tmp_path):
    def args_for(run_dir):
        return _stage_args(
            "gar", "student_ckpt", distill_run, run_dir, "--checkpoint_every_n_batches=2", "--trainer.max_steps=18"
        )

    # killed as the validation after batch 4 (end of epoch 1) starts: last.ckpt is the periodic one
    # after batch 4; the resumed run skips that validation and starts epoch 2
    reference, left, resumed = _kill_and_resume(tmp_path, args_for, batches=4, hook="validation_start")
    assert _batches_done(left) == 4 and left["global_step"] == 12  # 3 optimizer steps per batch
    assert resumed["global_step"] == reference["global_step"] == 18
    for prefix in ("generator.", "generator_ema.", "discriminator.", "encoder.", "normal_estimator.", "z_mean"):
        _assert_same_weights(resumed, reference, prefix)
    for opt_resumed, opt_reference in zip(resumed["optimizer_states"], reference["optimizer_states"], strict=True):
        for index, state in opt_reference["state"].items():
            torch.testing.assert_close(opt_resumed["state"][index], state, rtol=RTOL, atol=1e-7)
    assert resumed["collapse_monitor"] == reference["collapse_monitor"]
    assert resumed["collapse_warned"] == reference["collapse_warned"]
