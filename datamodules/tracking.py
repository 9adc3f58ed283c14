"""Offline face tracking: landmarks, head pose, expression code and head mask (DESIGN.md, "Data").

Per frame, MediaPipe 0.10.21's legacy ``solutions.face_mesh`` (``refine_landmarks=True``: 478
landmarks, the 468 of the face mesh plus 10 iris points) and ``solutions.selfie_segmentation``
run on the RGB frame (:class:`FaceTracker`). Everything else here is plain NumPy.

Landmarks in pixels. MediaPipe returns x, y normalised by the frame width and height (0 = left /
top edge) and a relative depth z "on roughly the same scale as x", smaller = nearer the camera.
We keep them as ``(u, v, d) = (x W, y H, z W)``: u, v continuous pixel coordinates with pixel
centres at +0.5 (the convention of :mod:`models.camera`), d a depth offset in pixels. (u, v, d) is
a right-handed frame with the axes of the OpenCV camera (x right, y down, z forward).

Canonical space (the avatar's world). Right-handed, y up, z out of the face (towards a frontal
camera), x towards the subject's left; one unit = 25 cm, i.e. metres x 4, the scale of
PointAvatar's FLAME head (REFERENCES.md), so a head with hair fits in a sphere of radius ~0.5.
The canonical face is *not* MediaPipe's canonical mesh: that OBJ is not inside the mediapipe
wheel (its ``face_geometry/data`` folder is empty; checked on 0.10.21), and the product must run
without ``../shared``. Instead it is the generalised-Procrustes mean of the video's own
pose-normalised landmarks over the PCA fit frames (:func:`fit_head_poses`), put into a frame
defined by the landmarks (:func:`to_canonical_frame`): x from the right-eye to the left-eye
centroid, y from the chin (152) to the forehead (10) made orthogonal to x, z = x cross y; scaled
so the RMS distance of the 468 mesh landmarks to their centroid is 5.407 cm and shifted so that
centroid sits at (0, -0.676, 4.159) cm: the two figures of MediaPipe's canonical face model, so
the mean face lands where that model would (the tests cross-check it against the OBJ).

Per-frame camera (:func:`lift_landmarks`, :func:`pose_from_points`). Intrinsics come from a
stated horizontal field of view (:func:`intrinsics_from_fov`). A weak-perspective similarity
Procrustes (Umeyama) of the canonical face onto (u, v, d) gives the scale s (pixels per unit) and
so the depth of the face, Z0 = f / s; each landmark is lifted to camera space along its pixel ray
at depth Z0 + (d - d_c) / s. A similarity Procrustes of the canonical face onto the lifted points
gives (s', R, t); since a perspective projection is unchanged when camera-space points are scaled
about the camera centre, the lifted points are divided by s' and ``world_mat = [R | t / s']`` is
rigid. By construction, the pose-normalised landmarks ``R^T (p / s' - t / s')`` project through
(world_mat, K) exactly onto the detected (u, v): the only reprojection error of the tracked
landmarks is the expression code's truncation. Pose uses the half of the 468 mesh landmarks that
move least over the fit frames (forehead, nose, cheekbones), chosen after two rounds with all 468.

Expression (:class:`ExpressionBasis`): PCA of the pose-normalised residuals (landmarks minus
canonical face, 478 x 3 = 1434 numbers) over the fit frames, E components. Another video's
frames are coded as offsets from that video's own mean shape (:func:`expression_codes_for_video`),
so its identity does not leak into the expression.

Head mask (:func:`head_mask`): selfie segmentation (>= 0.5), completed by the face-oval hull
(enlarged 5 %: the segmentation sometimes misses the visible cheek and jaw), intersected with a
head region: the convex hull of the face-oval landmarks, enlarged about their centroid in the
face's own 2D axes (x1.3 sideways, x1.8 upwards for the hair, x1.3 downwards) and cut 0.1 face
heights (forehead 10 to chin 152) below the chin, perpendicular to the face's vertical axis, so
the torso, which does not follow the head's camera, is excluded. DESIGN.md states selfie
segmentation and head region only; the face hull is our addition (see :func:`head_mask`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "NUM_LANDMARKS",
    "NUM_MESH_LANDMARKS",
    "FOREHEAD",
    "CHIN",
    "CANONICAL_UNIT_CM",
    "CANONICAL_RMS_RADIUS",
    "CANONICAL_CENTROID",
    "HEAD_REGION",
    "landmark_sets",
    "FaceTracker",
    "FrameTrack",
    "intrinsics_from_fov",
    "similarity_procrustes",
    "to_canonical_frame",
    "lift_landmarks",
    "pose_from_points",
    "HeadPoses",
    "fit_head_poses",
    "ExpressionBasis",
    "fit_expression_basis",
    "expression_codes_for_video",
    "convex_hull",
    "FACE_MARGIN",
    "head_region",
    "face_region",
    "head_mask",
]

NUM_LANDMARKS = 478  # face mesh 468 + 2 x 5 iris points (refine_landmarks=True)
NUM_MESH_LANDMARKS = 468
FOREHEAD = 10  # top of the face oval, on the midline
CHIN = 152  # bottom of the face oval, on the midline

#: One canonical unit in centimetres (metres x 4, PointAvatar's FLAME scale).
CANONICAL_UNIT_CM = 25.0
#: RMS distance of the 468 mesh landmarks to their centroid, MediaPipe's canonical face: 5.407 cm.
CANONICAL_RMS_RADIUS = 5.407 / CANONICAL_UNIT_CM
#: Centroid of the 468 mesh landmarks in MediaPipe's canonical face: (0, -0.676, 4.159) cm.
CANONICAL_CENTROID = np.array([0.0, -0.676, 4.159]) / CANONICAL_UNIT_CM

#: Head region around the face oval (see the module docstring); face axes, factors about the
#: oval's centroid, and the cut below the chin in face heights.
HEAD_REGION = {"side": 1.3, "up": 1.8, "down": 1.3, "below_chin": 0.1}
#: The face-oval hull, enlarged 5 % about its centroid, always counts as head in the mask.
FACE_MARGIN = 0.05

_GPA_ITERATIONS = 6
_POSE_SELECT_ITERATION = 1  # after this GPA round the stable half of the landmarks is chosen


@functools.lru_cache(maxsize=1)
def landmark_sets() -> dict[str, np.ndarray]:
    """Index sets of MediaPipe's face mesh, from the installed mediapipe's connection tables.

    Returns:
        {"face_oval", "left_eye", "right_eye", "lips", "left_iris", "right_iris"}: sorted int64
        landmark indices, and "tesselation": (M, 2) int64 mesh edges (the 468-vertex mesh).
        "left" is the subject's left (image right in a frontal view).

    Raises:
        ModuleNotFoundError: if mediapipe (the ``tracking`` extra) is not installed.
    """
    fmc = _mediapipe().solutions.face_mesh_connections

    def idx(edges) -> np.ndarray:
        return np.array(sorted({i for e in edges for i in e}), dtype=np.int64)

    return {
        "face_oval": idx(fmc.FACEMESH_FACE_OVAL),
        "left_eye": idx(fmc.FACEMESH_LEFT_EYE),
        "right_eye": idx(fmc.FACEMESH_RIGHT_EYE),
        "lips": idx(fmc.FACEMESH_LIPS),
        "left_iris": idx(fmc.FACEMESH_LEFT_IRIS),
        "right_iris": idx(fmc.FACEMESH_RIGHT_IRIS),
        "tesselation": np.array(sorted(tuple(sorted(e)) for e in fmc.FACEMESH_TESSELATION), dtype=np.int64),
    }


def _mediapipe():
    try:
        import mediapipe
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "tracking needs mediapipe 0.10.21 (the `tracking` extra): pip install 'mediapipe==0.10.21'"
        ) from err
    return mediapipe


# ----------------------------------------------------------------------------------------------
# MediaPipe
# ----------------------------------------------------------------------------------------------


@dataclass
class FrameTrack:
    """What the tracker finds in one frame.

    Attributes:
        landmarks: (478, 3) float64 (u, v, d): pixel coordinates (pixel centres at +0.5) and
            MediaPipe's relative depth scaled by the frame width (pixels, larger = farther).
        segmentation: (H, W) float32 in [0, 1], selfie-segmentation person probability.
    """

    landmarks: np.ndarray
    segmentation: np.ndarray


class FaceTracker:
    """MediaPipe face mesh (478 landmarks) + selfie segmentation on consecutive video frames.

    The face mesh runs in video mode (``static_image_mode=False``): it detects once, then tracks
    from the previous frame's landmarks and re-detects when the face is lost. Use one tracker per
    video, frames in order. Weights ship inside the mediapipe 0.10.21 wheel (no download).

    Args:
        min_detection_confidence: face detector threshold.
        min_tracking_confidence: below this landmark-presence score the face counts as lost.
        selfie_model: 0 = general (256x256 input), 1 = landscape (144x256, the default: made for
            video-call framing and about a third faster).

    Raises:
        ModuleNotFoundError: if mediapipe is missing.
    """

    def __init__(self, min_detection_confidence: float = 0.5, min_tracking_confidence: float = 0.5,
                 selfie_model: int = 1) -> None:
        mp = _mediapipe()
        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=False, max_num_faces=1, refine_landmarks=True,
            min_detection_confidence=min_detection_confidence, min_tracking_confidence=min_tracking_confidence,
        )
        self._seg = mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=selfie_model)

    def __call__(self, frame: np.ndarray) -> FrameTrack | None:
        """Track one frame.

        Args:
            frame: (H, W, 3) uint8 RGB.

        Returns:
            A :class:`FrameTrack`, or None when no face is found.

        Raises:
            ValueError: if ``frame`` is not (H, W, 3) uint8.
        """
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"frame must be (H, W, 3) uint8 RGB, got {frame.shape} {frame.dtype}")
        height, width = frame.shape[:2]
        result = self._mesh.process(frame)
        if not result.multi_face_landmarks:
            return None
        points = result.multi_face_landmarks[0].landmark
        lm = np.array([(p.x, p.y, p.z) for p in points], dtype=np.float64)  # (478, 3) normalised
        if lm.shape[0] != NUM_LANDMARKS or not np.isfinite(lm).all():
            return None
        lm *= np.array([width, height, width], dtype=np.float64)  # (478, 3) pixels
        seg = self._seg.process(frame).segmentation_mask
        return FrameTrack(landmarks=lm, segmentation=np.asarray(seg, dtype=np.float32))

    def close(self) -> None:
        """Release the MediaPipe graphs."""
        self._mesh.close()
        self._seg.close()

    def __enter__(self) -> FaceTracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# Cameras and poses
# ----------------------------------------------------------------------------------------------


def intrinsics_from_fov(width: int, height: int, fov_deg: float) -> np.ndarray:
    """Pinhole intrinsics of a frame from its horizontal field of view.

    fx = fy = (W / 2) / tan(fov / 2) (square pixels), principal point at the frame centre
    (W / 2, H / 2) in the pixel-centres-at-+0.5 convention.

    Args:
        width: frame width in pixels.
        height: frame height in pixels.
        fov_deg: horizontal field of view in degrees, in (0, 180).

    Returns:
        (3, 3) float64 K.

    Raises:
        ValueError: if the size is not positive or the field of view is outside (0, 180).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"frame size must be positive, got {width}x{height}")
    if not 0.0 < fov_deg < 180.0:
        raise ValueError(f"fov must be in (0, 180) degrees, got {fov_deg}")
    f = 0.5 * width / np.tan(np.deg2rad(fov_deg) / 2.0)
    return np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]])


