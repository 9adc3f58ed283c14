"""Tests of datamodules/meshes.py and datamodules/tiny.py.

References are computed independently of the loaders: files are written by hand here or in
conftest.py, their 'v'/'f'/POINTS/POLYGONS lines are parsed by the test itself, and expected
numbers (bilinear lookups, area-weighted normals, normalisation) are worked out by hand.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from datamodules.meshes import (
    SUPPORTED_EXTENSIONS,
    Mesh,
    load_mesh,
    normalize_to_unit_head,
    sample_surface,
    sample_texture,
    vertex_normals,
)
from datamodules.tiny import TINY_HEAD_FEATURES, make_tiny_head, make_tiny_point_cloud, write_tiny_head
from tests.conftest import FRAN_NUM_POINTS, FRAN_NUM_TRIANGLES, write_canonical_standin, write_fran_standin

# Six vertices: 3 and 4 repeat the positions of 1 and 0, vertex 5 is used by no face.
DUP_VERTS = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0], [2, 2, 2]], dtype=np.float32)
DUP_FACES = np.array([[0, 1, 2], [3, 2, 4]], dtype=np.int64)
DUP_RGB = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30], [40, 50, 60], [255, 255, 255]])

UNIT_CUBE_VERTS = np.array(
    [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1]], dtype=np.float32
)
UNIT_CUBE_FACES = np.array(  # outward, counter-clockwise
    [
        [0, 2, 1], [0, 3, 2],  # z = 0
        [4, 5, 6], [4, 6, 7],  # z = 1
        [0, 1, 5], [0, 5, 4],  # y = 0
        [3, 7, 6], [3, 6, 2],  # y = 1
        [0, 4, 7], [0, 7, 3],  # x = 0
        [1, 2, 6], [1, 6, 5],  # x = 1
    ]
)  # fmt: skip


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _parse_obj_v(path: Path) -> np.ndarray:
    return np.array(
        [[float(t) for t in ln.split()[1:4]] for ln in path.read_text().splitlines() if ln.startswith("v ")]
    )


# ------------------------------------------------------------------------------------------------
# trimesh formats: vertex count and order kept


def test_obj_with_duplicate_positions_keeps_count_and_order(tmp_path):
    lines = [
        f"v {x} {y} {z} {r / 255:.6f} {g / 255:.6f} {b / 255:.6f}"
        for (x, y, z), (r, g, b) in zip(DUP_VERTS, DUP_RGB)
    ]
    lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in DUP_FACES]
    mesh = load_mesh(_write(tmp_path / "dup.obj", "\n".join(lines) + "\n"))
    np.testing.assert_array_equal(mesh.vertices, DUP_VERTS)
    np.testing.assert_array_equal(mesh.faces, DUP_FACES)
    np.testing.assert_allclose(mesh.colors, DUP_RGB / 255.0, atol=1e-3)
    assert mesh.faces.dtype == np.int64 and mesh.vertices.dtype == np.float32


def test_ply_with_duplicate_positions_keeps_count_and_order(tmp_path):
    header = (
        "ply\nformat ascii 1.0\nelement vertex 6\nproperty float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\n"
        "element face 2\nproperty list uchar int vertex_indices\nend_header\n"
    )
    body = "".join(f"{x} {y} {z} {r} {g} {b}\n" for (x, y, z), (r, g, b) in zip(DUP_VERTS, DUP_RGB))
    body += "".join(f"3 {a} {b} {c}\n" for a, b, c in DUP_FACES)
    mesh = load_mesh(_write(tmp_path / "dup.ply", header + body))
    np.testing.assert_array_equal(mesh.vertices, DUP_VERTS)
    np.testing.assert_array_equal(mesh.faces, DUP_FACES)
    np.testing.assert_allclose(mesh.colors, DUP_RGB / 255.0, atol=1e-6)
    # vertex 0: only triangle 0 (normal +z, area 1/2); vertex 5: no triangle -> zero normal
    np.testing.assert_allclose(mesh.normals[0], [0, 0, 1], atol=1e-6)
    np.testing.assert_allclose(mesh.normals[5], [0, 0, 0], atol=1e-6)


def test_point_only_ply_returns_its_points(tmp_path):
    pts = np.random.default_rng(1).normal(size=(37, 3)).astype(np.float32)
    nrm = pts / np.linalg.norm(pts, axis=1, keepdims=True)
    rgb = np.random.default_rng(2).integers(0, 256, size=(37, 3))
    header = (
        "ply\nformat ascii 1.0\nelement vertex 37\n"
        + "".join(f"property float {k}\n" for k in ("x", "y", "z", "nx", "ny", "nz"))
        + "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n"
    )
    body = "".join(
        f"{p[0]:.7g} {p[1]:.7g} {p[2]:.7g} {n[0]:.7g} {n[1]:.7g} {n[2]:.7g} {c[0]} {c[1]} {c[2]}\n"
        for p, n, c in zip(pts, nrm, rgb)
    )
    cloud = load_mesh(_write(tmp_path / "cloud.ply", header + body))
    assert cloud.faces is None and cloud.is_point_cloud and cloud.num_vertices == 37
    np.testing.assert_allclose(cloud.vertices, pts, rtol=1e-6)
    np.testing.assert_allclose(cloud.normals, nrm, atol=1e-6)
    np.testing.assert_allclose(cloud.colors, rgb / 255.0, atol=1e-6)


def test_glb_round_trip_through_trimesh_export(tmp_path, tiny_head):
    path = write_tiny_head(tmp_path / "head.glb")
    mesh = load_mesh(path)
    np.testing.assert_allclose(mesh.vertices, tiny_head.vertices, atol=1e-6)
    np.testing.assert_array_equal(mesh.faces, tiny_head.faces)
    np.testing.assert_allclose(mesh.colors, tiny_head.colors, atol=0.5 / 255 + 1e-6)  # 8-bit rounding


@pytest.mark.parametrize("ext", ["ply", "obj"])
def test_tiny_head_file_round_trip(tmp_path, tiny_head, ext):
    mesh = load_mesh(write_tiny_head(tmp_path / f"head.{ext}"))
    np.testing.assert_allclose(mesh.vertices, tiny_head.vertices, atol=1e-6)
    np.testing.assert_array_equal(mesh.faces, tiny_head.faces)
    np.testing.assert_allclose(mesh.colors, tiny_head.colors, atol=0.5 / 255 + 1e-6)
    np.testing.assert_allclose(mesh.normals, tiny_head.normals, atol=1e-5)


def test_tiny_head_ply_fixture(tiny_head_ply, tiny_head):
    mesh = load_mesh(tiny_head_ply)
    assert mesh.num_vertices == 642 and mesh.num_faces == 1280
    np.testing.assert_allclose(mesh.vertices, tiny_head.vertices, atol=1e-6)


def _check_canonical(path: Path, expected_vertices: int, expected_faces: int) -> None:
    lines = path.read_text().splitlines()
    ref_v = _parse_obj_v(path)
    ref_vt = np.array([[float(t) for t in ln.split()[1:3]] for ln in lines if ln.startswith("vt ")])
    corners = [[c.split("/") for c in ln.split()[1:]] for ln in lines if ln.startswith("f ")]
    ref_f = np.array([[int(c[0]) - 1 for c in tri] for tri in corners])
    ref_ft = np.array([[int(c[1]) - 1 for c in tri] for tri in corners])
    assert (ref_f != ref_ft).any(), "the file should index positions and UVs separately"

    mesh = load_mesh(path)
    assert mesh.num_vertices == expected_vertices and mesh.num_faces == expected_faces
    np.testing.assert_allclose(mesh.vertices, ref_v, rtol=1e-6, atol=1e-6)  # vertex i = 'v' line i
    np.testing.assert_array_equal(mesh.faces, ref_f)
    np.testing.assert_allclose(mesh.uv[ref_f.ravel()], ref_vt[ref_ft.ravel()], atol=1e-6)
    assert mesh.colors is None  # no material: no invented colours


def test_canonical_face_obj_keeps_vertex_order(canonical_obj_path, shared_data):
    real = shared_data is not None and canonical_obj_path.is_relative_to(shared_data)
    _check_canonical(canonical_obj_path, 468 if real else 162, 898 if real else 320)
    if real:  # centimetre scale: the face is about 15 cm wide
        mesh = load_mesh(canonical_obj_path)
        width = np.ptp(mesh.vertices[:, 0])
        assert 10.0 < width < 20.0


def test_canonical_standin_layout(tmp_path):
    _check_canonical(write_canonical_standin(tmp_path), 162, 320)


# ------------------------------------------------------------------------------------------------
# legacy VTK


def _parse_fran_reference(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Independent, minimal reading of a Fran-layout VTK: POINTS, 3-index POLYGONS, TEXTURE_COORDINATES."""
    tok = path.read_text().split()
    k = tok.index("POINTS")
    n = int(tok[k + 1])
    pts = np.array(tok[k + 3 : k + 3 + 3 * n], dtype=float).reshape(n, 3)
    k = tok.index("POLYGONS")
    m = int(tok[k + 1])
    cells = np.array(tok[k + 3 : k + 3 + 4 * m], dtype=np.int64).reshape(m, 4)
    assert (cells[:, 0] == 3).all()
    k = tok.index("TEXTURE_COORDINATES")
    uv = np.array(tok[k + 4 : k + 4 + 2 * n], dtype=float).reshape(n, 2)
    return pts, cells[:, 1:], uv


