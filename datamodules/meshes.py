"""Meshes and point clouds on disk -> one :class:`Mesh` record (DESIGN.md, "Data"; issue "Foundation").

Formats:

- ``.obj``, ``.ply``, ``.glb``/``.gltf``, ``.off`` through trimesh with ``process=False`` and
  ``maintain_order=True``: no vertex is merged, split, dropped or reordered, so vertex ``i`` of the
  result is vertex ``i`` of the file (the MediaPipe canonical face keeps vertex i = landmark i). For
  OBJ files whose faces index positions and texture coordinates separately (``f 174/43 ...``),
  trimesh with ``maintain_order=True`` keeps one vertex per ``v`` line and gives each vertex the
  UV of the face corners that use it (checked on the canonical face: 468 vertices, 898 triangles,
  UVs equal to the ``vt`` line each ``v`` is paired with); only at a UV seam, where one ``v`` is
  paired with several ``vt``, does a single UV per vertex lose information, never the vertex order.
- A PLY (or OBJ) with vertices and no faces is a point cloud: its N points, ``faces=None``.
- Legacy ASCII VTK polydata (``.vtk``), parsed here (trimesh does not read it): POINTS, POLYGONS
  (polygons with more than 3 corners are fan-triangulated), TRIANGLE_STRIPS, and the POINT_DATA
  attributes TEXTURE_COORDINATES, COLOR_SCALARS, NORMALS and 3/4-component ``unsigned_char``
  SCALARS (read as RGB). Both the classic cell layout (``n i0 i1 ...``) and the VTK >= 5.1
  OFFSETS/CONNECTIVITY layout are accepted.

Per-vertex colours come from the file's vertex colours, or else from a texture image sampled
bilinearly at the per-vertex UVs (``texture`` argument, else an image next to the file with the
same stem, else the material image of an OBJ/GLB). UV convention: u to the right, v up, so
image row 0 is at v = 1 (OBJ/VTK/glTF-as-loaded-by-trimesh convention). Vertex normals of meshes
are area-weighted face normals.

Array layout (all numpy, one object per mesh, not batched):

=========  ===============  ========  =====================================================
field      shape            dtype     meaning
=========  ===============  ========  =====================================================
vertices   (V, 3)           float32   positions, in the file's units
faces      (F, 3) or None   int64     triangle vertex indices, counter-clockwise; None = cloud
colors     (V, 3) or None   float32   RGB in [0, 1]
uv         (V, 2) or None   float32   texture coordinates, v up
normals    (V, 3) or None   float32   unit vertex normals
=========  ===============  ========  =====================================================
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "Mesh",
    "SUPPORTED_EXTENSIONS",
    "load_mesh",
    "sample_texture",
    "vertex_normals",
    "face_areas_normals",
    "sample_surface",
    "normalize_to_unit_head",
]

SUPPORTED_EXTENSIONS = (".obj", ".ply", ".glb", ".gltf", ".off", ".vtk")
_TRIMESH_EXTENSIONS = (".obj", ".ply", ".glb", ".gltf", ".off")
_TEXTURE_EXTENSIONS = (".png", ".jpg", ".jpeg")


@dataclass
class Mesh:
    """A triangle mesh or a point cloud, per-vertex attributes aligned with ``vertices``.

    Attributes:
        vertices: (V, 3) float32 positions (units of the source: metres, centimetres, ...).
        faces: (F, 3) int64 vertex indices of counter-clockwise triangles, or None for a point cloud.
        colors: (V, 3) float32 RGB in [0, 1], or None.
        uv: (V, 2) float32 texture coordinates (u right, v up), or None.
        normals: (V, 3) float32 unit normals, or None.

    Raises:
        ValueError: on a wrong shape, a face index out of range, or colours outside [0, 1].
    """

    vertices: np.ndarray
    faces: np.ndarray | None = None
    colors: np.ndarray | None = None
    uv: np.ndarray | None = None
    normals: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.vertices = np.ascontiguousarray(self.vertices, dtype=np.float32)
        if self.vertices.ndim != 2 or self.vertices.shape[1] != 3:
            raise ValueError(f"Mesh.vertices must be (V, 3), got {self.vertices.shape}")
        v = self.vertices.shape[0]
        if self.faces is not None:
            self.faces = np.ascontiguousarray(self.faces, dtype=np.int64)
            if self.faces.ndim != 2 or self.faces.shape[1] != 3:
                raise ValueError(f"Mesh.faces must be (F, 3) triangles, got {self.faces.shape}")
            if self.faces.size and (self.faces.min() < 0 or self.faces.max() >= v):
                raise ValueError(
                    f"Mesh.faces index vertices in [{self.faces.min()}, {self.faces.max()}] "
                    f"but the mesh has {v} vertices"
                )
        for name, width in (("colors", 3), ("uv", 2), ("normals", 3)):
            arr = getattr(self, name)
            if arr is None:
                continue
            arr = np.ascontiguousarray(arr, dtype=np.float32)
            if arr.shape != (v, width):
                raise ValueError(f"Mesh.{name} must be ({v}, {width}), got {arr.shape}")
            setattr(self, name, arr)
        if (
            self.colors is not None
            and self.colors.size
            and (self.colors.min() < 0.0 or self.colors.max() > 1.0)
        ):
            raise ValueError("Mesh.colors must lie in [0, 1] (divide 8-bit colours by 255)")

    @property
    def num_vertices(self) -> int:
        """V, the number of vertices (points)."""
        return int(self.vertices.shape[0])

    @property
    def num_faces(self) -> int:
        """F, the number of triangles (0 for a point cloud)."""
        return 0 if self.faces is None else int(self.faces.shape[0])

    @property
    def is_point_cloud(self) -> bool:
        """True when the mesh has no faces."""
        return self.faces is None

    def replace(self, **changes) -> Mesh:
        """A copy with some fields replaced (``dataclasses.replace``; validation runs again)."""
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------
# geometry helpers


def face_areas_normals(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Triangle areas and unit normals.

    Args:
        vertices: (V, 3) float positions.
        faces: (F, 3) int vertex indices, counter-clockwise seen from the normal's side.

    Returns:
        areas: (F,) float64, in squared units of ``vertices``.
        normals: (F, 3) float64 unit normals, (0, 0, 0) for degenerate triangles.
    """
    v = np.asarray(vertices, dtype=np.float64)
    tri = v[np.asarray(faces, dtype=np.int64)]  # (F, 3 corners, 3)
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # (F, 3), |cross| = 2 * area
    norm = np.linalg.norm(cross, axis=1)
    normals = np.divide(cross, norm[:, None], out=np.zeros_like(cross), where=norm[:, None] > 0)
    return 0.5 * norm, normals


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted vertex normals: the normalised sum of the unnormalised face normals around a vertex.

    Args:
        vertices: (V, 3) float positions.
        faces: (F, 3) int vertex indices, counter-clockwise.

    Returns:
        (V, 3) float32 unit normals; vertices used by no (non-degenerate) face get (0, 0, 0).
    """
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    tri = v[f]  # (F, 3, 3)
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # (F, 3), length = 2 * area
    acc = np.zeros_like(v)
    for corner in range(3):
        np.add.at(acc, f[:, corner], cross)
    norm = np.linalg.norm(acc, axis=1, keepdims=True)
    out = np.divide(acc, norm, out=np.zeros_like(acc), where=norm > 0)
    return out.astype(np.float32)


def sample_texture(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear lookup of an image at texture coordinates.

    Convention: u in [0, 1] left -> right, v in [0, 1] bottom -> top (row 0 of the image is at
    v = 1); texel centres at ((j + 0.5) / W, 1 - (i + 0.5) / H); lookups outside the texel centres
    are clamped to the border texels.

    Args:
        image: (H, W, C) uint8 (0..255) or float (already in [0, 1]) image.
        uv: (N, 2) float texture coordinates.

    Returns:
        (N, C) float32 values; uint8 images are divided by 255.

    Raises:
        ValueError: if ``image`` is not (H, W, C) or ``uv`` not (N, 2).
    """
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3:
        raise ValueError(f"texture image must be (H, W, C), got shape {img.shape}")
    uv = np.asarray(uv, dtype=np.float64)
    if uv.ndim != 2 or uv.shape[1] != 2:
        raise ValueError(f"uv must be (N, 2), got shape {uv.shape}")
    scale = 255.0 if img.dtype == np.uint8 else 1.0
    img = img.astype(np.float64) / scale
    h, w = img.shape[:2]
    x = np.clip(uv[:, 0] * w - 0.5, 0.0, w - 1.0)  # continuous column, texel centres at integers
    y = np.clip((1.0 - uv[:, 1]) * h - 0.5, 0.0, h - 1.0)  # continuous row, v up -> row 0 on top
    x0 = np.minimum(np.floor(x).astype(np.int64), w - 1)
    y0 = np.minimum(np.floor(y).astype(np.int64), h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    y1 = np.minimum(y0 + 1, h - 1)
    fx = (x - x0)[:, None]
    fy = (y - y0)[:, None]
    top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx  # (N, C)
    bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image  # lazy: only textured meshes need it

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _find_texture(path: Path) -> Path | None:
    for ext in _TEXTURE_EXTENSIONS:
        for cand in (path.with_suffix(ext), path.with_suffix(ext.upper())):
            if cand.is_file():
                return cand
    return None


# ----------------------------------------------------------------------------------------------
# legacy VTK polydata


class _Tokens:
    """Whitespace token cursor over the body of a legacy VTK file (after its 3 header lines)."""

    def __init__(self, text: str, path: Path) -> None:
        self.tok = text.split()
        self.i = 0
        self.path = path

    def done(self) -> bool:
        return self.i >= len(self.tok)

    def peek(self, k: int = 0) -> str | None:
        j = self.i + k
        return self.tok[j] if j < len(self.tok) else None

    def next(self) -> str:
        if self.i >= len(self.tok):
            raise ValueError(f"{self.path}: legacy VTK file ends early (truncated?)")
        t = self.tok[self.i]
        self.i += 1
        return t

    def numbers(self, n: int, dtype) -> np.ndarray:
        if self.i + n > len(self.tok):
            raise ValueError(f"{self.path}: legacy VTK file ends early: expected {n} more values")
        try:
            out = np.asarray(self.tok[self.i : self.i + n], dtype=np.float64)
        except ValueError as err:
            raise ValueError(f"{self.path}: non-numeric value in a legacy VTK data block ({err})") from None
        self.i += n
        return out.astype(dtype)

    def integer(self) -> int:
        t = self.next()
        try:
            return int(t)
        except ValueError:
            raise ValueError(f"{self.path}: expected an integer in the legacy VTK file, got {t!r}") from None


def _read_cells(tk: _Tokens, n_cells: int, size: int) -> list[np.ndarray]:
    """One cell block (classic ``n i0 i1 ...`` or VTK 5.1 OFFSETS/CONNECTIVITY) -> list of index arrays."""
    if tk.peek() == "OFFSETS":
        tk.next()
        tk.next()  # data type
        offsets = tk.numbers(n_cells, np.int64)  # n_cells here is the number of offsets (cells + 1)
        if tk.next() != "CONNECTIVITY":
            raise ValueError(f"{tk.path}: VTK 5.1 cell block lacks CONNECTIVITY after OFFSETS")
        tk.next()  # data type
        conn = tk.numbers(size, np.int64)
        return [conn[offsets[k] : offsets[k + 1]] for k in range(len(offsets) - 1)]
    flat = tk.numbers(size, np.int64)
    cells, j = [], 0
    for _ in range(n_cells):
        if j >= size:
            raise ValueError(f"{tk.path}: legacy VTK cell block is shorter than its header says")
        k = int(flat[j])
        cells.append(flat[j + 1 : j + 1 + k])
        j += 1 + k
    if j != size:
        raise ValueError(f"{tk.path}: legacy VTK cell block has {size} values but its cells use {j}")
    return cells


def _fan(cells: list[np.ndarray]) -> np.ndarray:
    """Polygons -> triangles by a fan around each polygon's first corner; (F, 3) int64."""
    tris = [
        np.stack([c[np.zeros(len(c) - 2, dtype=np.int64)], c[1:-1], c[2:]], axis=1)
        for c in cells
        if len(c) >= 3
    ]
    return np.concatenate(tris) if tris else np.zeros((0, 3), dtype=np.int64)


def _strips(cells: list[np.ndarray]) -> np.ndarray:
    """Triangle strips -> triangles, flipping every other one to keep a consistent orientation."""
    tris = []
    for c in cells:
        for k in range(len(c) - 2):
            tris.append((c[k], c[k + 1], c[k + 2]) if k % 2 == 0 else (c[k + 1], c[k], c[k + 2]))
    return np.asarray(tris, dtype=np.int64).reshape(-1, 3)


def _skip_attribute_values(tk: _Tokens, count: int) -> None:
    tk.numbers(count, np.float64)


def _drop_metadata(body: str) -> str:
    """Remove VTK >= 5 METADATA blocks (a ``METADATA`` line up to the next blank line)."""
    kept, skipping = [], False
    for line in body.splitlines():
        if line.strip().upper() == "METADATA":
            skipping = True
        elif skipping:
            skipping = bool(line.strip())
        else:
            kept.append(line)
    return "\n".join(kept)


def _read_vtk(path: Path) -> tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray]]:
    """Parse legacy ASCII VTK polydata -> (points (V, 3), triangles (F, 3) or None, point attributes)."""
    text = path.read_text(errors="replace")
    lines = text.split("\n", 3)
    if len(lines) < 4 or not lines[0].lstrip().startswith("# vtk DataFile"):
        raise ValueError(f"{path}: not a legacy VTK file (the first line must start with '# vtk DataFile')")
    fmt = lines[2].strip().upper()
    if fmt != "ASCII":
        raise ValueError(
            f"{path}: only ASCII legacy VTK is supported, this file is {fmt!r}; re-save it as ASCII"
        )
    tk = _Tokens(_drop_metadata(lines[3]), path)
    if tk.next().upper() != "DATASET" or (kind := tk.next().upper()) != "POLYDATA":
        raise ValueError(
            f"{path}: only legacy VTK POLYDATA is supported (DATASET line missing or another type)"
        )

    points: np.ndarray | None = None
    triangles: list[np.ndarray] = []
    has_faces = False
    attrs: dict[str, np.ndarray] = {}
    section, n_section = None, 0  # "POINT_DATA"/"CELL_DATA" and its element count
    while not tk.done():
        key = tk.next().upper()
        if key == "POINTS":
            n = tk.integer()
            tk.next()  # data type
            points = tk.numbers(3 * n, np.float64).reshape(n, 3)  # (V, 3)
        elif key in ("VERTICES", "LINES", "POLYGONS", "TRIANGLE_STRIPS"):
            n_cells, size = tk.integer(), tk.integer()
            cells = _read_cells(tk, n_cells, size)
            if key == "POLYGONS":
                triangles.append(_fan(cells))
                has_faces = True
            elif key == "TRIANGLE_STRIPS":
                triangles.append(_strips(cells))
                has_faces = True
        elif key in ("POINT_DATA", "CELL_DATA"):
            section, n_section = key, tk.integer()
        elif key == "SCALARS":
            tk.next()  # name
            dtype = tk.next().lower()
            ncomp = 1
            if tk.peek() is not None and tk.peek().isdigit() and tk.peek(1) == "LOOKUP_TABLE":
                ncomp = tk.integer()
            if tk.peek() == "LOOKUP_TABLE":
                tk.next()
                tk.next()  # table name
            values = tk.numbers(n_section * ncomp, np.float64)
            if section == "POINT_DATA" and dtype == "unsigned_char" and ncomp in (3, 4):
                attrs.setdefault("scalar_rgb", values.reshape(n_section, ncomp)[:, :3] / 255.0)
        elif key == "COLOR_SCALARS":
            tk.next()  # name
            ncomp = tk.integer()
            values = tk.numbers(n_section * ncomp, np.float64).reshape(n_section, ncomp)
            if section == "POINT_DATA":
                if ncomp < 3:  # grey (+ alpha)
                    values = np.repeat(values[:, :1], 3, axis=1)
                attrs["colors"] = values[:, :3]
        elif key in ("VECTORS", "NORMALS"):
            tk.next()  # name
            tk.next()  # data type
            values = tk.numbers(n_section * 3, np.float64).reshape(n_section, 3)
            if section == "POINT_DATA" and key == "NORMALS":
                attrs["normals"] = values
        elif key == "TEXTURE_COORDINATES":
            tk.next()  # name
            dim = tk.integer()
            tk.next()  # data type
            values = tk.numbers(n_section * dim, np.float64).reshape(n_section, dim)
            if section == "POINT_DATA":
                if dim < 2:
                    values = np.concatenate([values, np.zeros((n_section, 1))], axis=1)
                attrs["uv"] = values[:, :2]
        elif key == "TENSORS":
            tk.next()
            tk.next()
            _skip_attribute_values(tk, n_section * 9)
        elif key == "LOOKUP_TABLE":
            tk.next()  # name
            _skip_attribute_values(tk, 4 * tk.integer())
        elif key == "FIELD":
            tk.next()  # name
            for _ in range(tk.integer()):
                tk.next()  # array name
                ncomp, ntup = tk.integer(), tk.integer()
                tk.next()  # data type
                _skip_attribute_values(tk, ncomp * ntup)
        else:
            raise ValueError(f"{path}: unexpected token {key!r} in legacy VTK {kind} (unsupported section?)")

    if points is None or len(points) == 0:
        raise ValueError(f"{path}: mesh file has 0 vertices (no POINTS); nothing to load")
    for name, arr in attrs.items():
        if len(arr) != len(points):
            raise ValueError(f"{path}: POINT_DATA {name} has {len(arr)} entries for {len(points)} points")
    faces = np.concatenate(triangles) if has_faces else None
    if faces is not None and faces.size and faces.max() >= len(points):
        raise ValueError(
            f"{path}: a polygon indexes point {faces.max()} but the file has {len(points)} points"
        )
    return points, faces, attrs