def similarity_procrustes(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None):
    """Weighted similarity Procrustes (Umeyama, PAMI 1991): argmin sum_i w_i |s R src_i + t - dst_i|^2.

    Batched over leading dimensions: ``src`` and ``dst`` broadcast against each other.

    Args:
        src: (..., N, 3) float points.
        dst: (..., N, 3) float points, same order.
        weights: (N,) non-negative weights shared by the batch (None: all 1).

    Returns:
        (s, R, t): scale (...,) float64 > 0 (a Python float when unbatched), (..., 3, 3) float64
        proper rotations (det +1), (..., 3) float64 translations.

    Raises:
        ValueError: on mismatched shapes, fewer than 3 points of positive weight, or degenerate
            (all identical) source points.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape[-2:] != dst.shape[-2:] or src.ndim < 2 or src.shape[-1] != 3:
        raise ValueError(f"src and dst must both be (..., N, 3), got {src.shape} and {dst.shape}")
    n = src.shape[-2]
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or (w < 0).any() or (w > 0).sum() < 3:
        raise ValueError("weights must be (N,) non-negative with at least 3 positive entries")
    w = w / w.sum()
    mu_s = np.einsum("n,...nc->...c", w, src)  # (..., 3)
    mu_d = np.einsum("n,...nc->...c", w, dst)
    a = src - mu_s[..., None, :]  # (..., N, 3)
    b = dst - mu_d[..., None, :]
    cov = np.einsum("n,...ni,...nj->...ij", w, b, a)  # (..., 3, 3) sum_n w_n b_n a_n^T
    u, sig, vt = np.linalg.svd(cov)
    sign = np.ones(sig.shape)
    det = np.linalg.det(u @ vt)
    sign[..., 2] = np.where(det < 0, -1.0, 1.0)
    rot = (u * sign[..., None, :]) @ vt  # (..., 3, 3)
    var_src = np.einsum("n,...n->...", w, (a * a).sum(-1))
    if np.any(var_src <= 0):
        raise ValueError("src points are all identical; cannot fit a similarity")
    scale = (sig * sign).sum(-1) / var_src  # (...,)
    trans = mu_d - scale[..., None] * np.einsum("...ij,...j->...i", rot, mu_s)
    if scale.ndim == 0:
        return float(scale), rot, trans
    return scale, rot, trans


def to_canonical_frame(shape: np.ndarray, sets: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Put a landmark shape into the canonical frame (module docstring): axes from the eyes and the
    forehead-chin line, RMS radius :data:`CANONICAL_RMS_RADIUS`, centroid :data:`CANONICAL_CENTROID`.

    Args:
        shape: (478, 3) or (468, 3) float landmarks in any right-handed frame whose handedness
            matches the camera's (e.g. (u, v, d) pixels or OpenCV camera space).
        sets: :func:`landmark_sets` (looked up when None).

    Returns:
        (same, 3) float64 shape in canonical units.
    """
    sets = landmark_sets() if sets is None else sets
    shape = np.asarray(shape, dtype=np.float64)
    mesh = shape[:NUM_MESH_LANDMARKS]
    centroid = mesh.mean(0)
    x_axis = mesh[sets["left_eye"]].mean(0) - mesh[sets["right_eye"]].mean(0)
    x_axis /= np.linalg.norm(x_axis)
    y_axis = mesh[FOREHEAD] - mesh[CHIN]
    y_axis -= (y_axis @ x_axis) * x_axis
    y_axis /= np.linalg.norm(y_axis)
    z_axis = np.cross(x_axis, y_axis)
    frame = np.stack([x_axis, y_axis, z_axis])  # (3, 3) rows = canonical axes
    out = (shape - centroid) @ frame.T  # (N, 3)
    rms = np.sqrt((out[:NUM_MESH_LANDMARKS] ** 2).sum(1).mean())
    return out * (CANONICAL_RMS_RADIUS / rms) + CANONICAL_CENTROID