def _check_fran(path: Path) -> None:
    ref_pts, ref_tris, ref_uv = _parse_fran_reference(path)
    mesh = load_mesh(path)
    assert mesh.num_vertices == FRAN_NUM_POINTS == 2205
    assert mesh.num_faces == FRAN_NUM_TRIANGLES == 4224
    np.testing.assert_allclose(mesh.vertices, ref_pts, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(mesh.faces, ref_tris)
    np.testing.assert_array_equal(mesh.faces[0], [0, 49, 1])  # Fran's grid: columns of 49 points
    np.testing.assert_allclose(mesh.uv, ref_uv, atol=1e-6)
    c = mesh.colors
    assert c.shape == (2205, 3) and c.min() >= 0.0 and c.max() <= 1.0
    assert c.std(axis=0).min() > 0.05  # a textured face, not one flat colour
    mean = c.mean(axis=0)
    assert mean[0] > mean[2] + 0.05 and mean[0] > mean[1] + 0.05  # skin: red dominates
    # area-weighted normals are unit length and vary smoothly over the grid
    np.testing.assert_allclose(np.linalg.norm(mesh.normals, axis=1), 1.0, atol=1e-5)


def test_fran_scan(fran_path):
    _check_fran(fran_path)


def test_fran_standin(tmp_path):
    _check_fran(write_fran_standin(tmp_path))


def test_vtk_texture_orientation_and_bilinear(tmp_path):
    """A 2x2 texture, row 0 on top: v = 1 is the top row, u = 0 the left column."""
    from PIL import Image

    img = np.array([[[200, 0, 0], [0, 200, 0]], [[0, 0, 200], [100, 100, 100]]], dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "quad.png")
    uv = [(0.25, 0.75), (0.75, 0.75), (0.25, 0.25), (0.75, 0.25), (0.5, 0.5), (0.5, 0.75), (0.0, 1.0)]
    pts = [(k, 0.0, 0.0) for k in range(len(uv))]
    text = (
        "# vtk DataFile Version 3.0\norientation\nASCII\nDATASET POLYDATA\n"
        f"POINTS {len(pts)} float\n" + " ".join(f"{x} {y} {z}" for x, y, z in pts) + "\n"
        f"POINT_DATA {len(pts)}\nTEXTURE_COORDINATES uv 2 float\n"
        + " ".join(f"{u} {v}" for u, v in uv)
        + "\n"
    )
    mesh = load_mesh(_write(tmp_path / "quad.vtk", text))  # texture found by stem
    red, green, blue, grey = [200 / 255, 0, 0], [0, 200 / 255, 0], [0, 0, 200 / 255], [100 / 255] * 3
    expected = np.array(
        [
            red,  # texel centre of row 0, column 0
            green,  # row 0, column 1
            blue,  # row 1, column 0
            grey,  # row 1, column 1
            np.mean([red, green, blue, grey], axis=0),  # centre: all four equally
            np.mean([red, green], axis=0),  # top row, halfway across
            red,  # corner: clamped to the border texel
        ]
    )
    assert mesh.faces is None
    np.testing.assert_allclose(mesh.colors, expected, atol=1e-6)
    # an explicit texture overrides the one found by stem: flipped vertically -> rows swap
    flipped = load_mesh(tmp_path / "quad.vtk", texture=img[::-1].copy())
    np.testing.assert_allclose(flipped.colors[:4], expected[[2, 3, 0, 1]], atol=1e-6)


def test_sample_texture_float_image_and_grey():
    img = np.array([[0.0, 1.0], [0.5, 0.25]], dtype=np.float32)  # (2, 2) grey
    out = sample_texture(img, np.array([[0.5, 0.25], [0.75, 0.5]]))
    np.testing.assert_allclose(out[:, 0], [0.375, 0.625], atol=1e-6)  # bottom row mean; right column mean


def test_vtk_polygons_strips_colors_and_cell_data(tmp_path):
    """Quads and pentagons are fan-triangulated, strips alternate, values straddle lines,
    CELL_DATA arrays are skipped, COLOR_SCALARS become colours (texture ignored)."""
    pts = np.arange(24, dtype=float).reshape(8, 3) * [1.0, 0.5, 0.25]
    text = (
        "# vtk DataFile Version 2.0\nmixed polygons\nASCII\n\nDATASET POLYDATA\nPOINTS 8 double\n"
        + "\n".join(" ".join(f"{v}" for v in pts.ravel()[k : k + 5]) for k in range(0, 24, 5))
        + "\nVERTICES 1 2\n1 7\nLINES 1 3\n2 6 7\n"
        "POLYGONS 3 15\n3 0 1 2\n4 0 2 3 4\n5 1 2 3 4 5\n"
        "TRIANGLE_STRIPS 1 5\n4 4 5 6 7\n"
        "CELL_DATA 6\nSCALARS cellid int 1\nLOOKUP_TABLE default\n0 1 2 3 4 5\n"
        "FIELD FieldData 1\nquality 2 6 float\n0 0 0 0 0 0 0 0 0 0 0 0\n"
        "POINT_DATA 8\nSCALARS temp float\nLOOKUP_TABLE default\n1 2 3 4 5 6 7 8\n"
        "COLOR_SCALARS rgba 4\n" + " ".join(f"{k / 10} 0.5 {1 - k / 10} 1" for k in range(8)) + "\n"
        "TEXTURE_COORDINATES uv 2 float\n" + " ".join("0.5 0.5" for _ in range(8)) + "\n"
    )
    mesh = load_mesh(_write(tmp_path / "mixed.vtk", text), texture=np.zeros((4, 4, 3), dtype=np.uint8))
    np.testing.assert_allclose(mesh.vertices, pts, rtol=1e-6)
    expected = [[0, 1, 2], [0, 2, 3], [0, 3, 4], [1, 2, 3], [1, 3, 4], [1, 4, 5], [4, 5, 6], [6, 5, 7]]
    np.testing.assert_array_equal(mesh.faces, expected)
    np.testing.assert_allclose(mesh.colors, [[k / 10, 0.5, 1 - k / 10] for k in range(8)], atol=1e-6)


def test_vtk_51_offsets_connectivity_and_metadata(tmp_path):
    text = (
        "# vtk DataFile Version 5.1\nvtk output\nASCII\nDATASET POLYDATA\nPOINTS 4 float\n"
        "0 0 0 1 0 0 1 1 0 0 1 0\n"
        "METADATA\nINFORMATION 1\nNAME L2_NORM_RANGE LOCATION vtkDataArray\nDATA 2 0 1.41421\n\n"
        "POLYGONS 2 4\nOFFSETS vtktypeint64\n0 4\nCONNECTIVITY vtktypeint64\n0 1 2 3\n"
        "POINT_DATA 4\nNORMALS Normals float\n0 0 1 0 0 1 0 0 1 0 0 1\n"
    )
    mesh = load_mesh(_write(tmp_path / "v51.vtk", text))
    np.testing.assert_array_equal(mesh.faces, [[0, 1, 2], [0, 2, 3]])
    np.testing.assert_allclose(mesh.normals, np.tile([0.0, 0.0, 1.0], (4, 1)), atol=1e-6)
    assert mesh.colors is None


def test_vtk_points_only_is_a_point_cloud(tmp_path):
    text = "# vtk DataFile Version 3.0\npts\nASCII\nDATASET POLYDATA\nPOINTS 3 float\n0 0 0 1 2 3 4 5 6\n"
    cloud = load_mesh(_write(tmp_path / "pts.vtk", text))
    assert cloud.faces is None
    np.testing.assert_array_equal(cloud.vertices, [[0, 0, 0], [1, 2, 3], [4, 5, 6]])


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("bin.vtk", "# vtk DataFile Version 3.0\nx\nBINARY\nDATASET POLYDATA\n", "ASCII"),
        ("grid.vtk", "# vtk DataFile Version 3.0\nx\nASCII\nDATASET STRUCTURED_POINTS\n", "POLYDATA"),
        (
            "short.vtk",
            "# vtk DataFile Version 3.0\nx\nASCII\nDATASET POLYDATA\nPOINTS 3 float\n0 0 0 1\n",
            "ends early",
        ),
        ("notvtk.vtk", "hello\nworld\nASCII\nDATASET POLYDATA\n", "legacy VTK"),
        (
            "badidx.vtk",
            "# vtk DataFile Version 3.0\nx\nASCII\nDATASET POLYDATA\nPOINTS 3 float\n0 0 0 1 0 0 0 1 0\nPOLYGONS 1 4\n3 0 1 7\n",
            "indexes point 7",
        ),
    ],
)
def test_vtk_malformed_files_are_clear_errors(tmp_path, name, text, match):
    with pytest.raises(ValueError, match=match):
        load_mesh(_write(tmp_path / name, text))


