"""AvatarDataModule and the dataset reader (datamodules/avatar.py; issue 3).

The carphone dataset is prepared once per module through ``prepare_data()``. The IMavatar /
PointAvatar compatibility is checked on a tiny folder written here in their layout, against an
independent re-implementation of PointAvatar's camera conversion and PyTorch3D's NDC projection.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.avatar import (
    AvatarDataModule,
    crop_and_resize,
    crop_intrinsics,
    driving_expression_codes,
    imavatar_camera_to_opencv,
    read_dataset,
    square_crop_box,
)
from datamodules.batch import AvatarBatch
from models.camera import project, world_to_camera


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """A data root holding the default clip prepared with the default options: shared with
    tests/datamodules/test_prepare.py through pytest's session temp folder (prepared once)."""
    root = tmp_path_factory.getbasetemp() / "shared-prepared"
    if not (root / "carphone" / "flame_params.json").is_file():
        from datamodules.prepare import prepare

        prepare(None, root / "carphone", progress=False)
    return root


@pytest.fixture(scope="module")
def carphone_dm(data_root) -> AvatarDataModule:
    dm = AvatarDataModule(data_root=str(data_root), batch_size=8)
    dm.prepare_data()  # present: nothing to do
    dm.setup("fit")
    return dm


# ------------------------------------------------------------------------------------------------
# carphone
# ------------------------------------------------------------------------------------------------


def test_split_batches_and_intrinsics(carphone_dm):
    dm = carphone_dm
    assert dm.dataset_dir.name == "carphone"
    assert dm.train_frame_indices == list(range(84))
    assert dm.val_frame_indices == list(range(84, 96)) and dm.test_frame_indices == list(range(96, 120))
    assert dm.split_sizes() == {"train": 84, "val": 12, "test": 24}
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, AvatarBatch) and len(batch) == 8
    assert batch.image.shape == (8, 3, 128, 128) and batch.image.dtype == torch.float32
    assert 0.0 <= batch.image.min() and batch.image.max() <= 1.0
    assert batch.mask.shape == (8, 1, 128, 128) and set(batch.mask.unique().tolist()) <= {0.0, 1.0}
    assert batch.world_mat.shape == (8, 3, 4) and batch.expression.shape == (8, 16)
    assert batch.frame_index.dtype == torch.int64 and set(batch.frame_index.tolist()) <= set(range(84))
    record = dm.record
    rows = batch.frame_index.numpy()  # frame number = row (nothing dropped)
    assert torch.equal(batch.world_mat, torch.from_numpy(record.world_mats[rows]).float())
    # K: f = 88 / tan(10 deg) px at 176x144, principal point (88, 72), then crop (x0, y0, side) -> 128
    x0, y0, side = dm.crop_box
    f = 88.0 / math.tan(math.radians(10.0))
    s = 128 / side
    expected = torch.tensor([[f * s, 0, (88 - x0) * s], [0, f * s, (72 - y0) * s], [0, 0, 1]], dtype=torch.float32)
    assert torch.allclose(batch.K, expected.expand(8, 3, 3), atol=1e-4)
    test_batch = next(iter(dm.test_dataloader()))
    assert test_batch.frame_index.tolist() == list(range(96, 104))  # in order, not shuffled


def test_crop_box_holds_every_head_mask(carphone_dm):
    dm = carphone_dm
    x0, y0, side = dm.crop_box
    hx0, hy0, hx1, hy1 = dm.record.head_box
    assert x0 <= hx0 and y0 <= hy0 and x0 + side >= hx1 and y0 + side >= hy1
    assert side == math.ceil(max(hx1 - hx0, hy1 - hy0) * 1.1)
    assert 0 <= x0 and 0 <= y0 and x0 + side <= 176 and y0 + side <= 144  # slid inside the frame


def test_served_pixels_are_the_cropped_frame(carphone_dm, data_root):
    """At image_size = the crop side there is no resampling: the served image is the PNG's box."""
    x0, y0, side = carphone_dm.crop_box
    dm = AvatarDataModule(data_root=str(data_root), image_size=side, batch_size=4, shuffle=False)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    png = np.array(Image.open(dm.dataset_dir / "image" / "2.png").convert("RGB"))
    mask = np.asarray(Image.open(dm.dataset_dir / "mask" / "2.png")) > 127
    assert torch.equal((batch.image[2] * 255).round().to(torch.uint8),
                       torch.from_numpy(png[y0:y0 + side, x0:x0 + side]).permute(2, 0, 1))
    assert torch.equal(batch.mask[2, 0].bool(), torch.from_numpy(mask[y0:y0 + side, x0:x0 + side]))