# ----------------------------------------------------------------------------------------------
# trimesh formats


def _load_trimesh(path: Path):
    """Load through trimesh, keeping vertex count and order; returns a Trimesh, PointCloud or None."""
    import trimesh  # lazy: ~1 s import, not needed by VTK or in-memory meshes

    try:
        obj = trimesh.load(str(path), process=False, maintain_order=True)
    except Exception as err:  # trimesh raises many types for malformed files
        raise ValueError(f"{path}: trimesh could not read it ({type(err).__name__}: {err})") from err
    if isinstance(obj, trimesh.Scene):
        geoms = [g for g in obj.dump() if len(getattr(g, "vertices", ())) > 0]  # world transforms applied
        if not geoms:
            return None
        if len(geoms) == 1:
            return geoms[0]
        if all(isinstance(g, trimesh.Trimesh) for g in geoms):
            return trimesh.util.concatenate(geoms)  # vertices of geometry k follow those of k - 1
        return trimesh.PointCloud(np.concatenate([np.asarray(g.vertices) for g in geoms]))
    return obj


def _is_trimesh_placeholder(img) -> bool:
    """trimesh gives UV-only OBJs (no material) a 2x2 uniform (100, 100, 100, 255) image: not a texture."""
    arr = np.asarray(img.convert("RGBA"))
    return arr.shape[:2] == (2, 2) and bool((arr == np.array([100, 100, 100, 255], dtype=np.uint8)).all())