# ------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "name, text",
    [
        ("empty.obj", "# no vertices\n"),
        (
            "empty.ply",
            "ply\nformat ascii 1.0\nelement vertex 0\nproperty float x\nproperty float y\nproperty float z\n"
            "element face 0\nproperty list uchar int vertex_indices\nend_header\n",
        ),
        ("empty.vtk", "# vtk DataFile Version 3.0\nempty\nASCII\nDATASET POLYDATA\nPOINTS 0 float\n"),
        ("nopoints.vtk", "# vtk DataFile Version 3.0\nempty\nASCII\nDATASET POLYDATA\n"),
    ],
)
def test_zero_vertices_is_an_error_naming_the_file(tmp_path, name, text):
    with pytest.raises(ValueError, match=r"0 vertices") as err:
        load_mesh(_write(tmp_path / name, text))
    assert name in str(err.value)


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.obj"):
        load_mesh(tmp_path / "nope.obj")
    with pytest.raises(ValueError, match=r"\.obj.*\.ply.*\.glb.*\.vtk"):
        load_mesh(_write(tmp_path / "points.xyz", "0 0 0\n"))
    assert ".off" in SUPPORTED_EXTENSIONS
    ply = write_tiny_head(tmp_path / "h.ply")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_mesh(ply, texture=tmp_path / "missing.png")


