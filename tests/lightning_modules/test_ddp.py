"""Every stage under DDP: 2 CPU processes (gloo) through the real CLI in a subprocess, on the tiny head.

Lightning's subprocess launcher re-runs the command for rank 1; torchrun starts both ranks itself.
Either way both ranks must end in the one run folder rank 0 resolved, the teacher's point schedule
must stay identical across ranks, the GAR's G/D/N phases must pass DDP's unused-parameter check, and
counting, config, metrics and renders must be written by rank 0 only. :class:`RankProbe` (added to
the runs with ``--trainer.callbacks+=``) records what each rank saw into ``$AVATAR_TEST_PROBE_DIR``.
Slow (about a minute per run on 2 cores); run with ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from tests.conftest import EXPERIMENTS, REPO_ROOT, TINY_MESH

PROBE_ENV = "AVATAR_TEST_PROBE_DIR"
PROBE = "tests.lightning_modules.test_ddp.RankProbe"
DDP_FLAGS = ("--trainer.strategy=ddp", "--trainer.accelerator=cpu", "--trainer.devices=2")

pytestmark = pytest.mark.slow


class RankProbe(pl.Callback):
    """Test-only callback: each rank saves ``rank<r>.pt`` into ``$AVATAR_TEST_PROBE_DIR`` at teardown.

    Holds the rank's run folder (RunFolder's, and the trainer's default_root_dir the CLI set before
    the ranks met), its module state_dict, its config text, the FLOP counts it made, how many images
    and metrics.json files it wrote, the training frames it saw and (teacher) its own visibility
    before the first pruning.
    """

    def __init__(self) -> None:
        self.writes = {"images": 0, "metrics_json": 0}
        self.visibility: torch.Tensor | None = None
        self.frames: list[tuple[int, int]] = []  # (epoch, frame index)

    def setup(self, trainer, pl_module, stage) -> None:
        import imageio.v3 as iio

        import lightning_modules.run_folder as run_folder

        def counted(fn, key):
            def wrapper(*args, **kwargs):
                self.writes[key] += 1
                return fn(*args, **kwargs)

            return wrapper

        iio.imwrite = counted(iio.imwrite, "images")
        run_folder.write_metrics_json = counted(run_folder.write_metrics_json, "metrics_json")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.frames.extend((trainer.current_epoch, int(i)) for i in batch.frame_index)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # callbacks run before the module's hook, i.e. before the visibility is pruned on and reset
        if self.visibility is None and hasattr(pl_module, "visibility"):
            self.visibility = pl_module.visibility.detach().clone()

    def teardown(self, trainer, pl_module, stage) -> None:
        from lightning_modules.flops import FlopCounter
        from lightning_modules.run_folder import get_run_folder

        folder = get_run_folder(trainer)
        flops = [dict(cb.results) for cb in trainer.callbacks if isinstance(cb, FlopCounter)]
        out = Path(os.environ[PROBE_ENV])
        out.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "rank": trainer.global_rank,
                "world_size": trainer.world_size,
                "run_dir": str(folder.run_dir.resolve()),
                "default_root_dir": str(Path(trainer.default_root_dir).resolve()),
                "config_text": folder.config_text,
                "state": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
                "flops": flops,
                "writes": dict(self.writes),
                "visibility": self.visibility,
                "frames": list(self.frames),
            },
            out / f"rank{trainer.global_rank}.pt",
        )


def _run(cwd: Path, probe: Path, launcher: list[str], stage: str, *extra: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
        PROBE_ENV: str(probe),
    }
    cmd = [
        *launcher, "fit", "--config", str(EXPERIMENTS / f"{stage}.yaml"), "--config", str(TINY_MESH),
        *DDP_FLAGS, f"--trainer.callbacks+={PROBE}", "--trainer.enable_progress_bar=false", *extra,
    ]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


LIGHTNING = [sys.executable, "-m", "lightning_modules.cli"]


def _probes(probe: Path) -> tuple[dict, dict]:
    ranks = [torch.load(probe / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [p["rank"] for p in ranks] == [0, 1] and all(p["world_size"] == 2 for p in ranks)
    return ranks[0], ranks[1]


def _single_run_folder(cwd: Path, stage: str) -> Path:
    """The one run folder under runs/<stage>/ (besides `latest`, which must point at it)."""
    stage_dir = cwd / "runs" / stage
    runs = sorted(p.name for p in stage_dir.iterdir() if p.name != "latest")
    assert len(runs) == 1, f"both ranks must share one run folder, found {runs}"
    run = stage_dir / runs[0]
    assert (stage_dir / "latest").resolve() == run.resolve()
    return run


def _check_rank_zero_only_outputs(run: Path, r0: dict, r1: dict, renders: bool = True) -> None:
    # both ranks ended in the one folder rank 0 resolved; the launcher's child took it from rank 0 up front
    for probe in (r0, r1):
        assert probe["run_dir"] == str(run.resolve())
        assert probe["default_root_dir"] == str(run.resolve())
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in run.rglob("config.yaml")) == ["config.yaml"]
    assert sorted(p.name for p in run.rglob("metrics.json")) == ["metrics.json"]
    assert r0["config_text"] is not None and r1["config_text"] is None
    assert r0["writes"]["metrics_json"] >= 1 and r1["writes"]["metrics_json"] == 0
    if renders:
        pngs = sorted((run / "renders").glob("*.png"))
        assert len(pngs) >= 1 and r0["writes"]["images"] == len(pngs) and r1["writes"]["images"] == 0


def _assert_sharded(r0: dict, r1: dict) -> None:
    """In each epoch each rank trained on its own share of the frames (DistributedSampler semantics)."""
    assert r0["frames"] and r1["frames"]
    assert not set(r0["frames"]) & set(r1["frames"]), f"ranks trained on the same frames: {r0['frames']} {r1['frames']}"


def _assert_same_state(r0: dict, r1: dict) -> None:
    assert r0["state"].keys() == r1["state"].keys()
    differ = [k for k in r0["state"] if not torch.equal(r0["state"][k], r1["state"][k])]
    assert not differ, f"ranks disagree on {differ[:10]}"


@pytest.fixture(scope="module")
def ddp_cwd(tmp_path_factory) -> Path:
    """A stand-in checkout folder: each stage writes runs/<stage>/ and finds its upstream's `latest` here."""
    return tmp_path_factory.mktemp("ddp")