def test_crop_resize_keeps_a_landmark_on_its_image_feature(carphone_dm):
    """Project the canonical nose tip of frame 0 through the full-frame camera, draw a Gaussian
    spot there, crop/resize the picture: the spot's centroid is where the cropped K projects it."""
    dm = carphone_dm
    record = dm.record
    canonical = np.asarray(record.basis["canonical"])
    point = torch.from_numpy(canonical[[1]])  # (1, 3) nose tip, canonical units
    wm = torch.from_numpy(record.world_mats[[0]])
    uv_full = project(world_to_camera(point, wm), torch.from_numpy(record.K)[None])[0, 0].numpy()
    assert np.linalg.norm(uv_full - np.asarray(record.landmarks[0][1, :2])) < 1.5  # on the detected nose tip
    gy, gx = np.mgrid[0:144, 0:176] + 0.5  # pixel centres
    spot = np.exp(-((gx - uv_full[0]) ** 2 + (gy - uv_full[1]) ** 2) / (2 * 3.0**2))
    for size in (64, 128, 256):  # down- and upsampling
        out = crop_and_resize(torch.from_numpy(spot)[None], dm.crop_box, size)[0].numpy()
        cy, cx = np.mgrid[0:size, 0:size] + 0.5
        centroid = np.array([(out * cx).sum(), (out * cy).sum()]) / out.sum()
        K = torch.from_numpy(crop_intrinsics(record.K, dm.crop_box, size))[None]
        uv = project(world_to_camera(point, wm), K)[0, 0].numpy()
        assert np.abs(centroid - uv).max() < 0.02 * size / 64, (size, centroid, uv)


def test_training_frames_are_the_training_split(carphone_dm):
    dm = carphone_dm
    frames = dm.training_frames()
    assert frames["image"].shape == (84, 3, 128, 128) and frames["mask"].shape == (84, 1, 128, 128)
    assert np.abs(frames["image"][5].numpy() - dm.train_set[5]["image"].numpy()).max() == 0
    torch.testing.assert_close(frames["world_mat"], dm.train_set.world_mats)
    torch.testing.assert_close(frames["expression"][:, 0], torch.from_numpy(dm.record.expressions[:84, 0]).float())
    # the codes alone (the teacher's statistics and code table), the same frames in the same order
    codes = dm.training_codes()
    assert torch.equal(codes["frame_index"], frames["frame_index"]) and codes["frame_index"].shape == (84,)
    assert torch.equal(codes["expression"], frames["expression"]) and torch.equal(codes["world_mat"], frames["world_mat"])


def test_split_that_overlaps_the_pca_fit_frames_is_an_error(carphone_dm, data_root):
    with pytest.raises(ValueError, match="expression PCA was fitted on them"):
        AvatarDataModule(data_root=str(data_root), test_fraction=0.3).setup()
    with pytest.raises(ValueError, match="expression PCA was fitted on them .* val_mode=block"):
        AvatarDataModule(data_root=str(data_root), val_mode="interleaved").setup()
    with pytest.raises(ValueError, match="expression PCA was fitted on them"):
        AvatarDataModule(data_root=str(data_root), val_fraction=0.2).setup()
    dm = AvatarDataModule(data_root=str(data_root), test_fraction=0.1, val_every=3)  # held-out subset: fine
    dm.setup()
    assert dm.test_frame_indices == list(range(108, 120)) and dm.val_frame_indices == list(range(96, 108, 3))
    with pytest.warns(UserWarning, match="val_fraction=0: no validation frames"):
        dm = AvatarDataModule(data_root=str(data_root), val_fraction=0.0)  # an older run's config still loads
    dm.setup()
    assert dm.val_frame_indices == [] and dm.test_frame_indices == list(range(96, 120))


def test_existing_dataset_decides_expression_dim(carphone_dm, data_root):
    dm = AvatarDataModule(data_root=str(data_root), expression_dim=8)
    with pytest.warns(UserWarning, match="has expression dimension 16"):
        assert dm.expression_dim == 16
    assert AvatarDataModule(data_root=str(data_root)).expression_dim == 16  # not given: no warning