def test_mesh_validation():
    with pytest.raises(ValueError, match=r"\(V, 3\)"):
        Mesh(vertices=np.zeros((4, 2)))
    with pytest.raises(ValueError, match="4 vertices"):
        Mesh(vertices=np.zeros((4, 3)), faces=np.array([[0, 1, 4]]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Mesh(vertices=np.zeros((1, 3)), colors=np.array([[0.0, 2.0, 0.0]]))
    with pytest.raises(ValueError, match="uv"):
        Mesh(vertices=np.zeros((4, 3)), uv=np.zeros((3, 2)))


# ------------------------------------------------------------------------------------------------
# geometry helpers


def test_vertex_normals_are_area_weighted():
    # vertex 0 is shared by a triangle in z = 0 of area 2 (normal +z) and one in x = 0 of area 1 (normal +x)
    verts = np.array([[0, 0, 0], [2, 0, 0], [0, 2, 0], [0, 1, 0], [0, 0, 2]], dtype=np.float32)
    faces = np.array([[0, 1, 2], [0, 3, 4]])
    n = vertex_normals(verts, faces)
    np.testing.assert_allclose(n[0], np.array([1.0, 0.0, 2.0]) / np.sqrt(5.0), atol=1e-6)
    np.testing.assert_allclose(n[1], [0, 0, 1], atol=1e-6)
    np.testing.assert_allclose(n[4], [1, 0, 0], atol=1e-6)


def test_sample_surface_on_unit_cube():
    # colour = position: linear, so barycentric interpolation must return the point itself
    cube = Mesh(vertices=UNIT_CUBE_VERTS, faces=UNIT_CUBE_FACES, colors=UNIT_CUBE_VERTS)
    pts, nrm, col = sample_surface(cube, 4000, seed=3)
    assert pts.shape == nrm.shape == col.shape == (4000, 3) and pts.dtype == np.float32
    assert pts.min() >= -1e-6 and pts.max() <= 1 + 1e-6
    dist_to_surface = np.minimum(np.abs(pts), np.abs(pts - 1)).min(axis=1)
    assert dist_to_surface.max() < 1e-6
    np.testing.assert_allclose(col, pts, atol=1e-6)
    # outward normal: the axis of the face the point lies on, pointing away from the centre
    axis = np.abs(nrm).argmax(axis=1)
    np.testing.assert_allclose(np.abs(nrm).max(axis=1), 1.0, atol=1e-6)
    on_face = pts[np.arange(4000), axis]
    np.testing.assert_allclose(on_face, (nrm[np.arange(4000), axis] > 0).astype(np.float32), atol=1e-6)
    # 6 equal faces: each gets about 1/6 of the points (binomial std ~ 0.006)
    frac = np.bincount(axis * 2 + (nrm[np.arange(4000), axis] > 0), minlength=6) / 4000
    np.testing.assert_allclose(frac, 1 / 6, atol=0.03)


def test_sample_surface_is_area_weighted_and_deterministic():
    # triangle 0 has area 1/2, triangle 1 area 3/2 -> 1/4 of the points in triangle 0 (x <= 1)
    verts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 0, 0], [4, 0, 0], [1, 1, 0]], dtype=np.float32)
    mesh = Mesh(vertices=verts, faces=np.array([[0, 1, 2], [3, 4, 5]]))
    pts, nrm, col = sample_surface(mesh, 20000, seed=0)
    assert col is None
    in_first = (pts[:, 0] + pts[:, 1] <= 1 + 1e-6) & (pts[:, 0] <= 1)
    assert abs(in_first.mean() - 0.25) < 0.015  # 5 binomial standard deviations
    np.testing.assert_allclose(nrm, np.tile([0, 0, 1], (20000, 1)), atol=1e-6)
    again, _, _ = sample_surface(mesh, 20000, seed=0)
    other, _, _ = sample_surface(mesh, 20000, seed=1)
    np.testing.assert_array_equal(pts, again)
    assert np.abs(pts - other).max() > 0.1
    # the points inside the first triangle are uniform: mean at its centroid (1/3, 1/3)
    np.testing.assert_allclose(pts[in_first, :2].mean(axis=0), [1 / 3, 1 / 3], atol=0.02)