def _trimesh_to_arrays(obj, texture: np.ndarray | None):
    import trimesh

    verts = np.asarray(obj.vertices, dtype=np.float64)
    colors = uv = normals = None
    faces = None
    if isinstance(obj, trimesh.PointCloud):
        c = np.asarray(obj.colors)
        if c.shape[0] == len(verts):
            colors = c[:, :3].astype(np.float64) / 255.0
        raw = obj.metadata.get("_ply_raw", {}).get("vertex", {}).get("data", {})
        if all(k in raw for k in ("nx", "ny", "nz")):
            normals = np.concatenate([np.asarray(raw[k]).reshape(-1, 1) for k in ("nx", "ny", "nz")], axis=1)
            if len(normals) != len(verts):
                normals = None
        return verts, faces, colors, uv, normals, texture
    faces = np.asarray(obj.faces, dtype=np.int64)
    visual = obj.visual
    if visual.kind == "vertex":
        colors = np.asarray(visual.vertex_colors)[:, :3].astype(np.float64) / 255.0
    elif visual.kind == "texture" or getattr(visual, "uv", None) is not None:
        if getattr(visual, "uv", None) is not None and len(visual.uv) == len(verts):
            uv = np.asarray(visual.uv, dtype=np.float64)
        if texture is None:
            mat = getattr(visual, "material", None)
            img = getattr(mat, "image", None) if mat is not None else None
            if img is None and mat is not None:
                img = getattr(mat, "baseColorTexture", None)
            if img is not None and not _is_trimesh_placeholder(img):
                texture = np.asarray(img.convert("RGB"))
    return verts, faces, colors, uv, normals, texture