def lift_landmarks(landmarks: np.ndarray, K: np.ndarray, canonical: np.ndarray,
                   weights: np.ndarray | None = None) -> np.ndarray:
    """Lift (u, v, d) landmarks to camera space along their pixel rays (module docstring).

    Args:
        landmarks: (..., 478, 3) float (u, v, d) pixels (one frame or a batch of frames).
        K: (3, 3) pixel intrinsics (fx, fy > 0).
        canonical: (478, 3) canonical face, canonical units.
        weights: (468,) weights of the mesh landmarks in the weak-perspective fit (None: all 1).

    Returns:
        (..., 478, 3) float64 OpenCV camera-space points whose projection through K is exactly (u, v).
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    s, _, t = similarity_procrustes(canonical[:NUM_MESH_LANDMARKS], lm[..., :NUM_MESH_LANDMARKS, :], weights)
    s = np.asarray(s)[..., None]  # (..., 1)
    depth = K[0, 0] / s + (lm[..., 2] - t[..., 2:3]) / s  # (..., 478) camera-space z
    x = (lm[..., 0] - K[0, 2]) / K[0, 0] * depth
    y = (lm[..., 1] - K[1, 2]) / K[1, 1] * depth
    return np.stack([x, y, depth], axis=-1)  # (..., 478, 3)


def pose_from_points(points_cam: np.ndarray, canonical: np.ndarray, weights: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Rigid camera of a lifted frame, the similarity scale folded into depth (module docstring).

    Args:
        points_cam: (..., 478, 3) camera-space landmarks (:func:`lift_landmarks`).
        canonical: (478, 3) canonical face.
        weights: (468,) pose weights of the mesh landmarks (None: all 1).

    Returns:
        world_mat: (..., 3, 4) float64 [R | t], R a proper rotation, world (canonical) -> camera.
        normalised: (..., 478, 3) float64 pose-normalised landmarks (canonical units) with
            ``R @ normalised_i + t`` on the ray of landmark i (same projection as points_cam).
    """
    points_cam = np.asarray(points_cam, dtype=np.float64)
    s, rot, trans = similarity_procrustes(canonical[:NUM_MESH_LANDMARKS],
                                          points_cam[..., :NUM_MESH_LANDMARKS, :], weights)
    s = np.asarray(s)[..., None]  # (..., 1)
    t = trans / s  # (..., 3)
    normalised = (points_cam / s[..., None] - t[..., None, :]) @ rot  # (..., 478, 3): R^T (p / s - t)
    return np.concatenate([rot, t[..., :, None]], axis=-1), normalised