def test_prepare_data_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "carphone").mkdir()
    (tmp_path / "carphone" / "notes.txt").write_text("x")
    dm = AvatarDataModule(data_root=str(tmp_path))
    with pytest.raises(FileExistsError, match="holds no flame_params.json"):
        dm.prepare_data()
    with pytest.raises(FileNotFoundError, match="prepare the dataset first"):
        dm.setup()


def test_second_real_video(tmp_path, shared_data, data_root):
    """Akiyo (352x288, first 30 frames) when ../shared is present, else the default clip."""
    akiyo = shared_data / "videos" / "akiyo_cif.mp4" if shared_data is not None else None
    video = str(akiyo) if akiyo is not None and akiyo.is_file() else None
    dm = AvatarDataModule(data_root=str(tmp_path), video=video, max_frames=30, image_size=96, batch_size=4)
    assert dm.dataset_dir.name == ("akiyo_cif_first30" if video else "carphone_first30")
    assert dm.expression_dim == 16 and dm.image_size == 96  # known before anything is prepared
    assert not dm.dataset_dir.exists()
    dm.prepare_data()
    dm.setup()
    meta = dm.record.meta
    assert meta["image_size"] == ([288, 352] if video else [144, 176])
    assert meta["kept_frames"] == 30 and meta["dropped_frames"] == []
    assert len(dm.train_set) == 21 and dm.val_frame_indices == [21, 22, 23] and dm.test_frame_indices == list(range(24, 30))
    batch = next(iter(dm.test_dataloader()))
    assert batch.image.shape == (4, 3, 96, 96) and batch.expression.shape == (4, 16)
    # the head is in the crop: the mask covers a good part of it, not all of it
    assert 0.15 < batch.mask.mean() < 0.9
    # reenactment: this video drives the carphone avatar, coded as offsets from its own mean
    codes, numbers = driving_expression_codes(data_root / "carphone", dm.dataset_dir)
    assert codes.shape == (30, 16) and numbers.tolist() == list(range(30))
    assert np.abs(codes.mean(0)).max() < 1e-12


def test_a_video_driving_its_own_avatar_gets_its_own_codes(carphone_dm):
    """Driving carphone by itself: its own cameras and canonical face are refitted over all 120
    frames (not only the 84 training ones the stored codes' canonical face was fitted on), so the
    codes match the stored ones, centred, closely (within 0.3 standard deviations)."""
    codes, _ = driving_expression_codes(carphone_dm.dataset_dir, carphone_dm.dataset_dir)
    stored = carphone_dm.record.expressions - carphone_dm.record.expressions.mean(0)
    for k in range(4):
        assert np.corrcoef(codes[:, k], stored[:, k])[0, 1] > 0.99
        assert np.abs(codes[:, k] - stored[:, k]).max() < 0.3 * stored[:, k].std()


# ------------------------------------------------------------------------------------------------
# IMavatar / PointAvatar folders
# ------------------------------------------------------------------------------------------------


def pointavatar_pixel(point: np.ndarray, world_mat: np.ndarray, intrinsics, size: int) -> np.ndarray:
    """Pixel (pixel centres at +0.5) of a world point in PointAvatar's pipeline, S x S image.

    PointAvatar: NDC intrinsics (2 fx, 2 fy, -(2 c - 1)); fx < 0 flips K's first column and
    world_mat's first row; the rotation's third column and the z translation are negated; then
    PyTorch3D: view = X R + T (row vector), homogeneous NDC = K [view, 1], divided by its w; the
    pixel centre of column i is at x_ndc = 1 - (2 i + 1) / S (+x left, +y up).
    """
    K = np.zeros((4, 4))
    K[0, 0], K[1, 1] = intrinsics[0] * 2, intrinsics[1] * 2
    K[0, 2], K[1, 2] = -(intrinsics[2] * 2 - 1), -(intrinsics[3] * 2 - 1)
    K[3, 2] = K[2, 3] = 1.0
    M = np.array(world_mat, dtype=np.float64).copy()
    if K[0, 0] < 0:
        K[:, 0] *= -1
        M[0, :] *= -1
    M[:3, 2] *= -1
    M[2, 3] *= -1
    view = point @ M[:3, :3] + M[:3, 3]
    h = K @ np.append(view, 1.0)
    assert h[3] > 0, "the test point must be in front of the camera"
    ndc = h[:3] / h[3]
    return np.array([(1 - ndc[0]) * size / 2, (1 - ndc[1]) * size / 2])