# ----------------------------------------------------------------------------------------------
# public API


def load_mesh(path: str | Path, texture: str | Path | np.ndarray | None = None) -> Mesh:
    """Load a mesh or point cloud with its vertex count and order kept.

    Args:
        path: a ``.obj``, ``.ply``, ``.glb``/``.gltf``, ``.off`` (through trimesh, ``process=False``,
            ``maintain_order=True``) or legacy ASCII VTK polydata ``.vtk`` file.
        texture: colour texture sampled at the per-vertex UVs (v up, image row 0 on top,
            bilinear): a path to an image, an (H, W, 3|4) array (uint8 or float in [0, 1]), or
            None to use an image next to ``path`` with the same stem (.png/.jpg/.jpeg) or the
            file's own material image. Ignored when the file has per-vertex colours or no UVs.
            Per-face colours of a PLY/OBJ are not read (colours None unless per vertex).

    Returns:
        :class:`Mesh` with ``vertices`` (V, 3) float32 in the file's units, ``faces`` (F, 3) int64
        or None (vertices but no faces: a point cloud of V points), ``colors`` (V, 3) in [0, 1] or
        None, ``uv`` (V, 2) or None, ``normals`` (V, 3): area-weighted face normals for meshes,
        the file's normals (if any) for point clouds.

    Raises:
        FileNotFoundError: if ``path`` (or an explicit ``texture`` path) does not exist.
        ValueError: for an unsupported extension (the message lists the supported ones), a file
            with 0 vertices, or a malformed / unsupported file (binary VTK, non-polydata VTK, ...).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mesh file not found: {path}")
    ext = path.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise ValueError(
            f"{path}: unsupported mesh extension {ext!r}; supported: {', '.join(SUPPORTED_EXTENSIONS)}"
        )

    tex: np.ndarray | None = None
    if isinstance(texture, (str, Path)):
        tpath = Path(texture)
        if not tpath.is_file():
            raise FileNotFoundError(f"texture image not found: {tpath}")
        tex = _read_image(tpath)
    elif texture is not None:
        tex = np.asarray(texture)

    if ext == ".vtk":
        verts, faces, attrs = _read_vtk(path)
        colors = attrs.get("colors", attrs.get("scalar_rgb"))
        uv = attrs.get("uv")
        normals = attrs.get("normals")
    else:
        obj = _load_trimesh(path)
        if obj is None or len(obj.vertices) == 0:
            raise ValueError(f"{path}: mesh file has 0 vertices; nothing to load")
        verts, faces, colors, uv, normals, tex = _trimesh_to_arrays(obj, tex)
        if faces is not None and len(faces) == 0:
            faces = None

    if colors is None and uv is not None:
        if tex is None and (found := _find_texture(path)) is not None:
            tex = _read_image(found)
        if tex is not None:
            colors = sample_texture(tex, uv)  # (V, C)
            colors = np.repeat(colors[:, :1], 3, axis=1) if colors.shape[1] < 3 else colors[:, :3]
    if colors is not None:
        colors = np.clip(colors, 0.0, 1.0)
    if faces is not None:
        normals = vertex_normals(verts, faces)
    elif normals is not None:
        n = np.linalg.norm(normals, axis=1, keepdims=True)
        normals = np.divide(normals, n, out=np.zeros_like(normals), where=n > 0)
    return Mesh(vertices=verts, faces=faces, colors=colors, uv=uv, normals=normals)


def sample_surface(mesh: Mesh, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Uniform random points on a triangle mesh's surface (area-weighted triangle choice).

    A triangle is drawn with probability proportional to its area, then a point inside it with
    uniform barycentric coordinates (1 - sqrt(r1), sqrt(r1) (1 - r2), sqrt(r1) r2), r1, r2 ~ U(0, 1)
    (Osada et al., "Shape distributions", ACM TOG 2002). Deterministic for a given seed
    (``numpy.random.default_rng(seed)``).

    Args:
        mesh: a triangle mesh (``faces`` not None) with positive total area.
        n: number of points, >= 1.
        seed: RNG seed.

    Returns:
        points: (n, 3) float32 on the surface, in the mesh's units.
        normals: (n, 3) float32 unit normals of the triangles the points lie on.
        colors: (n, 3) float32 in [0, 1], the vertex colours interpolated barycentrically, or None
            when the mesh has no colours.

    Raises:
        ValueError: if the mesh is a point cloud, has zero area, or ``n`` < 1.
    """
    if mesh.faces is None or mesh.num_faces == 0:
        raise ValueError("sample_surface needs a triangle mesh; this Mesh has no faces (a point cloud)")
    if n < 1:
        raise ValueError(f"sample_surface: n must be >= 1, got {n}")
    areas, face_normals = face_areas_normals(mesh.vertices, mesh.faces)
    total = areas.sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError("sample_surface: the mesh has zero surface area (all triangles degenerate)")
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(areas) / total
    face_idx = np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right")
    face_idx = np.minimum(face_idx, mesh.num_faces - 1)  # (n,)
    r1 = np.sqrt(rng.random(n))
    r2 = rng.random(n)
    bary = np.stack([1.0 - r1, r1 * (1.0 - r2), r1 * r2], axis=1)  # (n, 3)
    corners = mesh.faces[face_idx]  # (n, 3)
    v = mesh.vertices.astype(np.float64)
    points = np.einsum("nk,nkc->nc", bary, v[corners])  # (n, 3)
    colors = None
    if mesh.colors is not None:
        colors = np.einsum("nk,nkc->nc", bary, mesh.colors.astype(np.float64)[corners]).astype(np.float32)
        colors = np.clip(colors, 0.0, 1.0)
    return points.astype(np.float32), face_normals[face_idx].astype(np.float32), colors


def normalize_to_unit_head(mesh: Mesh) -> Mesh:
    """Centre on the bounding-box centre and scale so the largest half-extent is 0.5.

    The canonical space of the avatars is roughly the ball of radius 0.5 (PointAvatar starts its
    points on a sphere of radius 0.5; REFERENCES.md). Normals, colours, UVs and faces are kept
    (a uniform scale does not change normals).

    Args:
        mesh: any mesh or point cloud with a non-degenerate bounding box.

    Returns:
        A new :class:`Mesh` whose bounding box is centred at the origin with max half-extent 0.5.

    Raises:
        ValueError: if all vertices coincide (zero extent) or a vertex is not finite.
    """
    v = mesh.vertices.astype(np.float64)
    if not np.isfinite(v).all():
        raise ValueError("normalize_to_unit_head: the mesh has non-finite vertices")
    lo, hi = v.min(axis=0), v.max(axis=0)
    half = 0.5 * (hi - lo).max()
    if half <= 0:
        raise ValueError("normalize_to_unit_head: all vertices coincide (zero extent); cannot scale")
    centre = 0.5 * (lo + hi)
    return mesh.replace(vertices=((v - centre) * (0.5 / half)).astype(np.float32))
