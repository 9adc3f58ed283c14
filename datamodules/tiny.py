"""Tiny generated heads for tests and smoke runs (no files needed; issue "Foundation").

The tiny head is an icosphere pushed onto an ellipsoid with a nose bump, coloured per vertex:
skin, two dark eye spots, a red mouth band and hair on the top and back. It lives in the
canonical avatar space (inside the ball of radius 0.5, as PointAvatar's canonical space) with
these axes, chosen so that the reference camera ``world_mat = [I | (0, 0, d)]`` (OpenCV: x right,
y down, z forward; see models/camera.py) sees it upright and frontal:

- the face looks towards -z, i.e. towards a camera at (0, 0, -d) looking along +z;
- the top of the head is at -y (image up for that camera), the chin at +y;
- +x is image right for that camera (the subject's left).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datamodules.meshes import Mesh, sample_surface, vertex_normals

__all__ = ["make_tiny_head", "make_tiny_point_cloud", "write_tiny_head", "TINY_HEAD_FEATURES"]

# Directions on the unit sphere (before the ellipsoid stretch) of the facial features.
TINY_HEAD_FEATURES = {
    "nose": np.array([0.0, 0.08, -1.0]) / np.linalg.norm([0.0, 0.08, -1.0]),
    "left_eye": np.array([0.33, -0.15, -0.93]) / np.linalg.norm([0.33, -0.15, -0.93]),
    "right_eye": np.array([-0.33, -0.15, -0.93]) / np.linalg.norm([-0.33, -0.15, -0.93]),
    "mouth": np.array([0.0, 0.42, -0.91]) / np.linalg.norm([0.0, 0.42, -0.91]),
    "top": np.array([0.0, -1.0, 0.0]),
}
_RADII = np.array([0.36, 0.46, 0.40])  # ellipsoid half-axes (x, y, z), canonical units
_NOSE_GAIN, _NOSE_SIGMA = 0.22, 0.16  # relative radial bump and its angular width (radians, approx.)
_SKIN = np.array([0.87, 0.66, 0.54])
_EYE = np.array([0.08, 0.06, 0.05])
_LIPS = np.array([0.78, 0.13, 0.14])
_HAIR = np.array([0.23, 0.14, 0.07])


def _icosphere(subdivisions: int) -> tuple[np.ndarray, np.ndarray]:
    import trimesh  # lazy: ~1 s import

    sphere = trimesh.creation.icosphere(subdivisions=subdivisions, radius=1.0)
    return np.asarray(sphere.vertices, dtype=np.float64), np.asarray(sphere.faces, dtype=np.int64)


def _smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def make_tiny_head(subdivisions: int = 3, seed: int = 0) -> Mesh:
    """A head-like, per-vertex coloured triangle mesh in the canonical space (module docstring).

    Args:
        subdivisions: icosphere subdivisions, 1..5: 42, 162, 642, 2562 or 10242 vertices
            (10 * 4**s + 2) and 80, 320, 1280, 5120 or 20480 triangles (20 * 4**s).
        seed: seeds the small per-vertex colour noise (std 0.015); the geometry does not depend on it.

    Returns:
        :class:`Mesh` with vertices (V, 3) float32 inside the ball of radius 0.5 (nose tip at about
        z = -0.49), outward counter-clockwise faces (F, 3), colors (V, 3) in [0, 1], area-weighted
        outward normals (V, 3), uv None.

    Raises:
        ValueError: if ``subdivisions`` is outside 1..5.
    """
    if not 1 <= subdivisions <= 5:
        raise ValueError(f"make_tiny_head: subdivisions must be in 1..5, got {subdivisions}")
    dirs, faces = _icosphere(subdivisions)  # (V, 3) unit directions, (F, 3)
    feat = TINY_HEAD_FEATURES

    def near(name: str, sigma: float) -> np.ndarray:
        ang = np.arccos(np.clip(dirs @ feat[name], -1.0, 1.0))  # (V,) angle to the feature
        return np.exp(-0.5 * (ang / sigma) ** 2)

    radial = 1.0 + _NOSE_GAIN * near("nose", _NOSE_SIGMA)  # (V,)
    verts = dirs * _RADII * radial[:, None]  # (V, 3)

    colors = np.tile(_SKIN, (len(dirs), 1))  # (V, 3)
    x, y, z = dirs.T
    # hair: the crown and the back of the head (y < 0 is up, z > 0 is away from the camera)
    hair = np.maximum(_smoothstep(-y, 0.35, 0.55), _smoothstep(z, 0.05, 0.3) * _smoothstep(-y, -0.5, -0.2))
    colors = colors * (1 - hair[:, None]) + _HAIR * hair[:, None]
    # mouth: a band below the nose on the front
    band = np.exp(-0.5 * ((y - feat["mouth"][1]) / 0.07) ** 2) * _smoothstep(-z, 0.7, 0.85)
    band = band * (1.0 - _smoothstep(np.abs(x), 0.22, 0.32))
    colors = colors * (1 - band[:, None]) + _LIPS * band[:, None]
    for eye in ("left_eye", "right_eye"):
        w = near(eye, 0.11)[:, None]
        colors = colors * (1 - w) + _EYE * w
    rng = np.random.default_rng(seed)
    colors = np.clip(colors + rng.normal(0.0, 0.015, size=colors.shape), 0.0, 1.0)
    return Mesh(vertices=verts, faces=faces, colors=colors, normals=vertex_normals(verts, faces))


def make_tiny_point_cloud(n: int = 2048, seed: int = 0, subdivisions: int = 3) -> Mesh:
    """``n`` points sampled uniformly on the tiny head's surface, with normals and colours.

    Args:
        n: number of points, >= 1.
        seed: seeds both the head's colour noise and the surface sampling.
        subdivisions: of the underlying :func:`make_tiny_head`.

    Returns:
        :class:`Mesh` with faces None, vertices (n, 3) float32, colors (n, 3) in [0, 1] and unit
        normals (n, 3) of the triangles the points lie on.

    Raises:
        ValueError: if ``n`` < 1 or ``subdivisions`` is outside 1..5.
    """
    points, normals, colors = sample_surface(make_tiny_head(subdivisions, seed), n, seed=seed)
    return Mesh(vertices=points, faces=None, colors=colors, normals=normals)


def write_tiny_head(path: str | Path, subdivisions: int = 3, seed: int = 0) -> Path:
    """Save :func:`make_tiny_head` with 8-bit per-vertex colours, vertex order kept.

    Args:
        path: output file ending in .ply, .obj or .glb; its folder must exist.
        subdivisions: see :func:`make_tiny_head`.
        seed: see :func:`make_tiny_head`.

    Returns:
        ``path`` as a Path. Loading it with ``load_mesh`` gives the same vertices and faces and
        the colours rounded to multiples of 1/255.

    Raises:
        ValueError: for another extension.
        FileNotFoundError: if the folder of ``path`` does not exist.
    """
    import trimesh

    path = Path(path)
    if path.suffix.lower() not in (".ply", ".obj", ".glb"):
        raise ValueError(f"write_tiny_head: {path} must end in .ply, .obj or .glb")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"write_tiny_head: folder {path.parent} does not exist")
    head = make_tiny_head(subdivisions, seed)
    rgba = np.concatenate([np.round(head.colors * 255), np.full((head.num_vertices, 1), 255)], axis=1)
    tm = trimesh.Trimesh(head.vertices, head.faces, vertex_colors=rgba.astype(np.uint8), process=False)
    tm.export(str(path))
    return path
