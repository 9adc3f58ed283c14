"""Reenactment: driving codes and head motion (datamodules/driving.py), GARModule.predict_step, the
predict video (RenderLogger) and ``lightning predict --data.init_args.driving_video`` on a real clip.

What is real here: the tiny GAR run (``gar_run``) is one training batch old and its student was
distilled for one step on zero expression codes, so its blendshapes are zero and its generator
is close to its initialisation. The mouth test therefore builds the deformation itself
(expression component 0 moves the points in the tiny head's mouth direction downwards) and then
runs the product's path unchanged: deformation -> multi-scale rasterization -> EMA generator with
the mean z. It checks where the picture changes, not that it looks like a mouth. The CLI test
tracks a real clip (Akiyo from ../shared when present, else the default carphone clip) and
renders the tiny avatar through a real subject's cameras: the frames' content is meaningless
there (the tiny head lives in another canonical convention), their number, rate and poses are not.
"""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from datamodules.avatar import AvatarDataModule, read_dataset
from datamodules.batch import AvatarBatch
from datamodules.driving import mean_pose, nearest_tracked, retarget_head_motion
from tests.conftest import EXPERIMENTS, run_stage

SIZE = 32  # the tiny runs' image size (tiny_mesh.yaml)


def random_poses(rng: np.random.Generator, n: int, depth: float) -> np.ndarray:
    rot = Rotation.from_rotvec(rng.normal(scale=0.2, size=(n, 3))).as_matrix()
    trans = rng.normal(scale=0.05, size=(n, 3)) + np.array([0.0, 0.0, depth])
    return np.concatenate([rot, trans[:, :, None]], axis=2)  # (n, 3, 4)


def test_retargeted_motion_is_the_drivers_motion_about_the_subjects_mean_pose():
    rng = np.random.default_rng(0)
    driver = random_poses(rng, 7, depth=2.0)
    subject_ref = mean_pose(random_poses(rng, 5, depth=3.0))
    out = retarget_head_motion(driver, mean_pose(driver), subject_ref)
    rot = out[:, :, :3]
    np.testing.assert_allclose(rot @ rot.transpose(0, 2, 1), np.broadcast_to(np.eye(3), (7, 3, 3)), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-12)
    # the driver's mean pose lands on the subject's reference ...
    np.testing.assert_allclose(mean_pose(out), subject_ref, atol=1e-12)
    # ... and the motion between any two frames is the driver's: head-local rotation R_i^T R_j,
    # sideways translation unchanged, depth translation scaled by the depth ratio (3 / 2 here)
    depth_ratio = subject_ref[2, 3] / mean_pose(driver)[2, 3]
    for i, j in ((0, 1), (2, 6)):
        np.testing.assert_allclose(rot[i].T @ rot[j], driver[i, :, :3].T @ driver[j, :, :3], atol=1e-12)
        step_out, step_driver = out[j, :, 3] - out[i, :, 3], driver[j, :, 3] - driver[i, :, 3]
        np.testing.assert_allclose(step_out, step_driver * np.array([1.0, 1.0, depth_ratio]), atol=1e-12)
    # equal references: the driver's poses come back unchanged
    np.testing.assert_allclose(retarget_head_motion(driver, subject_ref, subject_ref), driver, atol=1e-12)
    with pytest.raises(ValueError, match="in front of the camera"):
        retarget_head_motion(driver, mean_pose(driver), subject_ref * np.array([1, 1, 1, -1]))


def test_untracked_frames_take_the_nearest_tracked_frame():
    np.testing.assert_array_equal(nearest_tracked(np.array([1, 2, 6]), 9), [0, 0, 1, 1, 1, 2, 2, 2, 2])
    np.testing.assert_array_equal(nearest_tracked(np.array([0, 4]), 5), [0, 0, 0, 1, 1])  # tie -> earlier
    with pytest.raises(ValueError, match="no tracked frame"):
        nearest_tracked(np.array([], dtype=np.int64), 3)


def test_predict_without_a_driving_video_is_a_clear_error(tmp_path):
    dm = AvatarDataModule(data_root=str(tmp_path))
    with pytest.raises(ValueError, match="--data.init_args.driving_video"):
        dm.predict_dataloader()


@pytest.fixture(scope="module")
def gar_module(distill_run, gar_run):
    from lightning_modules.gar import GARModule

    student = distill_run / "checkpoints" / "last.ckpt"
    return GARModule.load_from_checkpoint(gar_run / "checkpoints" / "last.ckpt", student_ckpt=str(student)).eval()