@dataclass
class HeadPoses:
    """Result of :func:`fit_head_poses`.

    Attributes:
        canonical: (478, 3) float64 canonical face (GPA mean over the fit frames), canonical units.
        world_mats: (F, 3, 4) float64 rigid world->camera matrices, OpenCV.
        normalised: (F, 478, 3) float64 pose-normalised landmarks.
        pose_weights: (468,) float64 0/1 weights of the landmarks used for the pose.
    """

    canonical: np.ndarray
    world_mats: np.ndarray
    normalised: np.ndarray
    pose_weights: np.ndarray


def fit_head_poses(landmarks: np.ndarray, K: np.ndarray, fit: np.ndarray | None = None,
                   iterations: int = _GPA_ITERATIONS, sets: dict[str, np.ndarray] | None = None) -> HeadPoses:
    """Canonical face by generalised Procrustes over the fit frames, then a camera for every frame.

    Args:
        landmarks: (F, 478, 3) (u, v, d) pixel landmarks of one video.
        K: (3, 3) pixel intrinsics.
        fit: (F,) bool, the frames the canonical face and the pose landmarks are fitted on (None:
            all). Frames outside it get cameras but do not influence the canonical face.
        iterations: GPA rounds (converges in a few; the stable landmarks are picked after round 2).
        sets: landmark index sets with "left_eye" and "right_eye" (None: :func:`landmark_sets`,
            which needs mediapipe; a prepared dataset stores them in ``meta["landmark_sets"]``).

    Returns:
        :class:`HeadPoses`.

    Raises:
        ValueError: on a wrong shape or an empty fit set.
    """
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.ndim != 3 or landmarks.shape[1:] != (NUM_LANDMARKS, 3):
        raise ValueError(f"landmarks must be (F, {NUM_LANDMARKS}, 3), got {landmarks.shape}")
    fit = np.ones(len(landmarks), dtype=bool) if fit is None else np.asarray(fit, dtype=bool)
    if fit.shape != (len(landmarks),) or not fit.any():
        raise ValueError("fit must be an (F,) bool mask selecting at least one frame")
    sets = landmark_sets() if sets is None else {k: np.asarray(v, dtype=np.int64) for k, v in sets.items()}
    fit_lm = landmarks[fit]  # (Ff, 478, 3)
    canonical = to_canonical_frame(fit_lm[0], sets)
    weights = np.ones(NUM_MESH_LANDMARKS)
    for it in range(iterations):
        _, normalised = pose_from_points(lift_landmarks(fit_lm, K, canonical, weights), canonical, weights)
        canonical = to_canonical_frame(normalised.mean(0), sets)
        if it == _POSE_SELECT_ITERATION:
            spread = np.sqrt(((normalised[:, :NUM_MESH_LANDMARKS] - normalised[:, :NUM_MESH_LANDMARKS].mean(0)) ** 2)
                             .sum(2).mean(0))  # (468,) RMS motion of each landmark
            weights = (spread <= np.median(spread)).astype(np.float64)
    world_mats, normalised = pose_from_points(lift_landmarks(landmarks, K, canonical, weights), canonical, weights)
    return HeadPoses(canonical=canonical, world_mats=world_mats, normalised=normalised, pose_weights=weights)