def test_sample_surface_errors():
    with pytest.raises(ValueError, match="point cloud"):
        sample_surface(Mesh(vertices=np.zeros((3, 3))), 10)
    with pytest.raises(ValueError, match="zero surface area"):
        sample_surface(Mesh(vertices=np.zeros((3, 3)), faces=np.array([[0, 1, 2]])), 10)
    with pytest.raises(ValueError, match="n must be"):
        sample_surface(Mesh(vertices=UNIT_CUBE_VERTS, faces=UNIT_CUBE_FACES), 0)


def test_normalize_to_unit_head():
    verts = np.array([[1, 0, 0], [3, 1, 0.5], [2, 0.5, 0.25]], dtype=np.float32)
    # box [1, 3] x [0, 1] x [0, 0.5]: centre (2, 0.5, 0.25), largest half-extent 1 -> scale 0.5
    out = normalize_to_unit_head(Mesh(vertices=verts, colors=np.full((3, 3), 0.2)))
    np.testing.assert_allclose(
        out.vertices, [[-0.5, -0.25, -0.125], [0.5, 0.25, 0.125], [0, 0, 0]], atol=1e-7
    )
    np.testing.assert_allclose(out.colors, 0.2)
    with pytest.raises(ValueError, match="zero extent"):
        normalize_to_unit_head(Mesh(vertices=np.ones((3, 3))))