def front_batch(expression: torch.Tensor) -> AvatarBatch:
    """The tiny datamodule's front camera (view 0) for each code of ``expression`` (B, E)."""
    from datamodules.mesh_views import MeshViewsDataModule

    frames = MeshViewsDataModule(mesh="tiny", image_size=SIZE, expression_dim=expression.shape[1]).render_views()
    b = len(expression)
    return AvatarBatch(image=torch.zeros(b, 3, SIZE, SIZE), mask=torch.zeros(b, 1, SIZE, SIZE),
                       world_mat=frames["world_mat"][:1].expand(b, -1, -1), K=frames["K"][:1].expand(b, -1, -1),
                       expression=expression, frame_index=torch.arange(b))


def test_a_mouth_code_changes_the_mouth_region_more_than_the_rest(gar_module):
    from datamodules.tiny import TINY_HEAD_FEATURES
    from models.camera import pixel_radius
    from models.rasterizer import rasterize_points

    module = gar_module
    points = module.student.points  # (N, 3)
    mouth_dir = torch.tensor(TINY_HEAD_FEATURES["mouth"], dtype=points.dtype)
    mouth = torch.nn.functional.normalize(points, dim=1) @ mouth_dir > 0.9  # (N,) points towards the mouth
    assert 5 <= int(mouth.sum()) <= len(points) // 10
    saved = module.student_blendshapes.clone()
    try:
        blendshapes = torch.zeros_like(saved)  # (N, E, 3)
        blendshapes[mouth, 0] = torch.tensor([0.0, 0.1, 0.0])  # component 0 opens the "jaw": +y is down
        module.student_blendshapes.copy_(blendshapes)
        codes = torch.zeros(3, saved.shape[1])
        codes[1, 0] = 1.0  # mouth open
        codes[2, 1] = 1.0  # a component without a blendshape
        batch = front_batch(codes)
        out = module.predict_step(batch, 0)
        render = out["reenact"]
        assert render.shape == (3, 3, SIZE, SIZE) and torch.equal(out["driver"], batch.image)
        torch.testing.assert_close(render, module.render_meanz(batch).clamp(0, 1))  # deterministic
        # the mouth region: pixels the mouth points cover, closed or open
        deformed = module.student.deform(module.student_canonical(), codes[:2])  # (2, N, 3)
        region = torch.zeros(SIZE, SIZE, dtype=torch.bool)
        for i in range(2):
            p = deformed[i : i + 1, mouth]
            r_px = pixel_radius(p, batch.world_mat[:1], batch.K[:1], module.student.radius)
            cover = rasterize_points(p, torch.ones(1, p.shape[1], 1), batch.world_mat[:1], batch.K[:1], SIZE, r_px,
                                     background=0.0)
            region |= cover.alpha[0, 0] > 0
        assert 0.02 < region.float().mean() < 0.6
        # what the generator sees changes inside the region only (exactly)
        inputs_closed = module.raster_inputs(batch, codes[:1].expand(3, -1)).inputs
        inputs_open = module.raster_inputs(batch, codes[1:2].expand(3, -1)).inputs
        change_in = (inputs_open[0] - inputs_closed[0]).abs().amax(1)[0]  # (H, W)
        assert change_in[~region].max() == 0 and change_in[region].max() > 0.01
        # the render: a code without a blendshape changes nothing (up to float round-off: the
        # shading MLP's batched matmul may round a row differently at another batch position); the
        # mouth code changes the mouth region several times more per pixel than the rest
        torch.testing.assert_close(render[2], render[0], rtol=0.0, atol=1e-6)
        change = (render[1] - render[0]).abs().mean(0)  # (H, W)
        assert change[region].mean() > 1e-6
        assert change[region].mean() > 3 * change[~region].mean()
    finally:
        module.student_blendshapes.copy_(saved)


@pytest.fixture(scope="module")
def real_video(shared_data):
    """Akiyo (../shared/data/videos) when present, else the default carphone clip: both real."""
    from datamodules.video import default_video_path

    akiyo = shared_data / "videos" / "akiyo_cif.mp4" if shared_data is not None else None
    return akiyo if akiyo is not None and akiyo.is_file() else default_video_path()