@pytest.fixture(scope="module")
def ddp_teacher(ddp_cwd) -> tuple[Path, dict, dict]:
    probe = ddp_cwd / "probe_teacher"
    # grow and prune at every epoch end (an epoch is one batch per rank here): 2 schedule steps
    _run(ddp_cwd, probe, LIGHTNING, "teacher", "--model.init_args.grow_every_epochs=1")
    return _single_run_folder(ddp_cwd, "teacher"), *_probes(probe)


@pytest.fixture(scope="module")
def ddp_distill(ddp_teacher, ddp_cwd) -> tuple[Path, dict, dict]:
    probe = ddp_cwd / "probe_distill"
    _run(ddp_cwd, probe, LIGHTNING, "distill")
    return _single_run_folder(ddp_cwd, "distill"), *_probes(probe)


def test_teacher_ddp_point_schedule_identical_across_ranks(ddp_teacher):
    run, r0, r1 = ddp_teacher
    _check_rank_zero_only_outputs(run, r0, r1)
    _assert_sharded(r0, r1)
    # each rank saw other frames, yet both hold the visibility of all of them (all-reduced at every
    # step): what rank 0's checkpoint saves and every rank loads on resume, pruned on once
    assert torch.equal(r0["visibility"], r1["visibility"]) and r0["visibility"].sum() > 0
    # pruning (on that visibility) and growth (epoch-seeded noise) agree exactly
    _assert_same_state(r0, r1)
    active = r0["state"]["teacher.active"]
    n = int(active.sum())
    assert n != 400 and n >= 100, f"the schedule should have changed the 400 initial points, got {n}"
    assert torch.equal(active, r1["state"]["teacher.active"])
    assert json.loads((run / "metrics.json").read_text())["num_points"] == n


def test_distill_ddp_counts_on_rank_zero_only(ddp_distill):
    run, r0, r1 = ddp_distill
    _check_rank_zero_only_outputs(run, r0, r1)
    _assert_same_state(r0, r1)
    # the FlopCounter counted on rank 0 only, and its counts reached metrics.json
    assert r0["flops"] and r0["flops"][0].get("flops/student", 0) > 0
    assert r1["flops"] == [{}]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["flops/student"] == r0["flops"][0]["flops/student"] and metrics["params_ratio"] > 0


def test_distill_ddp_with_feature_and_graph_kd_off(ddp_teacher, ddp_cwd):
    """Without L_feat and L_graph no loss reaches the adapter: it is frozen, and plain DDP (no
    unused-parameter search) trains the student on both ranks alike."""
    probe = ddp_cwd / "probe_distill_nokd"
    _run(ddp_cwd, probe, LIGHTNING, "distill", "--model.init_args.loss_weights.feat=0",
         "--model.init_args.loss_weights.graph=0", "--trainer.max_steps=2", "--run_dir", str(ddp_cwd / "nokd"))
    r0, r1 = _probes(probe)
    _assert_same_state(r0, r1)
    config = (ddp_cwd / "nokd" / "config.yaml").read_text()
    assert "feat: 0" in config and "graph: 0" in config


def test_gar_ddp_phases_pass_the_unused_parameter_check(ddp_distill, ddp_cwd):
    probe = ddp_cwd / "probe_gar"
    # plain "ddp": the CLI turns on DDP's unused-parameter search for the GAR's N/G/D phases
    _run(ddp_cwd, probe, LIGHTNING, "gar", "--trainer.max_steps=6")  # 2 batches x 3 optimizer steps
    run = _single_run_folder(ddp_cwd, "gar")
    r0, r1 = _probes(probe)
    _check_rank_zero_only_outputs(run, r0, r1)
    # the gradients of every phase were all-reduced: G, E, D, N and the EMA copy agree on both ranks,
    # and so does z_mean (averaged over both ranks' frames)
    _assert_same_state(r0, r1)
    assert any(k.startswith("discriminator.") for k in r0["state"])
    assert not torch.equal(r0["state"]["z_mean"], torch.zeros_like(r0["state"]["z_mean"]))
    assert json.loads((run / "metrics.json").read_text())["gar/tracked/val/full/psnr"] > 0


def test_torchrun_ranks_share_rank_zeros_run_folder(tmp_path):
    """torchrun starts both ranks at once: rank 1 creates no folder of its own and adopts rank 0's."""
    probe = tmp_path / "probe"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                "lightning_modules.cli"]
    _run(tmp_path, probe, torchrun, "teacher", "--trainer.max_steps=1")
    run = _single_run_folder(tmp_path, "teacher")
    r0, r1 = _probes(probe)
    assert r0["run_dir"] == r1["run_dir"] == str(run.resolve())
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
    assert r1["config_text"] is None and r1["writes"]["metrics_json"] == 0
    _assert_same_state(r0, r1)