def test_normalize_fran(fran_path):
    mesh = normalize_to_unit_head(load_mesh(fran_path))
    lo, hi = mesh.vertices.min(axis=0), mesh.vertices.max(axis=0)
    np.testing.assert_allclose(lo + hi, 0.0, atol=1e-6)
    assert abs((hi - lo).max() - 1.0) < 1e-6
    assert mesh.num_vertices == 2205


# ------------------------------------------------------------------------------------------------
# tiny heads


@pytest.mark.parametrize("subdivisions, v, f", [(2, 162, 320), (3, 642, 1280)])
def test_tiny_head_geometry(subdivisions, v, f):
    head = make_tiny_head(subdivisions=subdivisions, seed=0)
    assert head.num_vertices == v and head.num_faces == f
    r = np.linalg.norm(head.vertices, axis=1)
    assert r.max() <= 0.5 and r.min() >= 0.3
    # closed surface: every edge is shared by exactly two triangles, once in each direction
    edges = np.concatenate([head.faces[:, [0, 1]], head.faces[:, [1, 2]], head.faces[:, [2, 0]]])
    assert len({tuple(e) for e in edges.tolist()}) == 3 * f
    assert {tuple(e) for e in edges.tolist()} == {tuple(e) for e in edges[:, ::-1].tolist()}
    # outward normals, unit length
    np.testing.assert_allclose(np.linalg.norm(head.normals, axis=1), 1.0, atol=1e-5)
    assert ((head.normals * head.vertices).sum(axis=1) > 0).all()
    # the face looks towards -z: the nose tip is the most negative z, centred in x, beyond the ellipsoid
    tip = head.vertices[np.argmin(head.vertices[:, 2])]
    assert abs(tip[0]) < 1e-6 and tip[2] < -0.45
    assert np.abs(head.vertices[:, 2]).max() == pytest.approx(-tip[2])


