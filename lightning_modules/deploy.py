"""The deployment table: what compression buys on a device (``python -m benchmarks.deploy``).

For each deployable form of the avatar, :func:`deployment_table` writes the files a device would
ship into ``out_dir/<form>/`` and measures them:

=================  ==============================================================================
form               what ships (one ``np.savez_compressed`` file per dtype, named arrays)
=================  ==============================================================================
``teacher``        the teacher's canonical network (geometry + deformer + shading MLPs: the
                   parameters of ``canonical_network_parameters()`` under their state-dict names,
                   weight-norm gains and directions as trained), its N active canonical points and
                   its splat radius
``teacher_table``  the teacher's per-point outputs as a table, no canonical network: points,
                   albedo, normals (its SDF-gradient normals), blendshapes (N, E, 3), offset, splat
                   radius; plus the shading MLP's weights (it reads camera-space normals, so it
                   runs per frame and must ship)
``student``        the student's state dict: both branches, fusion, heads and shading, BatchNorm
                   running statistics (its eval-mode canonical forward reads them), canonical
                   points, splat radius and its per-subject graph (kNN and sampling / upsampling
                   indices per level, what :meth:`models.student.Student.build_graph` makes); no
                   cached outputs
``student_gar``    the student form (``student.*``) + the GAR's EMA generator (``generator_ema.*``)
                   + its mean training z (``z_mean``)
=================  ==============================================================================

Bytes: ``os.path.getsize`` of ``out_dir/<form>/<form>.<dtype>.npz`` for dtype float32 and
float16; floating arrays are cast to the dtype, integer index arrays are stored as int32 in both
(the kNN / sampling indices; N < 2^31), booleans and BatchNorm's ``num_batches_tracked`` counters
are not shipped (nothing at inference reads them).

Costs, on the CPU in float32 (the float16 files are measured for size only):

* one-off, building the avatar on the device once per subject: ``teacher`` = one canonical forward
  with its SDF-gradient normals (``teacher.canonical(method="explicit")``); ``teacher_table`` = 0
  (the table is the result); ``student`` = the kNN graph build (``student.build_graph(points)``,
  timed; its FLOPs are not counted: kNN is per-subject preprocessing, counted apart, DESIGN.md
  "Counting rules") + the canonical forward; ``student_gar`` = the same as ``student`` (the GAR
  reads the student's cached outputs).
* per frame: deform + shade + rasterize one frame from the cached canonical outputs
  (``teacher``, ``teacher_table``, ``student``); ``student_gar`` = the GAR stage's tracked path
  (:meth:`lightning_modules.gar.GARModule.render_meanz`: deformation, the student's shading for a
  residual generator's base image, rasterization at every scale, EMA generator with z = the mean
  training z).

Milliseconds: the median of ``repeats`` calls after one warm-up call, under ``torch.no_grad``,
with torch's current number of threads. FLOPs: fvcore through :mod:`lightning_modules.flops`
(one multiply-add = one flop): ``teacher_flop_target(teacher).canonical(N)`` /
``student_flop_target(student).canonical(N)`` for the one-off cost, their ``per_frame(N)`` for
deform + shade, the rasterizer left out as in every ``flops_per_frame`` figure (its time is in
the milliseconds), and for ``student_gar`` deformation + shading + generator as
:meth:`GARModule.frame_costs` counts them. The ``teacher_table`` frame runs from the float32
file read back (``np.load``), so the table is shown to be enough to render; its render is compared
with the teacher's (``fidelity``).

What the params/FLOPs ratios (student / teacher canonical network) change: the network bytes
(``teacher`` against ``student``) and the one-off build cost. Not the per-frame cost (both models
cache their canonical outputs per subject and run the same deform + shade + rasterize each frame;
their per-frame FLOPs differ only through the shading MLPs' widths, which run per frame and are
not in the canonical FLOPs) and not the table form, which ships no canonical network at all.

The camera of the timed frame is the first test frame of the GAR run's datamodule (its
``config.yaml`` next to ``checkpoints/``, set up without preparing data) when that loads; otherwise
a fixed camera: ``world_mat = [I | (0, 0, 4)]`` (OpenCV: the origin 4 units in front of the camera)
with ``fx = fy = 2.5 S``, ``cx = cy = S / 2`` for the image size S. The table says which.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "DTYPES",
    "FORMS",
    "MARKER",
    "DeployError",
    "default_checkpoint",
    "deployment_table",
    "format_deployment_markdown",
    "prepare_out_dir",
    "write_arrays",
]

#: The deployable forms, in table order.
FORMS = ("teacher", "teacher_table", "student", "student_gar")
#: The floating dtypes every form is written in.
DTYPES = ("float32", "float16")
#: The file that marks an output folder as made by this tool (it may then be written again).
MARKER = ".deploy-table"
#: Focal length of the fixed camera, in units of the image size.
FIXED_FOCAL = 2.5
#: Distance of the fixed camera from the origin (canonical units).
FIXED_DISTANCE = 4.0

RATIO_STATEMENT = (
    "The params/FLOPs ratios (student / teacher canonical network) change two figures only: the network "
    "bytes (teacher against student) and the one-off build cost. They do not change the per-frame cost: "
    "both models cache their canonical outputs per subject and run the same deform + shade + rasterize "
    "each frame. Nor do they change the table form, which ships no canonical network at all."
)

SHIPS = {
    "teacher": "geometry + deformer + shading MLPs, N points, radius",
    "teacher_table": "per-point table (points, albedo, normals, E x 3 blendshapes, offset), radius + shading MLP",
    "student": "student network (+ BN statistics), N points, radius, kNN graph + sampling indices (int32)",
    "student_gar": "student form + GAR EMA generator + mean z",
}

CHANGES_WITH_RATIOS = {
    "teacher": (False, "the reference: its network bytes and one-off cost are the ratios' denominators"),
    "teacher_table": (False, "no canonical network ships: its bytes are N per-point outputs + the shading MLP, "
                             "its one-off cost is 0 and its frame is the teacher's"),
    "student": (True, "network bytes and one-off build scale with the student's parameters and canonical "
                      "FLOPs; the per-frame cost does not (the teacher's deform + shade + rasterize; only its "
                      "narrower shading MLP differs)"),
    "student_gar": (True, "as student for the network bytes and one-off build; the per-frame cost is the GAR "
                          "generator's, which the ratios do not cover"),
}


class DeployError(RuntimeError):
    """An input or output the deployment table cannot use (a one-line message for the CLI)."""


# -- checkpoints and the output folder ------------------------------------------------------------------
def default_checkpoint(runs_root: str | os.PathLike, stage: str) -> Path:
    """``<runs_root>/<stage>/latest/checkpoints/best.ckpt`` when it exists, else ``last.ckpt``.

    Args:
        runs_root: the runs root of a demo or of ``lightning fit`` (``runs/demo``, ``runs``).
        stage: ``teacher``, ``distill`` or ``gar``.

    Returns:
        the checkpoint path.

    Raises:
        DeployError: when neither file exists (the message names ``make demo``).
    """
    folder = Path(runs_root) / stage / "latest" / "checkpoints"
    for name in ("best.ckpt", "last.ckpt"):
        if (folder / name).is_file():
            return folder / name
    flag = {"distill": "student"}.get(stage, stage)
    raise DeployError(
        f"no {stage} checkpoint at {folder}/{{best,last}}.ckpt: make the runs with `make demo` "
        f"(or pass --{flag} CKPT)"
    )


def _check_checkpoint(path: str | os.PathLike, stage: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DeployError(f"no {stage} checkpoint at {path}: make the runs with `make demo`")
    return path


def _check_out_dir(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DeployError(f"{out} exists and is not a folder: pass another --out")
    if out.is_dir() and not (out / MARKER).is_file() and any(out.iterdir()):
        raise DeployError(
            f"{out} exists and was not made by `python -m benchmarks.deploy` (no {MARKER} inside): "
            "pass a new --out folder"
        )
    return out


def prepare_out_dir(out_dir: str | os.PathLike) -> Path:
    """Create ``out_dir`` with the :data:`MARKER` file, or accept one this tool made (or an empty folder).

    Only files this tool names (``<form>/<form>.<dtype>.npz``, ``table.json``, ``table.md``, the
    marker) are ever written inside it; nothing outside it.

    Args:
        out_dir: the output folder.

    Returns:
        its path.

    Raises:
        DeployError: when ``out_dir`` is a file, or a non-empty folder without the marker.
    """
    out = _check_out_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by python -m benchmarks.deploy (lightning_modules/deploy.py); "
                              "it rewrites its own files in this folder\n")
    return out


# -- the arrays of each form -----------------------------------------------------------------------------
def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def _state_arrays(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, np.ndarray]:
    """Floating and integer entries of a state dict (booleans and BatchNorm counters dropped)."""
    arrays = {}
    for key, value in state.items():
        if value.dtype == torch.bool or key.endswith("num_batches_tracked"):
            continue
        arrays[prefix + key] = _numpy(value)
    return arrays


def _prefixed_state(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def _teacher_arrays(teacher) -> dict[str, np.ndarray]:
    state = {**_prefixed_state(teacher.geometry, "geometry"), **_prefixed_state(teacher.deformer, "deformer"),
             **_prefixed_state(teacher.shading, "shading")}
    return {"points": _numpy(teacher.active_points()), "radius": _numpy(teacher.radius), **_state_arrays(state)}


def _table_arrays(teacher, canonical) -> dict[str, np.ndarray]:
    arrays = {name: _numpy(getattr(canonical, name)) for name in ("points", "albedo", "normals", "blendshapes", "offset")}
    arrays["radius"] = _numpy(teacher.radius)
    arrays.update(_state_arrays(_prefixed_state(teacher.shading, "shading")))
    return arrays


def _student_arrays(student, prefix: str = "") -> dict[str, np.ndarray]:
    return _state_arrays(student.state_dict(), prefix)


def _gar_arrays(gar) -> dict[str, np.ndarray]:
    return {**_student_arrays(gar.student, "student."), **_state_arrays(_prefixed_state(gar.generator_ema, "generator_ema")),
            "z_mean": _numpy(gar.z_mean)}


def write_arrays(path: str | os.PathLike, arrays: dict[str, np.ndarray], dtype: str) -> dict[str, int]:
    """Write ``arrays`` as one ``np.savez_compressed`` file: floating arrays cast to ``dtype``, integer ones to int32.

    Args:
        path: the ``.npz`` file to write (its folder must exist).
        arrays: name -> array (float, or integer indices).
        dtype: ``float32`` or ``float16``.

    Returns:
        ``{"bytes": file size, "raw_bytes": sum of the stored arrays' nbytes, "numbers": values
        stored, "float16_overflow": values that became infinite in the cast}``.

    Raises:
        ValueError: an unknown dtype, an array of another kind, or an index outside int32.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    stored: dict[str, np.ndarray] = {}
    overflow = 0
    for name, array in arrays.items():
        array = np.asarray(array)
        if np.issubdtype(array.dtype, np.floating):
            cast = array.astype(dtype)
            overflow += int(np.count_nonzero(~np.isfinite(cast) & np.isfinite(array)))
        elif np.issubdtype(array.dtype, np.integer):
            info = np.iinfo(np.int32)
            if array.size and (array.min() < info.min or array.max() > info.max):
                raise ValueError(f"{name}: indices outside int32")
            cast = array.astype(np.int32)
        else:
            raise ValueError(f"{name}: cannot ship an array of dtype {array.dtype}")
        stored[name] = cast
    np.savez_compressed(path, **stored)
    return {
        "bytes": os.path.getsize(path),
        "raw_bytes": int(sum(a.nbytes for a in stored.values())),
        "numbers": int(sum(a.size for a in stored.values())),
        "float16_overflow": overflow,
    }