def test_lightning_predict_tracks_a_short_real_clip_and_writes_one_frame_per_driving_frame(
    distill_run, gar_run, real_video, tmp_path
):
    from datamodules.prepare import prepare
    from datamodules.video import read_video
    from lightning_modules.callbacks import write_video

    distill_ckpt = distill_run / "checkpoints" / "last.ckpt"
    frames = read_video(real_video, max_frames=26)
    # the subject: the first 20 frames, E = 4 like the tiny student (16 PCA frames, 4 test frames)
    data_root = tmp_path / "data"
    prepare(real_video, data_root / "subject", expression_dim=4, max_frames=20, progress=False, preview=False)
    # the driver: a 6-frame clip of later frames, frame 2 blanked (no face there)
    clip_frames = [f.copy() for f in frames[20:26]]
    clip_frames[2][:] = 128
    clip = write_video(clip_frames, tmp_path / "driver.mp4", fps=25)

    run_dir = tmp_path / "predict"
    cli = run_stage(
        "predict", "--config", str(EXPERIMENTS / "gar.yaml"),
        "--model.init_args.student_ckpt", str(distill_ckpt),
        "--data.init_args.data_root", str(data_root), "--data.init_args.dataset_name", "subject",
        "--data.init_args.image_size", str(SIZE), "--data.init_args.batch_size", "4",
        "--data.init_args.driving_video", str(clip),
        "--trainer.accelerator", "cpu", "--ckpt_path", str(gar_run / "checkpoints" / "last.ckpt"),
        "--run_dir", str(run_dir),
    )
    dm = cli.datamodule
    assert dm.driving_dir == data_root / "driver_driving" and (dm.driving_dir / "flame_params.json").is_file()
    seq = dm.driving
    assert len(seq) == 6 and seq.tracked.tolist() == [True, True, False, True, True, True]
    assert seq.source.tolist() == [0, 1, 1, 2, 3, 4]  # the blank frame repeats its (earlier) neighbour
    tracked = seq.expressions[seq.tracked]  # (5, 4): offsets from the driver's own mean
    assert np.abs(tracked.mean(0)).max() < 1e-9 and np.abs(tracked).max() > 1e-4
    subject_train = read_dataset(data_root / "subject").world_mats[:14]  # 20 frames: 14 train, 2 val, 4 test
    np.testing.assert_allclose(mean_pose(seq.world_mats[seq.tracked]), mean_pose(subject_train), atol=1e-9)

    video = iio.imread(run_dir / "renders" / "reenact.mp4")
    assert video.shape == (6, SIZE, SIZE, 3)  # one output frame per driving frame
    assert iio.immeta(run_dir / "renders" / "reenact.mp4")["fps"] == pytest.approx(25.0)
    side = iio.imread(run_dir / "renders" / "reenact_side_by_side.mp4")
    assert side.shape == (6, SIZE, 2 * SIZE, 3)
    # the blank frame shows frame 1's avatar (same code, same pose; H.264 may move a grey level)
    assert np.abs(video[2].astype(float) - video[1].astype(float)).mean() < 2.0


def test_chain_renders_are_the_distillation_stages_own_renders_at_the_batches_size(distill_run):
    """``benchmarks.reenact --chain``: the teacher's and student's rasterized frames of the driving
    batches are exactly what the distillation module renders, at the batches' size."""
    from benchmarks.reenact import chain_renders
    from lightning_modules.distill import DistillModule
    from lightning_modules.handoff import datamodule_from_config

    ckpt = distill_run / "checkpoints" / "last.ckpt"
    dm = datamodule_from_config(distill_run / "config.yaml")
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    n, size = len(batch), batch.image.shape[-1]
    frames = chain_renders(ckpt, [batch, batch])
    assert frames["teacher"].shape == frames["student"].shape == (2 * n, size, size, 3)
    assert frames["student"].dtype == np.uint8
    module = DistillModule.load_from_checkpoint(ckpt, map_location="cpu").eval()
    with torch.no_grad():
        expected = module.render_student(batch)[1].image[:, :3]
    expected = (expected.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(frames["student"][:n], expected)
    np.testing.assert_array_equal(frames["student"][n:], expected)
    assert not np.array_equal(frames["teacher"][:n], frames["student"][:n])

    # the same cameras at twice the size (K scaled): the renders follow the batch, not the run
    big = AvatarBatch(
        image=torch.nn.functional.interpolate(batch.image, scale_factor=2.0),
        mask=torch.ones(n, 1, 2 * size, 2 * size), world_mat=batch.world_mat,
        K=batch.K * torch.tensor([[2.0], [2.0], [1.0]]), expression=batch.expression, frame_index=batch.frame_index,
    )
    assert chain_renders(ckpt, [big])["teacher"].shape == (n, 2 * size, 2 * size, 3)
