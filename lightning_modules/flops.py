"""FLOP counting for the params/FLOPs report (DESIGN.md, "Counting rules"; REFERENCES.md, "Counting").

Everything is counted by fvcore's :class:`~fvcore.nn.FlopCountAnalysis` (a ``torch.jit`` trace;
**one multiply-add = one flop**) with the handles below registered on top of fvcore's defaults.

Counting rules (per operator of the traced graph):

=========================================  ===================================================
operators                                  flops
=========================================  ===================================================
linear, addmm, mm, matmul, bmm, einsum,    fvcore's handles: one per multiply-add (a Linear
convolution, batch/group/layer norm, ...   C_in -> C_out on N points: N C_in C_out; no bias)
scatter_add(_), index_add(_),              one per reduced element = ``src.numel()``: each
scatter_reduce(_), index_reduce(_),        source element is combined once into its segment
torch_scatter::scatter_max/min/mul,        (sum, mean, max, min alike); ``bincount`` one per
torch_scatter::segment_*_{csr,coo},        index (the counts of a mean), so the torch and the
bincount                                   torch-scatter backends of :mod:`models.ops` agree
dense reductions: sum, mean, amax, amin,   one per input element, like a scatter reduction:
max/min over a dim, argmax, argmin,        the same pooling written as gather + max or as a
norm, linalg_vector_norm, softmax,         scatter costs the same (fvcore's own
log_softmax, logsumexp, cumsum, prod       adaptive_avg_pool2d handle counts the same way)
gather, index (``x[idx]``), index_select,  0: data movement, no arithmetic (decided here; the
take_along_dim, embedding, torch_scatter   gathers of kNN features would otherwise dominate a
gather_csr/coo, index_put, scatter (copy)  point network's count without computing anything)
element-wise arithmetic and activations    0: fvcore's convention (only multiply-adds and
(add, mul, sigmoid, softplus, sin, ...)    reductions count)
weight-norm reparametrisation              0: folded into the weights for inference; it does
(``_weight_norm``)                         not depend on the number of points
anything else (topk, sort, torch_cluster   0, listed in ``FlopReport.unsupported``: kNN and
knn/fps, unknown custom ops)               FPS are per-subject preprocessing, counted apart
=========================================  ===================================================

Zero-flop operators we recognise are not "unsupported": :attr:`FlopReport.zero_flop_ops` lists how
often each was seen, so the decision stays visible.

The teacher's normals. Its canonical normals are the normalised SDF gradient, computed in
training by ``torch.autograd.grad``, which neither fvcore's tracer nor
``torch.utils.flop_counter.FlopCounterMode`` can follow. We count the explicit-Jacobian copy of
that branch instead, :meth:`models.teacher.GeometryNetwork.forward_with_gradient` (the same
gradient written out as a reverse pass of plain matmuls: one extra (N, d_out) x (d_out, d_in)
product per hidden layer, i.e. the forward cost of every layer but the last), traced by fvcore;
:func:`teacher_canonical_flops` cross-checks that count against ``torch.utils.flop_counter``'s formulas (which count
2 flops per multiply-add: halved) on the same explicit path and raises if they differ.

What is counted (DESIGN.md: "one forward of the canonical network on the same canonical cloud of
N points"):

* canonical (``flops/<model>`` at N = 10,000, ``flops_run/<model>`` at the run's own N):
  everything that depends only on the canonical points: teacher = geometry MLP with its
  SDF-gradient normals + deformer MLP; student = both branches, fusion and heads. The shading
  MLP is *not* in it: it reads camera-space normals, so it runs per frame.
* per frame (``flops_per_frame/<model>/tracked`` at the run's N, one frame): deformation
  (x + o + sum_e psi_e B_e), rotating the normals into the camera and the shading MLP of that
  camera's normals, colour. The rasterizer is left out for both models (the same renderer for
  both, not part of either model; its time is in ``ms_per_frame``).
* parameters (``params/<model>``): trainable parameters of the canonical network as DESIGN.md
  defines it (teacher: geometry + deformer + shading, so the shading MLP is in the parameter
  count although its flops are per frame); adapters, GAR and rasterizer apart.

The :class:`FlopCounter` callback asks the stage module for its models through
``flop_targets() -> dict[str, FlopTarget]`` and writes the counts into the run's metrics.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_modules.run_folder import record_metrics
from models.student import PointStudent, StudentCanonical
from models.teacher import CanonicalOutput, GeometryNetwork, PointAvatarTeacher, fibonacci_sphere

__all__ = [
    "DATA_MOVEMENT_OPS",
    "ELEMENTWISE_OPS",
    "REDUCTION_OPS",
    "REFERENCE_POINTS",
    "SCATTER_OPS",
    "FlopCounter",
    "FlopReport",
    "FlopTarget",
    "TeacherCanonicalNetwork",
    "TeacherFrameNetwork",
    "count_flops",
    "flop_counter_macs",
    "multiply_adds",
    "flop_handles",
    "sphere_points",
    "student_flop_target",
    "teacher_canonical_flops",
    "teacher_flop_target",
    "teacher_frame_flops",
]

#: N of ``flops/<model>`` (the basis of ``flops_ratio``), DESIGN.md "metrics.json".
REFERENCE_POINTS = 10_000

#: Scatter-style reductions: one flop per source element. Value: position of the source tensor
#: among the operator's inputs.
SCATTER_OPS: dict[str, int] = {
    "aten::scatter_add": 3,
    "aten::scatter_add_": 3,
    "aten::index_add": 3,
    "aten::index_add_": 3,
    "aten::scatter_reduce": 3,
    "aten::scatter_reduce_": 3,
    "aten::index_reduce": 3,
    "aten::index_reduce_": 3,
    "aten::bincount": 0,
    "torch_scatter::scatter_max": 0,
    "torch_scatter::scatter_min": 0,
    "torch_scatter::scatter_mul": 0,
    **{f"torch_scatter::segment_{r}_{layout}": 0 for r in ("sum", "mean", "min", "max") for layout in ("csr", "coo")},
}

#: Dense reductions: one flop per input element (``max``/``min`` only in their reducing forms;
#: the element-wise ``max(a, b)`` is element-wise).
REDUCTION_OPS = frozenset(
    f"aten::{name}"
    for name in (
        "sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin", "norm", "linalg_vector_norm",
        "frobenius_norm", "softmax", "log_softmax", "_softmax", "_log_softmax", "logsumexp", "cumsum", "prod",
    )
)

#: Data movement: 0 flops (recorded in ``zero_flop_ops``).
DATA_MOVEMENT_OPS = frozenset(
    [
        *(f"aten::{name}" for name in (
            "gather", "index", "index_select", "take_along_dim", "embedding", "index_put", "index_put_",
            "scatter", "scatter_", "masked_select", "masked_scatter", "repeat", "repeat_interleave",
            "expand_as", "flip", "clone", "tile", "pad", "reflection_pad2d", "replication_pad2d",
        )),
        "torch_scatter::gather_csr",
        "torch_scatter::gather_coo",
    ]
)

#: Element-wise arithmetic, comparisons, activations, random numbers and the weight-norm
#: reparametrisation: 0 flops (recorded in ``zero_flop_ops``).
ELEMENTWISE_OPS = frozenset(
    f"aten::{name}"
    for name in (
        "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "true_divide", "true_divide_",
        "neg", "reciprocal", "pow", "square", "sqrt", "rsqrt", "exp", "exp_", "log", "log1p", "expm1",
        "sin", "cos", "tanh", "sigmoid", "sigmoid_", "softplus", "leaky_relu", "leaky_relu_", "elu", "gelu",
        "silu", "hardtanh", "abs", "sign", "clamp_min", "clamp_min_", "clamp_max", "clamp_max_", "minimum",
        "maximum", "where", "lt", "le", "ne", "logical_and", "logical_or", "logical_not", "lerp",
        "addcmul", "addcdiv", "erf", "fill_", "zero_", "ones_like", "empty_like", "rand", "rand_like",
        "randn", "randn_like", "randint", "randperm", "bernoulli",
        "isfinite", "isnan", "any", "all", "numel", "_weight_norm", "_weight_norm_interface",
    )
)

_KEY_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


# ----------------------------------------------------------------------------------------------
# Reports and handles
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FlopReport:
    """The FLOP count of one traced call (one flop = one multiply-add; rules in the module docstring).

    Attributes:
        total: flops of the whole call.
        by_module: flops per submodule name ("" = the whole call; ``geometry.layers.0``, ...),
            zeros included. An operator counts towards every module whose ``__call__`` it ran in.
        by_operator: flops per operator name (``linear``, ``matmul``, ``index_add``, ...).
        unsupported: operator -> number of calls that no handle covers (counted as 0).
        zero_flop_ops: operator -> number of calls of recognised zero-flop operators (data
            movement, element-wise, weight norm).
    """

    total: int
    by_module: dict[str, int]
    by_operator: dict[str, int]
    unsupported: dict[str, int]
    zero_flop_ops: dict[str, int] = dataclasses.field(default_factory=dict)

    def table(self, max_depth: int = 2, title: str = "") -> str:
        """A plain-text per-module table (modules up to ``max_depth`` dots deep, non-zero rows)."""
        rows = [(name or "(total)", value) for name, value in self.by_module.items()
                if value and (name == "" or name.count(".") < max_depth)]
        width = max([len(name) for name, _ in rows] + [8])
        lines = [title] if title else []
        lines += [f"  {name:<{width}}  {value:>16,d}" for name, value in rows]
        if self.unsupported:
            lines.append("  unsupported (counted 0): " + ", ".join(f"{k} x{v}" for k, v in sorted(self.unsupported.items())))
        return "\n".join(lines)


def _shape(value: Any, op: str) -> list[int]:
    shape = get_shape(value)
    if shape is None:
        raise ValueError(f"flop count: cannot read the shape of an input of {op}; trace with concrete tensors")
    return list(shape)


def _is_tensor_value(value: Any) -> bool:
    return value.type().kind() == "TensorType"


def flop_handles(zero_calls: Counter | None = None) -> dict[str, Callable]:
    """The fvcore handles of our counting rules (module docstring), keyed by operator name.

    Args:
        zero_calls: a Counter that the zero-flop handles increment by operator name (calls seen).

    Returns:
        dict operator name -> fvcore handle ``(inputs, outputs) -> int``.
    """
    zero_calls = Counter() if zero_calls is None else zero_calls

    def zero(op: str) -> Callable:
        def handle(inputs, outputs) -> int:
            zero_calls[op] += 1
            return 0

        return handle

    def scatter(op: str, position: int) -> Callable:
        def handle(inputs, outputs) -> int:
            return math.prod(_shape(inputs[position], op))

        return handle

    def reduction(op: str) -> Callable:
        def handle(inputs, outputs) -> int:
            if op in ("aten::max", "aten::min") and len(inputs) > 1 and _is_tensor_value(inputs[1]):
                zero_calls[op] += 1  # element-wise max(a, b)
                return 0
            return math.prod(_shape(inputs[0], op))

        return handle

    handles: dict[str, Callable] = {}
    for op in DATA_MOVEMENT_OPS | ELEMENTWISE_OPS:
        handles[op] = zero(op)
    for op, position in SCATTER_OPS.items():
        handles[op] = scatter(op, position)
    for op in REDUCTION_OPS:
        handles[op] = reduction(op)
    return handles


# ----------------------------------------------------------------------------------------------
# count_flops
# ----------------------------------------------------------------------------------------------


def _flatten_tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _flatten_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _flatten_tensors(v)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [t for f in dataclasses.fields(obj) for t in _flatten_tensors(getattr(obj, f.name))]
    return []


class _TraceTarget(nn.Module):
    """Wraps what is counted so fvcore can trace it: tensor inputs traced, other inputs bound as
    constants, outputs flattened to a tuple of tensors. The counted module (or the module a bound
    method belongs to) is the child ``m``, so its parameters are graph inputs."""

    def __init__(self, fn: Callable, owner: nn.Module | None, inputs: tuple) -> None:
        super().__init__()
        self.m = owner
        object.__setattr__(self, "_fn", fn)  # never a second child, even when fn is the module
        self._template = inputs
        self._tensor_slots = [i for i, v in enumerate(inputs) if isinstance(v, torch.Tensor)]

    def traced_inputs(self) -> tuple[torch.Tensor, ...]:
        return tuple(self._template[i].detach() for i in self._tensor_slots)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args = list(self._template)
        for slot, tensor in zip(self._tensor_slots, tensors):
            args[slot] = tensor
        return tuple(_flatten_tensors(self._fn(*args)))


@contextlib.contextmanager
def _counting_mode(modules: list[nn.Module]) -> Iterator[None]:
    """eval() (no batch-norm statistics updates, no dropout), no_grad and a forked RNG, restored after."""
    flags = [(m, m.training) for root in modules for m in root.modules()]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for root in modules:
                root.eval()
            yield
    finally:
        for m, training in flags:
            m.train(training)


@contextlib.contextmanager
def _no_leftover_hooks(root: nn.Module) -> Iterator[None]:
    """Remove forward hooks that a failed fvcore trace leaves behind (fvcore registers its scope
    hooks on every module and removes them only after a successful trace)."""
    before = [(m, set(m._forward_pre_hooks), set(m._forward_hooks)) for m in root.modules()]
    try:
        yield
    finally:
        for m, pre, post in before:
            for key in set(m._forward_pre_hooks) - pre:
                del m._forward_pre_hooks[key]
                m._forward_pre_hooks_with_kwargs.pop(key, None)
            for key in set(m._forward_hooks) - post:
                del m._forward_hooks[key]
                m._forward_hooks_with_kwargs.pop(key, None)
                m._forward_hooks_always_called.pop(key, None)


def count_flops(module_or_fn: nn.Module | Callable, inputs: tuple) -> FlopReport:
    """Count the flops of one call ``module_or_fn(*inputs)`` with fvcore and our handles.

    The call is traced once in eval mode under ``torch.no_grad`` with the RNG state saved and
    restored, so counting changes nothing (batch-norm statistics, dropout, random sampling).

    Args:
        module_or_fn: an ``nn.Module``, a bound method of one (e.g. ``teacher.canonical``; the
            owner's parameters are traced as inputs), or a plain function (it must not close over
            tensors that require grad).
        inputs: positional arguments; tensors are traced, anything else (ints, strings, cached
            outputs) is passed unchanged. Outputs may be tensors, tuples, dicts or dataclasses.

    Returns:
        :class:`FlopReport`; module names are those inside the counted module (or the bound
        method's owner), "" is the whole call.

    Raises:
        ValueError: when ``inputs`` is not a tuple, or a plain function closes over tensors that
            require grad.
        RuntimeError: when fvcore cannot trace the call (e.g. ``torch.autograd.grad`` inside:
            the teacher's autograd normals).
    """
    if not isinstance(inputs, tuple):
        raise ValueError(f"count_flops: inputs must be a tuple of positional arguments, got {type(inputs).__name__}")
    if isinstance(module_or_fn, nn.Module):
        owner: nn.Module | None = module_or_fn
    elif isinstance(getattr(module_or_fn, "__self__", None), nn.Module):
        owner = module_or_fn.__self__
    elif callable(module_or_fn):
        owner = None
    else:
        raise ValueError(f"count_flops: expected an nn.Module or a callable, got {type(module_or_fn).__name__}")
    target = _TraceTarget(module_or_fn, owner, inputs)
    zero_calls: Counter = Counter()
    analysis = (
        FlopCountAnalysis(target, target.traced_inputs())
        .set_op_handle(**flop_handles(zero_calls))
        .unsupported_ops_warnings(False)
        .uncalled_modules_warnings(False)
        .tracer_warnings("none")
    )
    with _counting_mode([owner] if owner is not None else []), _no_leftover_hooks(target):
        try:
            total = analysis.total()
        except RuntimeError as err:
            if owner is None and "requires grad as a constant" in str(err):
                raise ValueError(
                    "count_flops: the function uses tensors that require grad (module parameters?) "
                    "without receiving them; pass the nn.Module or a bound method of it instead"
                ) from err
            raise RuntimeError(f"count_flops: fvcore could not trace {_describe(module_or_fn)}: {err}") from err
    by_module: dict[str, int] = {}
    for name, value in sorted(analysis.by_module().items()):
        if name == "m":
            continue
        key = name[2:] if name.startswith("m.") else name
        by_module[key] = int(round(value))
    return FlopReport(
        total=int(round(total)),
        by_module=by_module,
        by_operator={k: int(round(v)) for k, v in sorted(analysis.by_operator().items())},
        unsupported=dict(sorted(analysis.unsupported_ops().items())),
        zero_flop_ops=dict(sorted(zero_calls.items())),
    )


def _describe(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or type(obj).__name__


def multiply_adds(fn: Callable[[], object]) -> int:
    """Multiply-adds of one call of ``fn`` (forward passes and any backward pass inside it).

    Every operator dispatched while ``fn`` runs is counted by the formulas of
    ``torch.utils.flop_counter`` (matmuls, convolutions, attention: 2 flops per multiply-add,
    halved here, so one multiply-add = one flop as fvcore counts); everything else counts 0, so the
    rasterizer and element-wise work are left out as in every other FLOP figure of the report.
    A plain dispatch mode rather than ``FlopCounterMode``, whose module tracker stops on
    ``torch.autograd.grad`` of a leaf (the refined protocol's gradient steps).
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class _Counter(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                self.total += int(formula(*args, **kwargs, out_val=out))
            return out

    counter = _Counter()
    with counter:
        fn()
    return counter.total // 2


def flop_counter_macs(module_or_fn: nn.Module | Callable, inputs: tuple) -> int:
    """Multiply-adds of one call by the formulas of ``torch.utils.flop_counter`` (:func:`multiply_adds`),
    in eval mode under ``no_grad``.

    Those formulas count 2 flops per multiply-add of mm/addmm/bmm/conv/... (and nothing else):
    half their total is comparable with :func:`count_flops` on matmul-only code. Used to
    cross-check the explicit-Jacobian normal branch.

    Args:
        module_or_fn: what to call; inputs: its positional arguments.

    Returns:
        int multiply-adds.
    """
    owners = [module_or_fn] if isinstance(module_or_fn, nn.Module) else []
    if isinstance(getattr(module_or_fn, "__self__", None), nn.Module):
        owners = [module_or_fn.__self__]
    with _counting_mode(owners):
        return multiply_adds(lambda: module_or_fn(*inputs))


# ----------------------------------------------------------------------------------------------
# The teacher
# ----------------------------------------------------------------------------------------------


def sphere_points(num_points: int, like: torch.Tensor | None = None, radius: float = 0.5) -> torch.Tensor:
    """(N, 3) Fibonacci-sphere points of ``radius`` (the teacher's initial cloud) on ``like``'s device/dtype.

    The canonical networks are per-point MLPs (and kNN-graph networks whose cost depends on N
    and k only), so where the points lie does not change the count.

    Raises:
        ValueError: if ``num_points < 1``.
    """
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
        raise ValueError(f"the FLOP count needs num_points >= 1, got {num_points!r}")
    pts = fibonacci_sphere(num_points, radius)
    return pts if like is None else pts.to(device=like.device, dtype=like.dtype)


class _ExplicitNormalGeometry(nn.Module):
    """The geometry MLP seen through :meth:`GeometryNetwork.forward_with_gradient` (sdf, albedo
    logits, feature, SDF gradient), so a trace sees the gradient's matmuls inside this scope. It
    shares the network's layers (child ``layers``) and stores no weights of its own."""

    def __init__(self, geometry: GeometryNetwork) -> None:
        super().__init__()
        self.layers = geometry.layers
        object.__setattr__(self, "_net", geometry)  # not a child: keeps module names short

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._net.forward_with_gradient(x)


class TeacherCanonicalNetwork(nn.Module):
    """What the teacher computes once per subject: geometry with SDF-gradient normals + deformer.

    The same maths as :meth:`PointAvatarTeacher.canonical` with ``method="explicit"`` (the normal
    branch as explicit matmuls, countable), packaged for the tracer. Children: ``geometry``
    (layers shared with the teacher) and ``deformer``.

    Args:
        teacher: the teacher whose networks are counted (shared, not copied).
    """

    def __init__(self, teacher: PointAvatarTeacher) -> None:
        super().__init__()
        self.geometry = _ExplicitNormalGeometry(teacher.geometry)
        self.deformer = teacher.deformer

    def forward(self, points: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Args: points (N, 3). Returns: sdf (N, 1), albedo (N, 3), feature (N, W), normals (N, 3),
        blendshapes (N, E, 3), offset (N, 3)."""
        raw, feature, sdf_grad = self.geometry(points)
        normals = F.normalize(sdf_grad, dim=-1, eps=1e-12)
        blendshapes, offset = self.deformer(points)
        return raw[:, :1], torch.sigmoid(10.0 * raw[:, 1:]), feature, normals, blendshapes, offset


class TeacherFrameNetwork(nn.Module):
    """What the teacher computes per frame from cached canonical outputs: deformation and shading.

    ``forward(expression, world_mat)`` = (:meth:`PointAvatarTeacher.deform`,
    :meth:`PointAvatarTeacher.shade`) of the cached canonical output. Child: ``shading``.

    Args:
        teacher: the teacher (shared, not copied).
        canonical: its cached canonical output with normals (detached).
    """

    def __init__(self, teacher: PointAvatarTeacher, canonical: CanonicalOutput) -> None:
        super().__init__()
        self.shading = teacher.shading
        object.__setattr__(self, "_teacher", teacher)
        self.canonical = canonical

    def forward(self, expression: torch.Tensor, world_mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: expression (B, E), world_mat (B, 3, 4). Returns: points (B, N, 3), colours (B, N, 3)."""
        return self._teacher.deform(self.canonical, expression), self._teacher.shade(self.canonical, world_mat)


def teacher_canonical_flops(teacher: PointAvatarTeacher, num_points: int, cross_check: bool = True) -> FlopReport:
    """Flops of the teacher's canonical network on a cloud of ``num_points`` points.

    Geometry MLP with the SDF-gradient normals (explicit-Jacobian path, module docstring) +
    deformer MLP; shading is per frame (:func:`teacher_frame_flops`). With the default sizes
    this is 1,105,667 flops per point: geometry forward 525,312 + gradient 524,288, deformer
    56,064, normalising the gradient 3.

    Args:
        teacher: the teacher (unwrapped; counted where its parameters live).
        num_points: N >= 1 (points on a sphere; the cost is linear in N).
        cross_check: also count the geometry + gradient branch on min(N, 64) points with
            ``torch.utils.flop_counter`` formulas and require them to equal fvcore's count.

    Returns:
        :class:`FlopReport`; ``by_module`` has ``geometry`` (with the gradient), ``deformer``.

    Raises:
        ValueError: if ``num_points < 1``.
        RuntimeError: when the cross-check disagrees.
    """
    like = next(teacher.geometry.parameters())
    report = count_flops(TeacherCanonicalNetwork(teacher), (sphere_points(num_points, like),))
    if cross_check:
        small = sphere_points(min(num_points, 64), like)
        branch = _ExplicitNormalGeometry(teacher.geometry)
        fv = count_flops(branch, (small,)).total
        fc = flop_counter_macs(branch, (small,))
        if fv != fc:
            raise RuntimeError(
                f"teacher normal-branch cross-check failed: fvcore counts {fv:,} multiply-adds on "
                f"{small.shape[0]} points, torch.utils.flop_counter/2 counts {fc:,}"
            )
    return report


def teacher_frame_flops(teacher: PointAvatarTeacher, num_points: int) -> FlopReport:
    """Flops of one frame of the teacher on ``num_points`` cached canonical points.

    Deformation x + o + sum_e psi_e B_e (E x 3 per point), rotation of the normals into the
    camera (9 per point) and their renormalisation (3), the shading MLP (3 -> 64 -> 64 -> 3:
    4,480 per point), colour (element-wise); not the rasterizer (module docstring).

    Args:
        teacher: the teacher; num_points: N >= 1.

    Returns:
        :class:`FlopReport` of one frame (B = 1).
    """
    like = next(teacher.geometry.parameters())
    with _counting_mode([teacher]):
        canonical = teacher.canonical(sphere_points(num_points, like), compute_normals=True, method="explicit")
    expression = like.new_zeros(1, teacher.expression_dim)
    world_mat = torch.eye(3, 4, dtype=like.dtype, device=like.device)[None].clone()  # (1, 3, 4)
    world_mat[0, 2, 3] = 4.0  # head 4 units in front of the camera
    return count_flops(TeacherFrameNetwork(teacher, canonical), (expression, world_mat))


# ----------------------------------------------------------------------------------------------
# The callback
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FlopTarget:
    """One model of a stage, as the :class:`FlopCounter` counts it.

    A stage module implements ``flop_targets() -> dict[str, FlopTarget]`` keyed by model name
    ("teacher", "student"), built from its unwrapped submodules.

    Attributes:
        canonical: N -> :class:`FlopReport` of one canonical forward on N points (called with
            N = 10,000 and with ``num_points``).
        num_points: N of the run's own canonical cloud.
        params: trainable parameters of the canonical network (``params/<model>``).
        per_frame: N -> :class:`FlopReport` of one frame on N points, or None.
    """

    canonical: Callable[[int], FlopReport]
    num_points: int
    params: int
    per_frame: Callable[[int], FlopReport] | None = None


def teacher_flop_target(teacher: PointAvatarTeacher, num_points: int | None = None) -> FlopTarget:
    """The teacher's :class:`FlopTarget`: canonical/per-frame counts and its parameter count.

    Args:
        teacher: the (unwrapped) teacher.
        num_points: the run's cloud size; default the teacher's active points.
    """
    return FlopTarget(
        canonical=lambda n: teacher_canonical_flops(teacher, n),
        num_points=teacher.num_active if num_points is None else num_points,
        params=sum(p.numel() for p in teacher.canonical_network_parameters()),
        per_frame=lambda n: teacher_frame_flops(teacher, n),
    )


class _StudentFrame(nn.Module):
    """One frame of the student from cached canonical outputs: deformation and shading (for counting)."""

    def __init__(self, student: PointStudent, canonical: StudentCanonical) -> None:
        super().__init__()
        self.shading = student.shading
        object.__setattr__(self, "_student", student)
        self.canonical = canonical

    def forward(self, expression: torch.Tensor, world_mat: torch.Tensor):
        return self._student.deform(self.canonical, expression), self._student.shade(self.canonical, world_mat)


def student_flop_target(student: PointStudent) -> FlopTarget:
    """The student's :class:`FlopTarget` (canonical forward and one frame, counted like the teacher's).

    The canonical count runs the student on ``n`` points of a sphere with their own graph (kNN and
    sampling are per-subject preprocessing, not counted); per frame: deformation and shading of
    the held canonical outputs (the rasterizer is left out, as for the teacher).
    """
    like = student.points

    def canonical(n: int):
        return count_flops(*student.flop_forward(sphere_points(n, like)))

    def per_frame(n: int):
        modes = [(m, m.training) for m in student.modules()]
        try:  # eval: counting must not update batch-norm statistics (a resumed fit counts again)
            with torch.no_grad():
                cached = student.eval().canonical()
        finally:
            for module, training in modes:
                module.train(training)
        expression = like.new_zeros(1, student.expression_dim)
        world_mat = torch.eye(3, 4, dtype=like.dtype, device=like.device)[None].clone()
        world_mat[0, 2, 3] = 4.0
        return count_flops(_StudentFrame(student, cached), (expression, world_mat))

    return FlopTarget(
        canonical=canonical,
        num_points=student.num_points,
        params=sum(p.numel() for p in student.canonical_network_parameters()),
        per_frame=per_frame,
    )


class FlopCounter(pl.Callback):
    """Counts parameters and FLOPs of the stage's models at fit start (DESIGN.md, "Counting rules").

    On rank 0 only, on the unwrapped modules the stage returns from ``flop_targets()``, outside any
    collective operation; it writes into the run's metrics.json (through
    :func:`lightning_modules.run_folder.record_metrics`) for each model m:

    ``params/m``, ``flops/m`` (N = ``reference_points``, 10,000), ``flops_run/m`` (the run's N),
    ``flops_per_frame/m/tracked``; and with both a teacher and a student ``params_ratio`` and
    ``flops_ratio`` (student / teacher). A per-module table and the unsupported operators go
    to the log. A model that cannot be counted is a warning, never a crashed fit: its other keys
    are still written.

    Args:
        reference_points: N of ``flops/<model>``.
        max_depth: module depth of the logged tables.
    """

    def __init__(self, reference_points: int = REFERENCE_POINTS, max_depth: int = 2) -> None:
        if isinstance(reference_points, bool) or not isinstance(reference_points, int) or reference_points < 1:
            raise ValueError(f"FlopCounter: reference_points must be an int >= 1, got {reference_points!r}")
        self.reference_points = reference_points
        self.max_depth = max_depth
        self.results: dict[str, float] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        try:
            self.results = self.count(pl_module)
        except Exception as err:  # never crash the fit over a report
            rank_zero_warn(f"FlopCounter: could not count parameters/FLOPs: {type(err).__name__}: {err}")
            return
        try:
            record_metrics(trainer, self.results)
        except Exception as err:
            rank_zero_warn(f"FlopCounter: counts not written to metrics.json ({err}); they were {self.results}")

    def count(self, pl_module: pl.LightningModule) -> dict[str, float]:
        """The metrics.json entries for ``pl_module`` (warnings for the models that fail).

        Raises:
            ValueError: when the module has no usable ``flop_targets()``.
        """
        get_targets = getattr(pl_module, "flop_targets", None)
        if not callable(get_targets):
            raise ValueError(f"{type(pl_module).__name__} has no flop_targets() method; nothing to count")
        targets = get_targets()
        if not isinstance(targets, dict) or not all(isinstance(t, FlopTarget) for t in targets.values()):
            raise ValueError("flop_targets() must return a dict of model name -> FlopTarget")
        metrics: dict[str, float] = {}
        for name, target in targets.items():
            if not _KEY_NAME.match(name):
                rank_zero_warn(f"FlopCounter: model name {name!r} is not a metrics.json name (a-z, 0-9, _); skipped")
                continue
            metrics[f"params/{name}"] = int(target.params)
            try:
                metrics.update(self._count_model(name, target))
            except Exception as err:
                rank_zero_warn(f"FlopCounter: could not count the FLOPs of {name!r}: {type(err).__name__}: {err}")
        for key in ("params", "flops"):
            student, teacher = metrics.get(f"{key}/student"), metrics.get(f"{key}/teacher")
            if student is not None and teacher:
                metrics[f"{key}_ratio"] = student / teacher
        return metrics

    def _count_model(self, name: str, target: FlopTarget) -> dict[str, int]:
        out: dict[str, int] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer chatter; what matters is in the report
            reference = target.canonical(self.reference_points)
            run = reference if target.num_points == self.reference_points else target.canonical(target.num_points)
            frame = target.per_frame(target.num_points) if target.per_frame is not None else None
        out[f"flops/{name}"] = reference.total
        out[f"flops_run/{name}"] = run.total
        lines = [
            f"FlopCounter: {name}: {target.params:,} parameters; canonical forward "
            f"{reference.total:,} flops at N = {self.reference_points:,} "
            f"({reference.total / self.reference_points:,.0f} per point), {run.total:,} at the run's N = "
            f"{target.num_points:,}",
            reference.table(self.max_depth, title=f"  per module (N = {self.reference_points:,}):"),
        ]
        if frame is not None:
            out[f"flops_per_frame/{name}/tracked"] = frame.total
            lines.append(f"  per frame: {frame.total:,} flops (N = {target.num_points:,})")
            if frame.unsupported:
                lines.append("  per frame unsupported (counted 0): " + ", ".join(sorted(frame.unsupported)))
        rank_zero_info("\n".join(lines))
        return out