# -- timing and the frame ---------------------------------------------------------------------------------
def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1000.0 * (time.perf_counter() - start))
    return float(statistics.median(times))


def _fixed_camera(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    world_mat = torch.eye(3, 4)[None].clone()
    world_mat[0, 2, 3] = FIXED_DISTANCE
    f = FIXED_FOCAL * size
    K = torch.tensor([[[f, 0.0, size / 2], [0.0, f, size / 2], [0.0, 0.0, 1.0]]])
    return world_mat, K


def _frame(gar_ckpt: Path, expression_dim: int, run_size: int, image_size: int | None):
    """(world_mat (1, 3, 4), K (1, 3, 3), expression (1, E), image size S, camera description)."""
    config = gar_ckpt.resolve().parent.parent / "config.yaml"
    try:  # named relative to the working folder where it lies inside it (no machine paths in reports)
        config = config.relative_to(Path.cwd().resolve())
    except ValueError:
        pass
    reason = f"no {config}"
    if config.is_file():
        try:
            from lightning_modules.handoff import datamodule_from_config

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                datamodule = datamodule_from_config(config)
                datamodule.setup("test")  # no prepare_data: never prepares a dataset here
                batch = next(iter(datamodule.test_dataloader())).head(1)
            size = int(batch.image.shape[-1])
            world_mat, K, expression = batch.world_mat[:, :3].float(), batch.K.float(), batch.expression.float()
            if expression.shape[1] != expression_dim:
                raise ValueError(f"its frames have E = {expression.shape[1]}, the models {expression_dim}")
            camera = f"first test frame (frame {int(batch.frame_index[0])}) of the GAR run's datamodule ({config})"
            if image_size is not None and int(image_size) != size:
                K = K.clone()
                K[:, :2] = K[:, :2] * (int(image_size) / size)  # pixel centres at +0.5 scale with the image
                camera += f", intrinsics scaled from {size} px to {int(image_size)} px"
                size = int(image_size)
            return world_mat, K, expression, size, camera
        except Exception as err:  # noqa: BLE001 - any failure falls back to the fixed camera, said in the table
            reason = f"{config} gave no frame ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    size = int(image_size) if image_size is not None else int(run_size)
    world_mat, K = _fixed_camera(size)
    camera = (f"fixed camera (world_mat = [I | (0, 0, {FIXED_DISTANCE:g})], OpenCV, looking at the origin; "
              f"fx = fy = {FIXED_FOCAL:g} S, S = {size} px), zero expression: {reason}")
    return world_mat, K, torch.zeros(1, expression_dim), size, camera


class _TableFrame(nn.Module):
    """One frame of the table form: deformation and shading from the stored per-point outputs.

    Args:
        table: name -> tensor from the shipped file (points, albedo, normals, blendshapes, offset, radius).
        shading: the shading MLP rebuilt from the file's ``shading.*`` arrays.
    """

    def __init__(self, table: dict[str, torch.Tensor], shading: nn.Module) -> None:
        super().__init__()
        self.shading = shading
        for name in ("points", "albedo", "normals", "blendshapes", "offset", "radius"):
            self.register_buffer(name, table[name])

    def forward(self, expression: torch.Tensor, world_mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: expression (B, E), world_mat (B, 3, 4). Returns: points (B, N, 3), colours (B, N, 3)."""
        from models.frame import deform_points, shade_points

        points = deform_points(self.points, self.offset, self.blendshapes, expression)
        return points, shade_points(self.shading, self.normals, self.albedo, world_mat)[0]


def _load_table(path: Path) -> _TableFrame:
    """The table form read back from its ``.npz`` (float32 tensors whatever the stored dtype)."""
    from models.teacher import ShadingNetwork

    with np.load(path) as data:
        arrays = {name: torch.from_numpy(data[name].astype(np.float32)) for name in data.files}
    state = {k[len("shading."):]: v for k, v in arrays.items() if k.startswith("shading.")}
    depth = len({k.split(".")[1] for k in state}) - 1
    shading = ShadingNetwork(width=int(state["layers.0.bias"].shape[0]), depth=depth)
    shading.load_state_dict(state)
    return _TableFrame(arrays, shading).eval()


def _rasterize(points, colors, world_mat, K, size: int, radius, points_per_pixel: int) -> torch.Tensor:
    from models.camera import pixel_radius
    from models.rasterizer import rasterize_points

    r_px = pixel_radius(points, world_mat, K, radius)
    return rasterize_points(points, colors, world_mat, K, size, r_px, points_per_pixel, background=1.0).image


# -- the table --------------------------------------------------------------------------------------------
def _load_models(teacher_ckpt: Path, student_ckpt: Path, gar_ckpt: Path):
    from lightning_modules.gar import GARModule
    from lightning_modules.handoff import load_student
    from lightning_modules.teacher import TeacherModule

    loaders = (
        ("teacher", teacher_ckpt, lambda: TeacherModule.load_from_checkpoint(str(teacher_ckpt), map_location="cpu")),
        ("distill", student_ckpt, lambda: load_student(str(student_ckpt))),
        ("gar", gar_ckpt, lambda: GARModule.load_from_checkpoint(str(gar_ckpt), map_location="cpu",
                                                                  student_ckpt=str(student_ckpt))),
    )
    loaded = []
    for stage, path, load in loaders:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded.append(load().eval())
        except Exception as err:  # noqa: BLE001 - one line naming the file, for the CLI
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise DeployError(f"{path} is not a usable {stage} checkpoint ({type(err).__name__}: {first})") from err
    return tuple(loaded)


def _flops(fn: Callable[[], Any]) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter
        return int(fn().total)


@torch.no_grad()
def deployment_table(
    teacher_ckpt: str | os.PathLike,
    student_ckpt: str | os.PathLike,
    gar_ckpt: str | os.PathLike,
    out_dir: str | os.PathLike,
    image_size: int | None = None,
    repeats: int = 5,
) -> dict:
    """Write every deployable form into ``out_dir/<form>/`` and measure bytes, one-off and per-frame cost.

    What each form ships, how bytes, milliseconds and FLOPs are counted: the module docstring.
    Files: ``out_dir/<form>/<form>.<dtype>.npz`` for each form of :data:`FORMS` and dtype of
    :data:`DTYPES`, plus ``out_dir/table.json`` (this dict) and ``out_dir/table.md``
    (:func:`format_deployment_markdown`) and the marker file.

    Args:
        teacher_ckpt: a teacher stage checkpoint (``TeacherModule``).
        student_ckpt: a distillation checkpoint (its ``student`` entry, :func:`~lightning_modules.handoff.load_student`).
        gar_ckpt: a GAR stage checkpoint trained on that student.
        out_dir: output folder: new, empty, or made by this tool (:func:`prepare_out_dir`).
        image_size: S of the timed frame (pixels, square); default the frame's (or the GAR run's).
            The GAR's generator needs S divisible by 2^(num_scales - 1).
        repeats: timed calls per figure (>= 1); the median is reported.

    Returns:
        dict with
        ``forms``: form -> ``ships``, ``num_points``, ``params`` (network parameters shipped),
        ``numbers`` (values stored), ``arrays`` (named arrays per file), per dtype ``files``,
        ``bytes`` and ``raw_bytes``, ``float16_overflow``, ``one_off`` and ``per_frame`` (``ms``,
        ``flops``, ``what``; the student's one-off also ``parts``), ``changes_with_ratios``
        (``changes`` bool, ``explanation``), and for ``teacher_table`` ``fidelity`` (max
        |render - teacher's render| per dtype, colours in [0, 1]);
        ``ratios``: student / teacher ``params``, ``canonical_flops`` (at the student's N),
        ``network_bytes_float32`` (the two files), ``one_off_ms``, ``per_frame_flops``, ``per_frame_ms``;
        ``ratio_statement``: which figures those ratios change, with the numbers;
        ``camera``, ``image_size``, ``repeats``, ``threads``, ``index_dtype`` (``int32``), ``dtypes``,
        ``checkpoints``, ``out_dir`` and ``notes``.
        Bytes are ``os.path.getsize`` of the written files, ms floats, FLOPs ints.

    Raises:
        ValueError: ``repeats`` < 1, or an ``image_size`` < 1 or not divisible by 2^(num_scales - 1).
        DeployError: a missing or unusable checkpoint, or an ``out_dir`` this tool may not write.
    """
    from lightning_modules.flops import count_flops, student_flop_target, teacher_flop_target

    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if image_size is not None and int(image_size) < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size!r}")
    paths = {stage: _check_checkpoint(p, stage) for stage, p in
             (("teacher", teacher_ckpt), ("distill", student_ckpt), ("gar", gar_ckpt))}
    _check_out_dir(out_dir)  # before the slow part; created once the models have loaded
    teacher_module, student, gar = _load_models(paths["teacher"], paths["distill"], paths["gar"])
    teacher = teacher_module.teacher
    if student.expression_dim != teacher.expression_dim:
        raise DeployError(f"the student's E = {student.expression_dim} differs from the teacher's {teacher.expression_dim}")
    world_mat, K, expression, size, camera = _frame(paths["gar"], teacher.expression_dim,
                                                    int(gar.hparams.image_size), image_size)
    step = 2 ** (int(gar.generator_ema.num_scales) - 1)
    if size % step:
        raise ValueError(f"image_size {size} must be divisible by {step} (the GAR's {gar.generator_ema.num_scales} scales)")
    out = prepare_out_dir(out_dir)

    canonical = teacher.canonical(method="explicit")  # per subject, with its SDF-gradient normals
    cached = student.canonical()
    arrays = {
        "teacher": _teacher_arrays(teacher),
        "teacher_table": _table_arrays(teacher, canonical),
        "student": _student_arrays(student),
        "student_gar": _gar_arrays(gar),
    }
    params = {
        "teacher": sum(p.numel() for p in teacher.canonical_network_parameters()),
        "teacher_table": sum(p.numel() for p in teacher.shading.parameters()),
        "student": sum(p.numel() for p in student.canonical_network_parameters()),
        "student_gar": sum(p.numel() for p in (*gar.student.canonical_network_parameters(),
                                                 *gar.generator_ema.parameters())),
    }
    forms: dict[str, dict] = {}
    for form in FORMS:
        folder = out / form
        folder.mkdir(exist_ok=True)
        entry: dict[str, Any] = {"ships": SHIPS[form], "params": int(params[form]), "files": {}, "bytes": {},
                                 "raw_bytes": {}, "float16_overflow": 0}
        for dtype in DTYPES:
            path = folder / f"{form}.{dtype}.npz"
            written = write_arrays(path, arrays[form], dtype)
            entry["files"][dtype] = str(path)
            entry["bytes"][dtype] = written["bytes"]
            entry["raw_bytes"][dtype] = written["raw_bytes"]
            entry["numbers"] = written["numbers"]
            entry["arrays"] = len(arrays[form])
            if dtype == "float16":
                entry["float16_overflow"] = written["float16_overflow"]
        forms[form] = entry
    forms["teacher"]["num_points"] = forms["teacher_table"]["num_points"] = int(canonical.points.shape[0])
    forms["student"]["num_points"] = int(student.num_points)
    forms["student_gar"]["num_points"] = int(gar.student.num_points)

    # -- one-off: building the avatar on the device ------------------------------------------------------
    t_target, s_target = teacher_flop_target(teacher), student_flop_target(student)
    forms["teacher"]["one_off"] = {
        "ms": _median_ms(lambda: teacher.canonical(method="explicit"), repeats),
        "flops": _flops(lambda: t_target.canonical(forms["teacher"]["num_points"])),
        "what": "one canonical forward: geometry with SDF-gradient normals (explicit Jacobian) + deformer",
    }
    forms["teacher_table"]["one_off"] = {"ms": 0.0, "flops": 0, "what": "none: the table is the canonical output"}
    graph_ms, forward_ms, total_ms = [], [], []
    points = student.points
    student.build_graph(points)  # warm-up
    student.forward_canonical(points, *student.graph.tensors())
    for _ in range(repeats):
        start = time.perf_counter()
        graph = student.build_graph(points)
        middle = time.perf_counter()
        student.forward_canonical(points, *graph.tensors())
        end = time.perf_counter()
        graph_ms.append(1000 * (middle - start))
        forward_ms.append(1000 * (end - middle))
        total_ms.append(1000 * (end - start))
    student_one_off = {
        "ms": float(statistics.median(total_ms)),
        "flops": _flops(lambda: s_target.canonical(forms["student"]["num_points"])),
        "what": "kNN graph build (timed; its FLOPs not counted: per-subject preprocessing) + canonical forward",
        "parts": {"knn_graph_ms": float(statistics.median(graph_ms)), "canonical_forward_ms": float(statistics.median(forward_ms)),
                  "knn_graph_flops": None},
    }
    forms["student"]["one_off"] = student_one_off
    forms["student_gar"]["one_off"] = {**student_one_off, "what": "the same as student (the GAR reads the "
                                       "student's cached canonical outputs)"}

    # -- per frame ----------------------------------------------------------------------------------------
    ppp_teacher = int(teacher_module.hparams.points_per_pixel)
    ppp_student = int(gar.hparams.points_per_pixel)

    def teacher_frame():
        posed = teacher.deform(canonical, expression)
        return _rasterize(posed, teacher.shade(canonical, world_mat), world_mat, K, size, teacher.radius, ppp_teacher)

    table = _load_table(Path(forms["teacher_table"]["files"]["float32"]))

    def table_frame(model: _TableFrame = table):
        posed, colors = model(expression, world_mat)
        return _rasterize(posed, colors, world_mat, K, size, model.radius, ppp_teacher)

    def student_frame():
        out_s = student(expression, world_mat, canonical=cached)
        return _rasterize(out_s["points"], out_s["colors"], world_mat, K, size, student.radius, ppp_student)

    from datamodules.batch import AvatarBatch

    frame = AvatarBatch(image=torch.zeros(1, 3, size, size), mask=torch.ones(1, 1, size, size), world_mat=world_mat,
                        K=K, expression=expression, frame_index=torch.zeros(1, dtype=torch.long))
    teacher_frame_flops = _flops(lambda: t_target.per_frame(forms["teacher"]["num_points"]))
    forms["teacher"]["per_frame"] = {"ms": _median_ms(teacher_frame, repeats), "flops": teacher_frame_flops,
                                     "what": "deform + shade (FLOPs) + rasterize (timed only)"}
    forms["teacher_table"]["per_frame"] = {
        "ms": _median_ms(table_frame, repeats),
        "flops": _flops(lambda: count_flops(table, (expression, world_mat))),
        "what": "deform + shade from the table read back from its float32 file (FLOPs) + rasterize (timed only)",
    }
    forms["student"]["per_frame"] = {
        "ms": _median_ms(student_frame, repeats),
        "flops": _flops(lambda: s_target.per_frame(forms["student"]["num_points"])),
        "what": "deform + shade (FLOPs) + rasterize (timed only)",
    }
    gar_canonical = gar.student_canonical()
    inputs = gar.raster_inputs(frame, expression)
    z = gar.z_mean.expand(1, -1)
    gar_flops = _flops(lambda: count_flops(gar.student.deform, (gar_canonical, expression)))
    if gar.generator_ema.residual:  # the residual generator's base image needs the student's colours
        gar_flops += _flops(lambda: count_flops(gar.student.shade, (gar_canonical, world_mat)))
    gar_flops += _flops(lambda: count_flops(gar.generator_ema, (inputs.inputs, z, inputs.base)))
    forms["student_gar"]["per_frame"] = {
        "ms": _median_ms(lambda: gar.render_meanz(frame), repeats),
        "flops": gar_flops,
        "what": (f"GAR tracked path, z = mean training z: deform + {'student shading + ' if gar.generator_ema.residual else ''}"
                 f"EMA generator (FLOPs) + rasterization at {int(gar.generator_ema.input_scales)} scale(s) (timed only)"),
    }

    # -- fidelity of the table, both dtypes ---------------------------------------------------------------
    reference = teacher_frame()
    fidelity = {}
    for dtype in DTYPES:
        model = table if dtype == "float32" else _load_table(Path(forms["teacher_table"]["files"][dtype]))
        fidelity[dtype] = float((table_frame(model) - reference).abs().max())
    forms["teacher_table"]["fidelity"] = fidelity

    for form in FORMS:
        changes, why = CHANGES_WITH_RATIOS[form]
        forms[form]["changes_with_ratios"] = {"changes": changes, "explanation": why}

    ratios = {
        "params": params["student"] / params["teacher"],
        "canonical_flops": forms["student"]["one_off"]["flops"] / forms["teacher"]["one_off"]["flops"],
        "network_bytes_float32": forms["student"]["bytes"]["float32"] / forms["teacher"]["bytes"]["float32"],
        "one_off_ms": forms["student"]["one_off"]["ms"] / forms["teacher"]["one_off"]["ms"],
        "per_frame_flops": forms["student"]["per_frame"]["flops"] / forms["teacher"]["per_frame"]["flops"],
        "per_frame_ms": forms["student"]["per_frame"]["ms"] / forms["teacher"]["per_frame"]["ms"],
    }
    widths = (int(student.shading.layers[0].bias.shape[0]), int(teacher.shading.layers[0].bias.shape[0]))
    statement = (
        f"{RATIO_STATEMENT} Here, student / teacher: parameters {ratios['params']:.3g}, canonical FLOPs "
        f"{ratios['canonical_flops']:.3g} -> network bytes (float32) {ratios['network_bytes_float32']:.3g}, "
        f"one-off ms {ratios['one_off_ms']:.3g}; per-frame ms {ratios['per_frame_ms']:.3g} (mostly "
        f"rasterization); the per-frame FLOPs ({ratios['per_frame_flops']:.3g}) differ only through the "
        f"shading MLP's width ({widths[0]} against {widths[1]}), which runs per frame and is not in the "
        "canonical FLOPs."
    )
    result = {
        "forms": forms,
        "ratios": ratios,
        "ratio_statement": statement,
        "camera": camera,
        "image_size": size,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "dtypes": list(DTYPES),
        "index_dtype": "int32",
        "checkpoints": {stage: str(p) for stage, p in paths.items()},
        "out_dir": str(out),
        "notes": [
            "bytes: os.path.getsize of one np.savez_compressed file per form and dtype (per-array zip and .npy "
            "headers included); floating arrays cast to the dtype, integer index arrays (kNN, sampling, "
            "upsampling) stored as int32 in both",
            "ms: median of the repeats after one warm-up, CPU, float32, torch.no_grad; FLOPs: fvcore, one "
            "multiply-add = one flop",
            "one-off: teacher = canonical forward with SDF-gradient normals; student = kNN graph build (timed, "
            "FLOPs not counted: per-subject preprocessing, DESIGN.md) + canonical forward",
            "per frame: FLOPs = deform + shade (+ GAR generator), the rasterizer excluded as in every "
            "flops_per_frame; its time is in the ms",
            "teacher_table fidelity: max |render - teacher render| (colour in [0, 1]) of the table read back: "
            + ", ".join(f"{d} {v:.2g}" for d, v in fidelity.items()),
        ],
    }
    (out / "table.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "table.md").write_text(format_deployment_markdown(result))
    return result


# -- Markdown ---------------------------------------------------------------------------------------------
def _si(value: float | int | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if value == 0:
        return f"0{unit}"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g}{' ' + unit if unit else ''}"


def _bytes(value: int) -> str:
    if value < 1024:
        return f"{value} B"
    exponent = min(int(math.log(value, 1024)), 3)
    return f"{value:,} ({value / 1024 ** exponent:.3g} {('B', 'KiB', 'MiB', 'GiB')[exponent]})"


def _ms(value: float) -> str:
    return "0" if value == 0 else f"{value:.3g}"


def format_deployment_markdown(table: dict) -> str:
    """The deployment table as Markdown: one row per form, then the camera, the notes and the ratio sentence.

    Args:
        table: the dict :func:`deployment_table` returns (or its JSON read back).

    Returns:
        Markdown text ending in a newline.

    Raises:
        KeyError: when ``table`` lacks a key :func:`deployment_table` writes.
    """
    rows = [
        "| form | ships | N | float32 bytes | float16 bytes | one-off ms | one-off FLOPs | per-frame ms "
        "| per-frame FLOPs | changes with the params/FLOPs ratios |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for form, entry in table["forms"].items():
        one, frame, changes = entry["one_off"], entry["per_frame"], entry["changes_with_ratios"]
        one_ms = _ms(one["ms"])
        if "parts" in one:
            one_ms += f" (kNN {_ms(one['parts']['knn_graph_ms'])} + forward {_ms(one['parts']['canonical_forward_ms'])})"
        rows.append(
            f"| {form} | {entry['ships']} | {entry['num_points']:,} | {_bytes(entry['bytes']['float32'])} "
            f"| {_bytes(entry['bytes']['float16'])} | {one_ms} | {_si(one['flops'])} | {_ms(frame['ms'])} "
            f"| {_si(frame['flops'])} | {'yes' if changes['changes'] else 'no'}: {changes['explanation']} |"
        )
    lines = [
        *rows,
        "",
        f"**{table['ratio_statement']}**",
        "",
        f"Frame: {table['camera']}; {table['image_size']} x {table['image_size']} px, {table['repeats']} repeats, "
        f"{table['threads']} thread{'' if table['threads'] == 1 else 's'}. Index arrays: {table['index_dtype']}.",
        "",
        *(f"- {note}" for note in table["notes"]),
    ]
    return "\n".join(lines) + "\n"
