"""Shared fixtures: tiny generated heads, and the real test data when ../shared/data is present.

Every fixture that points at real data falls back to a generated stand-in written here (not by
the code under test), so each test runs, never skips, where ../shared is absent. Heavy imports
(trimesh, PIL, project modules) happen inside the fixtures.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO_ROOT / "experiments"
TINY_MESH = EXPERIMENTS / "overrides" / "tiny_mesh.yaml"

# Tests never talk to W&B (a test that checks the W&B run sets WANDB_MODE itself).
os.environ["WANDB_MODE"] = "disabled"


def run_stage(*args: str):
    """Run the `lightning` CLI in-process (``args`` as on the command line); returns the AvatarCLI."""
    from lightning_modules.cli import run_cli

    saved = sys.argv
    sys.argv = ["lightning"]
    try:
        return run_cli(list(args))
    finally:
        sys.argv = saved


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory) -> Path:
    """A real teacher run on the tiny head after one step (``--trainer.max_steps=1``): its run folder.

    Fitted with per-frame code refinement (off by default), so the later stages' tests, which load
    ``<run>/checkpoints/last.ckpt``, also carry the code table through distillation and GAR.
    """
    run_dir = tmp_path_factory.mktemp("runs") / "teacher_1step"
    run_stage(
        "fit", "--config", str(EXPERIMENTS / "teacher.yaml"), "--config", str(TINY_MESH),
        "--model.init_args.code_refinement=true", "--trainer.max_steps=1", "--run_dir", str(run_dir),
    )
    return run_dir
SHARED_DATA = REPO_ROOT / ".." / "shared" / "data"
FRAN_RELPATH = Path("meshes") / "fran" / "fran_cut.vtk"
CANONICAL_RELPATH = Path("meshes") / "mediapipe_canonical" / "canonical_face_model.obj"

# Fran's layout: a 45 x 49 grid of points (columns of 49), two triangles per grid cell.
FRAN_COLUMNS, FRAN_ROWS = 45, 49
FRAN_NUM_POINTS, FRAN_NUM_TRIANGLES = 2205, 4224


@pytest.fixture(scope="session")
def shared_data() -> Path | None:
    """``../shared/data`` next to the repository, or None where it is absent."""
    return SHARED_DATA if SHARED_DATA.is_dir() else None


@pytest.fixture(scope="session")
def tiny_head():
    """The default tiny head (:func:`datamodules.tiny.make_tiny_head`, 642 vertices)."""
    from datamodules.tiny import make_tiny_head

    return make_tiny_head(subdivisions=3, seed=0)


@pytest.fixture(scope="session")
def tiny_head_ply(tmp_path_factory) -> Path:
    """The default tiny head saved as a coloured binary PLY in a temporary folder."""
    from datamodules.tiny import write_tiny_head

    return write_tiny_head(tmp_path_factory.mktemp("tiny_head") / "tiny_head.ply", subdivisions=3, seed=0)


def write_fran_standin(folder: Path) -> Path:
    """A Fran-like legacy ASCII VTK file (same grid, counts and connectivity) with a skin texture.

    Points: a 45 x 49 grid bent around a vertical cylinder with a nose bump, written 9 values a
    line (so points straddle lines, as in the real file); POLYGONS 3-index triangles
    (i*49+j, (i+1)*49+j, i*49+j+1) and ((i+1)*49+j, (i+1)*49+j+1, i*49+j+1), like Fran's; an
    empty CELL_DATA; POINT_DATA TEXTURE_COORDINATES in [0.2, 0.8]; a 64x64 RGBA PNG texture with
    the same stem whose colour is skin with darker eyes and a red mouth.
    """
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    i, j = np.meshgrid(np.arange(FRAN_COLUMNS), np.arange(FRAN_ROWS), indexing="ij")  # (45, 49)
    s = i / (FRAN_COLUMNS - 1)  # around the head, 0..1
    t = j / (FRAN_ROWS - 1)  # bottom -> top, 0..1
    theta = (s - 0.5) * 1.6
    bump = 0.02 * np.exp(-((s - 0.5) ** 2 + (t - 0.5) ** 2) / 0.005)
    pts = np.stack([(0.1 + bump) * np.sin(theta), -0.2 + 0.15 * t, -(0.1 + bump) * np.cos(theta)], -1)
    pts = pts.reshape(-1, 3)  # (2205, 3), index i*49 + j
    uv = np.stack([0.2 + 0.6 * s, 0.2 + 0.6 * t], -1).reshape(-1, 2)
    tris = []
    for a in range(FRAN_COLUMNS - 1):
        for b in range(FRAN_ROWS - 1):
            p = a * FRAN_ROWS + b
            tris += [(p, p + FRAN_ROWS, p + 1), (p + FRAN_ROWS, p + FRAN_ROWS + 1, p + 1)]

    def block(values: np.ndarray, per_line: int = 9) -> str:
        flat = [f"{v:.6g}" for v in values.ravel()]
        return "\n".join(" ".join(flat[k : k + per_line]) for k in range(0, len(flat), per_line))

    text = (
        "# vtk DataFile Version 3.0\nvtk output\nASCII\nDATASET POLYDATA\n"
        f"POINTS {len(pts)} float\n{block(pts)}\n\n"
        f"POLYGONS {len(tris)} {4 * len(tris)}\n" + "\n".join(f"3 {a} {b} {c} " for a, b, c in tris) + "\n\n"
        f"CELL_DATA {len(tris)}\nPOINT_DATA {len(pts)}\n"
        f"TEXTURE_COORDINATES textureCoords 2 float\n{block(uv)}\n\n"
    )
    path = folder / "fran_cut.vtk"
    path.write_text(text)

    rows, cols = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    img = np.empty((64, 64, 4), dtype=np.uint8)
    img[...] = (220, 170, 140, 255)  # skin
    img[((rows - 24) ** 2 + (np.abs(cols - 32) - 10) ** 2) < 20] = (60, 40, 30, 255)  # eyes, upper half
    img[(np.abs(rows - 44) < 3) & (np.abs(cols - 32) < 10)] = (190, 40, 40, 255)  # mouth, lower half
    Image.fromarray(img).save(folder / "fran_cut.png")
    return path


def write_canonical_standin(folder: Path) -> Path:
    """An OBJ laid out like MediaPipe's canonical face: 'v' lines, as many 'vt' lines in another
    order, and faces 'f v/vt v/vt v/vt' whose position and texture indices differ (a tiny-head
    icosphere of 162 vertices, centimetre scale)."""
    from datamodules.tiny import make_tiny_head

    head = make_tiny_head(subdivisions=2, seed=0)
    verts = head.vertices.astype(np.float64) * 20.0  # centimetres
    v = len(verts)
    perm = np.random.default_rng(0).permutation(v)  # vt line k belongs to vertex perm[k]
    vt_of_vertex = np.empty(v, dtype=np.int64)
    vt_of_vertex[perm] = np.arange(v)
    uv = 0.5 + 0.5 * verts[:, :2] / np.abs(verts[:, :2]).max()
    lines = ["# canonical stand-in"]
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in verts]
    lines += [f"vt {uv[perm[k], 0]:.6f} {uv[perm[k], 1]:.6f}" for k in range(v)]
    lines += ["f " + " ".join(f"{a + 1}/{vt_of_vertex[a] + 1}" for a in tri) for tri in head.faces]
    path = folder / "canonical_face_model.obj"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def fran_path(shared_data, tmp_path_factory) -> Path:
    """Fran (../shared/data/meshes/fran/fran_cut.vtk) or, where absent, a stand-in with the same
    grid, counts (2,205 points, 4,224 triangles) and connectivity (:func:`write_fran_standin`)."""
    if shared_data is not None and (shared_data / FRAN_RELPATH).is_file():
        return shared_data / FRAN_RELPATH
    return write_fran_standin(tmp_path_factory.mktemp("fran"))


@pytest.fixture(scope="session")
def canonical_obj_path(shared_data, tmp_path_factory) -> Path:
    """MediaPipe's canonical face OBJ (468 vertices, 898 triangles) or, where absent, a stand-in
    with the same v/vt/f layout (:func:`write_canonical_standin`)."""
    if shared_data is not None and (shared_data / CANONICAL_RELPATH).is_file():
        return shared_data / CANONICAL_RELPATH
    return write_canonical_standin(tmp_path_factory.mktemp("canonical"))


@pytest.fixture(scope="session")
def distill_run(teacher_run, tmp_path_factory) -> Path:
    """A real distillation run for one step on the one-step teacher (its run folder)."""
    run_dir = tmp_path_factory.mktemp("runs") / "distill_1step"
    run_stage(
        "fit", "--config", str(EXPERIMENTS / "distill.yaml"), "--config", str(TINY_MESH),
        "--model.init_args.teacher_ckpt", str(teacher_run / "checkpoints" / "last.ckpt"),
        "--model.init_args.warmup_steps=5",  # the warm-up itself: test_distill_stage.py
        "--trainer.max_steps=1", "--run_dir", str(run_dir),
    )
    return run_dir


@pytest.fixture(scope="session")
def gar_run(distill_run, tmp_path_factory) -> Path:
    """A real GAR run for one training batch on the one-step student (its run folder)."""
    run_dir = tmp_path_factory.mktemp("runs") / "gar_1batch"
    run_stage(
        "fit", "--config", str(EXPERIMENTS / "gar.yaml"), "--config", str(TINY_MESH),
        "--model.init_args.student_ckpt", str(distill_run / "checkpoints" / "last.ckpt"),
        "--trainer.max_steps=3", "--run_dir", str(run_dir),
    )
    return run_dir