def random_rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q * np.linalg.det(q)  # proper


def imavatar_world_mat(rng, fx_negative: bool) -> np.ndarray:
    """A 4x4 IMavatar world_mat whose camera sees the origin about 4 units ahead."""
    m = np.eye(4)
    m[:3, :3] = random_rotation(rng)
    m[:3, 3] = [0.05, -0.1, 4.0]  # PyTorch3D view translation wanted, then undo PointAvatar's steps
    m[2, 3] *= -1
    m[:3, 2] *= -1
    if fx_negative:
        m[0, :] *= -1
    return m


@pytest.mark.parametrize("intrinsics", [[4.2, 4.3, 0.52, 0.47], [-4.2, 4.3, 0.5, 0.5], [3.0, -3.1, 0.45, 0.55]])
def test_imavatar_camera_matches_pointavatar_projection(intrinsics):
    rng = np.random.default_rng(7)
    size = 512
    for _ in range(5):
        wm = imavatar_world_mat(rng, intrinsics[0] < 0)
        cv_wm, K = imavatar_camera_to_opencv(wm, intrinsics, size, size)
        points = rng.uniform(-0.4, 0.4, size=(20, 3))
        ours = project(world_to_camera(torch.from_numpy(points), torch.from_numpy(cv_wm)[None]),
                       torch.from_numpy(K)[None])[0].numpy()
        ref = np.stack([pointavatar_pixel(p, wm, intrinsics, size) for p in points])
        assert np.abs(ours - ref).max() < 1e-9
        assert K[0, 0] > 0 and K[1, 1] > 0


def write_imavatar_folder(root: Path, n: int = 5, size: int = 32) -> dict:
    """A tiny subject folder in IMavatar's layout: image/<k>.png, mask/<k>.png (grey levels),
    flame_params.json without camera_convention (expression 50, pose 15, shape_params 100)."""
    rng = np.random.default_rng(3)
    (root / "image").mkdir(parents=True)
    (root / "mask").mkdir()
    intrinsics = [-4.2, 4.2, 0.5, 0.5]
    wm = imavatar_world_mat(rng, True)
    frames = []
    for k in range(1, n + 1):  # IMavatar numbers frames from 1
        img = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / "image" / f"{k}.png")
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[8:24, 10:22] = 255
        mask[8, 10] = 100  # a grey level under one half: background
        Image.fromarray(mask).save(root / "mask" / f"{k}.png")
        pose = np.zeros(15)
        pose[3:] = rng.normal(scale=0.1, size=12)
        if k == 2:
            pose[:3] = [0.0, math.pi / 2, 0.0]  # the head turned 90 degrees about y
        frames.append({"file_path": f"./image/{k}", "world_mat": wm.tolist(),
                       "expression": rng.normal(size=50).tolist(), "pose": pose.tolist(),
                       "flame_keypoints": rng.normal(size=(68, 2)).tolist()})
    data = {"frames": frames, "intrinsics": intrinsics, "shape_params": np.zeros(100).tolist()}
    (root / "flame_params.json").write_text(json.dumps(data))
    return data