def test_tiny_head_colours():
    head = make_tiny_head(subdivisions=3, seed=0)
    c, d = head.colors, head.vertices / np.linalg.norm(head.vertices, axis=1, keepdims=True)

    def nearest(direction: np.ndarray, k: int = 3) -> np.ndarray:
        return np.argsort(-(d @ direction))[:k]

    cheek = nearest(np.array([0.5, 0.1, -0.86]))
    skin = c[cheek].mean(axis=0)
    assert skin[0] > skin[1] > skin[2] and skin.mean() > 0.55  # light skin
    for eye in ("left_eye", "right_eye"):
        assert c[nearest(TINY_HEAD_FEATURES[eye])].mean() < 0.6 * skin.mean()  # darker eye spots
    mouth = c[nearest(TINY_HEAD_FEATURES["mouth"])].mean(axis=0)
    assert mouth[0] - mouth[1] > 0.3  # red lips
    hair = c[nearest(TINY_HEAD_FEATURES["top"], k=10)].mean(axis=0)  # top of the head is -y
    assert hair.mean() < 0.3
    # the seed changes only the colour noise
    other = make_tiny_head(subdivisions=3, seed=1)
    np.testing.assert_array_equal(other.vertices, head.vertices)
    assert 0 < np.abs(other.colors - c).max() < 0.1
    np.testing.assert_array_equal(make_tiny_head(subdivisions=3, seed=0).colors, c)
    with pytest.raises(ValueError, match="subdivisions"):
        make_tiny_head(subdivisions=0)


def test_tiny_point_cloud():
    cloud = make_tiny_point_cloud(1500, seed=4)
    assert cloud.faces is None and cloud.vertices.shape == (1500, 3)
    assert cloud.colors.shape == (1500, 3) and cloud.normals.shape == (1500, 3)
    assert np.linalg.norm(cloud.vertices, axis=1).max() <= 0.5
    assert ((cloud.normals * cloud.vertices).sum(axis=1) > 0).mean() > 0.98  # outward (bar the nose flank)
    np.testing.assert_array_equal(make_tiny_point_cloud(1500, seed=4).vertices, cloud.vertices)
    with pytest.raises(ValueError, match=r"\.ply, \.obj or \.glb"):
        write_tiny_head("head.stl")