# ----------------------------------------------------------------------------------------------
# Expression
# ----------------------------------------------------------------------------------------------


@dataclass
class ExpressionBasis:
    """PCA of pose-normalised landmark residuals (module docstring).

    Attributes:
        canonical: (478, 3) float64 canonical face C, canonical units.
        mean: (1434,) float64 mean residual over the fit frames (flattened (478, 3), row-major).
        components: (E, 1434) float64 orthonormal rows, by decreasing variance.
        singular_values: (E,) float64 of the centred residual matrix.
        fit_frames: the frame numbers the basis was fitted on.
    """

    canonical: np.ndarray
    mean: np.ndarray
    components: np.ndarray
    singular_values: np.ndarray
    fit_frames: list[int] = field(default_factory=list)

    @property
    def dim(self) -> int:
        """E, the expression dimension."""
        return int(self.components.shape[0])

    def encode(self, normalised: np.ndarray) -> np.ndarray:
        """Codes of this video's frames: components @ (N - C - mean).

        Args:
            normalised: (F, 478, 3) pose-normalised landmarks of the video the basis was fitted on.

        Returns:
            (F, E) float64 codes.
        """
        resid = np.asarray(normalised, dtype=np.float64) - self.canonical  # (F, 478, 3)
        return (resid.reshape(len(resid), -1) - self.mean) @ self.components.T  # (F, E)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Pose-normalised landmarks from codes: C + mean + codes @ components.

        Args:
            codes: (F, E).

        Returns:
            (F, 478, 3) float64.
        """
        flat = self.mean + np.asarray(codes, dtype=np.float64) @ self.components  # (F, 1434)
        return self.canonical + flat.reshape(len(flat), NUM_LANDMARKS, 3)

    def to_json(self) -> dict:
        """JSON-ready dict (lists of floats)."""
        return {
            "layout": "residual = pose-normalised landmarks - canonical, (478, 3) flattened row-major, canonical units",
            "canonical": self.canonical.tolist(),
            "mean": self.mean.tolist(),
            "components": self.components.tolist(),
            "singular_values": self.singular_values.tolist(),
            "fit_frames": [int(f) for f in self.fit_frames],
        }

    @classmethod
    def from_json(cls, data: dict) -> ExpressionBasis:
        """Inverse of :meth:`to_json`."""
        return cls(canonical=np.asarray(data["canonical"], dtype=np.float64),
                   mean=np.asarray(data["mean"], dtype=np.float64),
                   components=np.asarray(data["components"], dtype=np.float64).reshape(-1, NUM_LANDMARKS * 3),
                   singular_values=np.asarray(data["singular_values"], dtype=np.float64),
                   fit_frames=[int(f) for f in data.get("fit_frames", [])])


def fit_expression_basis(normalised: np.ndarray, canonical: np.ndarray, dim: int,
                         fit_frames: list[int] | None = None) -> ExpressionBasis:
    """Fit the expression PCA on the fit frames' pose-normalised landmarks.

    Args:
        normalised: (F, 478, 3) pose-normalised landmarks of the fit frames only.
        canonical: (478, 3) canonical face.
        dim: E, number of components (>= 1).
        fit_frames: frame numbers of those F frames (stored with the basis).

    Returns:
        :class:`ExpressionBasis` with E components.

    Raises:
        ValueError: if dim < 1 or there are fewer than dim + 1 fit frames (a PCA of F frames has
            at most F - 1 meaningful components).
    """
    normalised = np.asarray(normalised, dtype=np.float64)
    if dim < 1:
        raise ValueError(f"expression dimension must be >= 1, got {dim}")
    if len(normalised) < dim + 1:
        raise ValueError(f"an expression PCA of dimension {dim} needs at least {dim + 1} fit frames, got "
                         f"{len(normalised)}; lower --expression-dim or use a longer video")
    resid = (normalised - canonical).reshape(len(normalised), -1)  # (F, 1434)
    mean = resid.mean(0)
    _, sig, vt = np.linalg.svd(resid - mean, full_matrices=False)
    comps = vt[:dim]
    # a deterministic sign per component: its largest-magnitude entry positive
    signs = np.sign(comps[np.arange(dim), np.abs(comps).argmax(1)])
    comps = comps * np.where(signs == 0, 1.0, signs)[:, None]
    return ExpressionBasis(canonical=np.asarray(canonical, dtype=np.float64), mean=mean, components=comps,
                           singular_values=sig[:dim],
                           fit_frames=list(fit_frames) if fit_frames is not None else [])


def expression_codes_for_video(basis: ExpressionBasis, normalised: np.ndarray) -> np.ndarray:
    """Code another video's frames with a subject's basis, as offsets from that video's own mean.

    (Used by reenactment: the driving video's identity, i.e. its mean pose-normalised shape,
    is removed, so only its expression changes reach the avatar.)

    Args:
        basis: the avatar's :class:`ExpressionBasis`.
        normalised: (F, 478, 3) pose-normalised landmarks of the other video (its own
            :func:`fit_head_poses`), canonical units.

    Returns:
        (F, E) float64 codes, components @ (N_f - mean_f N_f); they average to zero over F.

    Raises:
        ValueError: on a wrong shape.
    """
    normalised = np.asarray(normalised, dtype=np.float64)
    if normalised.ndim != 3 or normalised.shape[1:] != (NUM_LANDMARKS, 3):
        raise ValueError(f"normalised must be (F, {NUM_LANDMARKS}, 3), got {normalised.shape}")
    offsets = (normalised - normalised.mean(0)).reshape(len(normalised), -1)  # (F, 1434)
    return offsets @ basis.components.T


# ----------------------------------------------------------------------------------------------
# Head mask
# ----------------------------------------------------------------------------------------------


def convex_hull(points: np.ndarray) -> np.ndarray:
    """2D convex hull by Andrew's monotone chain.

    Args:
        points: (N, 2) float, N >= 3.

    Returns:
        (M, 2) float64 hull vertices, counter-clockwise in a y-up frame (clockwise on screen).
    """
    pts = np.unique(np.asarray(points, dtype=np.float64), axis=0)  # sorted by x, then y
    if len(pts) < 3:
        raise ValueError("a convex hull needs at least 3 distinct points")

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in pts[::-1]:
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1])


def _hull_halfplanes(hull: np.ndarray) -> np.ndarray:
    """(M, 3) rows (a, b, c) with a u + b v + c >= 0 inside a convex polygon of positive signed
    area (:func:`convex_hull`): the cross product (q - p) x (g - p) of each edge p -> q."""
    p, q = hull, np.roll(hull, -1, axis=0)  # (M, 2) edge starts and ends
    a = p[:, 1] - q[:, 1]
    b = q[:, 0] - p[:, 0]
    return np.stack([a, b, -(a * p[:, 0] + b * p[:, 1])], axis=1)


def _fill_halfplanes(planes: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W) bool: pixels whose centre (u + 0.5, v + 0.5) satisfies a u + b v + c >= 0 for every
    row (a, b, c) of ``planes`` (M, 3), solved row by row: on each pixel row the half-planes bound
    u from below (a > 0) or above (a < 0), or hold or fail for the whole row (a = 0)."""
    gy = np.arange(height) + 0.5  # (H,) row centres
    a, b, c = planes[:, 0:1], planes[:, 1:2], planes[:, 2:3]  # (M, 1)
    rhs = -(b * gy + c)  # (M, H): a u >= rhs
    eps = 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = rhs / a  # (M, H)
    lower = np.where(a > eps, bound - 1e-9 / np.maximum(np.abs(a), eps), -np.inf).max(0)  # (H,)
    upper = np.where(a < -eps, bound + 1e-9 / np.maximum(np.abs(a), eps), np.inf).min(0)
    row_ok = np.where(np.abs(a) <= eps, rhs <= 1e-9, True).all(0)  # (H,)
    gx = np.arange(width) + 0.5  # (W,) column centres
    return row_ok[:, None] & (gx[None, :] >= lower[:, None]) & (gx[None, :] <= upper[:, None])