def test_imavatar_folder_is_read_and_served(tmp_path):
    data = write_imavatar_folder(tmp_path / "subject")
    record = read_dataset(tmp_path / "subject")
    assert record.convention == "imavatar" and record.frame_numbers.tolist() == [1, 2, 3, 4, 5]
    assert record.expression_dim == 62 and (record.width, record.height) == (32, 32)
    assert np.allclose(record.expressions[0], data["frames"][0]["expression"] + data["frames"][0]["pose"][3:])
    point = np.array([[0.1, -0.2, 0.15]])
    wm, intr = np.asarray(data["frames"][0]["world_mat"]), data["intrinsics"]
    ours = project(world_to_camera(torch.from_numpy(point), torch.from_numpy(record.world_mats[[0]])),
                   torch.from_numpy(record.K)[None])[0, 0].numpy()
    assert np.abs(ours - pointavatar_pixel(point[0], wm, intr, 32)).max() < 1e-9
    # frame 2: FLAME's global rotation (90 deg about y) folded in about the origin
    rot_y = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
    ours2 = project(world_to_camera(torch.from_numpy(point), torch.from_numpy(record.world_mats[[1]])),
                    torch.from_numpy(record.K)[None])[0, 0].numpy()
    assert np.abs(ours2 - pointavatar_pixel(rot_y @ point[0], wm, intr, 32)).max() < 1e-9

    dm = AvatarDataModule(data_root=str(tmp_path), dataset_name="subject", image_size=16, batch_size=2,
                          crop_margin=0.0, shuffle=False)
    assert dm.expression_dim == 62
    dm.prepare_data()  # present: nothing to do
    dm.setup()
    # crop: the mask box [10, 8, 22, 24) -> side 16 centred at (16, 16) -> x0 = 8, y0 = 8
    assert dm.crop_box == (8, 8, 16)
    assert dm.train_frame_indices == [1, 2, 3] and dm.val_frame_indices == [4] and dm.test_frame_indices == [5]
    batch = next(iter(dm.train_dataloader()))
    assert batch.expression.shape == (2, 62) and batch.frame_index.tolist() == [1, 2]
    img = np.array(Image.open(tmp_path / "subject" / "image" / "1.png"))
    assert torch.equal((batch.image[0] * 255).round().to(torch.uint8), torch.from_numpy(img[8:24, 8:24]).permute(2, 0, 1))
    expected_mask = np.zeros((16, 16), dtype=bool)
    expected_mask[0:16, 2:14] = True
    expected_mask[0, 2] = False  # grey 100 / 255 < 0.5
    assert torch.equal(batch.mask[0, 0].bool(), torch.from_numpy(expected_mask))
    assert torch.allclose(batch.K[0], torch.from_numpy(crop_intrinsics(record.K, (8, 8, 16), 16)).float())


def test_square_crop_box_rules():
    assert square_crop_box([10, 20, 50, 40], 100, 100, margin=0.0) == (10, 10, 40)
    assert square_crop_box([10, 20, 50, 40], 100, 100, margin=0.5) == (0, 0, 60)  # slid inside
    assert square_crop_box([0, 0, 30, 20], 30, 20, margin=0.0) == (0, -5, 30)  # too tall: centred, padded
    out = crop_and_resize(torch.ones(1, 20, 30), (0, -5, 30), 30)
    assert out[0, :5].sum() == 0 and out[0, 5:25].min() == 1 and out[0, 25:].sum() == 0


# ------------------------------------------------------------------------------------------------
# every shipped config: train, val and test disjoint
# ------------------------------------------------------------------------------------------------


def _shipped_data_configs() -> list[tuple[str, dict]]:
    """(name, data section) of every experiment config as it is run: alone and with its overrides."""
    import yaml

    from tests.conftest import EXPERIMENTS

    def data(path):
        return (yaml.safe_load(path.read_text()) or {}).get("data") or {}

    def merged(*paths):
        out: dict = {}
        for path in paths:
            section = data(path)
            if "class_path" in section and section["class_path"] != out.get("class_path"):
                out = {"class_path": section["class_path"], "init_args": {}}
            out.setdefault("init_args", {}).update(section.get("init_args") or {})
        return out

    configs = []
    for stage in ("teacher", "distill", "gar"):
        base = EXPERIMENTS / f"{stage}.yaml"
        configs.append((stage, merged(base)))
        configs.append((f"{stage}+cpu_demo", merged(base, EXPERIMENTS / "overrides" / f"cpu_demo_{stage}.yaml")))
        configs.append((f"{stage}+tiny_mesh", merged(base, EXPERIMENTS / "overrides" / "tiny_mesh.yaml")))
    return configs


@pytest.mark.parametrize("name,data", _shipped_data_configs(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_shipped_config_keeps_train_val_and_test_disjoint(name, data, data_root):
    import importlib

    module_name, _, class_name = data["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    args = dict(data["init_args"])
    if cls is AvatarDataModule:
        args.update(data_root=str(data_root), image_size=32)  # the shared prepared carphone, small
        dm = cls(**args)
        dm.setup()
        train, val, test = (set(getattr(dm, f"{s}_frame_indices")) for s in ("train", "val", "test"))
        numbers = dm.record.frame_numbers.tolist()
        assert sorted(test) == numbers[-len(test):]  # test: the last frames of the clip
        assert not set(dm.record.pca_fit_frames) & (val | test)  # the expression PCA never saw them
    else:
        dm = cls(**args)
        train, val, test = (set(dm.split_indices(s)) for s in ("train", "val", "test"))
    assert train and val and test, name
    assert not (train & val) and not (train & test) and not (val & test), name