def head_region(landmarks: np.ndarray, height: int, width: int, region: dict | None = None,
                sets: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """The head region of one frame (module docstring): enlarged face-oval hull, cut below the chin.

    A pixel belongs to the region when its centre (u + 0.5, v + 0.5) does.

    Args:
        landmarks: (478, 3) (u, v, d) pixel landmarks.
        height: frame height H.
        width: frame width W.
        region: factors, default :data:`HEAD_REGION`.
        sets: :func:`landmark_sets` (looked up when None).

    Returns:
        (H, W) bool.
    """
    region = HEAD_REGION if region is None else region
    sets = landmark_sets() if sets is None else sets
    uv = np.asarray(landmarks, dtype=np.float64)[:, :2]
    up = uv[FOREHEAD] - uv[CHIN]
    face_height = float(np.linalg.norm(up))
    up /= face_height
    right = np.array([-up[1], up[0]])  # up = (0, -1) on screen -> right = (1, 0)
    oval = uv[sets["face_oval"]]  # (36, 2)
    centre = oval.mean(0)
    a = (oval - centre) @ right  # sideways offsets
    b = (oval - centre) @ up  # upward offsets
    a = a * region["side"]
    b = np.where(b > 0, b * region["up"], b * region["down"])
    planes = _hull_halfplanes(convex_hull(centre + a[:, None] * right + b[:, None] * up))  # (M, 3)
    # the chin cut: (g - chin) . up >= -below_chin * face_height
    chin = uv[CHIN]
    cut = np.array([[up[0], up[1], -(up @ chin) + region["below_chin"] * face_height]])
    return _fill_halfplanes(np.concatenate([planes, cut]), height, width)


def face_region(landmarks: np.ndarray, height: int, width: int, margin: float = FACE_MARGIN,
                sets: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """The face itself: the face-oval hull enlarged by ``margin`` about its centroid.

    Args:
        landmarks: (478, 3) (u, v, d) pixel landmarks.
        height: frame height H.
        width: frame width W.
        margin: relative enlargement (0.05: 5 %).
        sets: :func:`landmark_sets` (looked up when None).

    Returns:
        (H, W) bool.
    """
    sets = landmark_sets() if sets is None else sets
    oval = np.asarray(landmarks, dtype=np.float64)[sets["face_oval"], :2]
    centre = oval.mean(0)
    return _fill_halfplanes(_hull_halfplanes(convex_hull(centre + (1.0 + margin) * (oval - centre))), height, width)


def head_mask(segmentation: np.ndarray, landmarks: np.ndarray, threshold: float = 0.5,
              region: dict | None = None, sets: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Mask = (selfie segmentation >= threshold, or inside :func:`face_region`) and :func:`head_region`.

    The face region is added because the selfie segmentation can miss parts of the visible face
    where it meets a similar background (on the carphone clip it drops the cheek and jaw of
    frames 103-119 down to probability 0.0); the face inside the tracked oval is always head.

    Args:
        segmentation: (H, W) float person probability.
        landmarks: (478, 3) (u, v, d) pixel landmarks.
        threshold: segmentation threshold.
        region: head-region factors (default :data:`HEAD_REGION`).
        sets: :func:`landmark_sets` (looked up when None).

    Returns:
        (H, W) bool.
    """
    height, width = segmentation.shape
    sets = landmark_sets() if sets is None else sets
    person = (segmentation >= threshold) | face_region(landmarks, height, width, sets=sets)
    return person & head_region(landmarks, height, width, region, sets)
