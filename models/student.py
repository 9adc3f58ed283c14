"""The distilled student: RandLA-Net (local) and EdgeConv (global) branches fused into f_s, with heads.

Implements the student of "Efficient Realistic Avatar Generation via Model Compression and
Enhanced Rendering" (ICLR 2024 submission; REFERENCES.md): the concatenation of a RandLA-Net
branch and a GCN branch, fused into a per-point latent code f_s (the GAR's latent codes), with the
teacher's outputs as heads (DESIGN.md, "Models" -> Student):

* branch A, local: :class:`models.randlanet.RandLAEncoderDecoder` on the coordinates;
* branch B, global: :class:`models.gcn.GCNBranch` (EdgeConvs on the level-0 kNN graph + DGCNN's
  broadcast global max-pooled descriptor; dynamic graph optional, off);
* fusion: [A, B] -> shared 1x1 MLP -> f_s (``latent_dim`` channels, BN + LeakyReLU at each layer);
* heads from f_s: albedo = sigmoid(Linear), canonical normal = normalise(Linear) (predicted
  directly, no SDF gradient), blendshapes (E x 3) and offset (3) (Linear, zero-initialised like
  the teacher's, so an untrained student does not deform), and the shading MLP of the
  camera-space normal, the teacher's :class:`models.teacher.ShadingNetwork` at a smaller width:
  n_cam = rotate_normals(n, world_mat), colour = clamp(2 * S(n_cam) * albedo, 0, 1).

Inputs: the canonical points (N, 3) and a :class:`StudentGraph` of index tensors built once per
subject by :func:`build_student_graph` (kNN per level, seeded random sampling, nearest
upsampling; see :func:`models.randlanet.level_plan` for the clamping on tiny clouds: k_eff =
min(k, N), and a level that would keep fewer than k_eff points is not decimated, so the 400 or 20
points of a young teacher run through the same layers). The graph is preprocessing: it is not
part of the FLOP count. The canonical forward holds no data-dependent Python control flow:
:meth:`Student.forward_canonical` takes plain tensors and traces with ``torch.jit.trace`` (wrap
it with :class:`CanonicalForward` for fvcore or ONNX).

The student keeps its canonical points, graph and splat radius as persistent buffers
(:meth:`Student.set_canonical`), so its state_dict alone renders the avatar. Their sizes depend
on N: construct with ``num_points`` to pre-size them, or load any state_dict into a student of
any size (``load_state_dict`` resizes these buffers to the incoming ones; the parameters never
depend on N).

Default parameter count (``expression_dim=16``; every 1x1/Linear has a bias, BN adds 2 per
channel, weight norm one gain per output; ``tests/models/test_student.py`` pins it by hand):

==============  ===========================================================================  ======
part            layers (in -> out)                                                           params
==============  ===========================================================================  ======
RandLA fc0      3 -> 8 + BN                                                                      48
RandLA block 1  d_in 8, d 8: 1x1 8->4; LocSE 10->4, att 8x8, 8->4; LocSE 4->4, att 8x8,         736
                8->8; 1x1 8->16; shortcut 8->16 (1x1s + BN)
RandLA block 2  d_in 16, d 16: same pattern                                                   2,528
RandLA decoder  bottom 32->32; 48->16; 32->16 (+ BN)                                          2,496
GCN             EdgeConv 6->16, 32->16 (+ BN); global 32->32 (+ BN)                           1,824
fusion          80->32, 32->32 (+ BN)                                                         3,776
heads           albedo 32->3, normal 32->3, offset 32->3, blendshapes 32->48                  1,881
shading         3->16->16->3, weight norm                                                       422
total           ``canonical_network_parameters()``                                           13,711
==============  ===========================================================================  ======

That is 2.3 % of the default teacher's 591,731 (target <= 5 %, goal 3 %). Multiply-adds of the
canonical forward at N = 10,000: 14.2 K per point by ``torch.utils.flop_counter`` (fvcore, which
also counts BatchNorm and sees the gathers as free, about 16 K), against the teacher's 0.58 M
forward + 0.52 M for its SDF-gradient normals = 1.1 M per point, so about 1.3 %; the attention
dense layers (k x d^2 per point) dominate. On a cloud too small to decimate (N < 64) every level
runs at full size and the cost per point rises (about 25 K at N = 20).

Choices stated here: BatchNorm (as RandLA-Net and DGCNN) normalises over the points of the one
cloud in training mode and uses running statistics in eval mode. The student only ever sees its
subject's one cloud, so :meth:`Student.recalibrate_batchnorm` sets the running statistics to that
cloud's statistics under the current weights, and eval mode then equals train mode. The
distillation does this where its evaluation starts and in every checkpoint it writes. The
exponential average alone lags the weights: after the CPU demo's 300 steps at lr 3e-3, the
eval-mode normals had a mean cosine of 0.89 to the teacher's, against 0.93 in train mode.
``norm="none"`` removes BatchNorm. The point itself is its own first neighbour (both branches);
the default splat radius is the mean distance to the nearest other point.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.frame import PerFrame, check_world_mat
from models.gcn import GCNBranch
from models.randlanet import RandLAEncoderDecoder, RandLAGraph, SharedMLP, build_randla_graph, level_plan
from models.teacher import ShadingNetwork

__all__ = [
    "BRANCHES",
    "PointStudent",
    "StudentGraph",
    "build_student_graph",
    "StudentCanonical",
    "Student",
    "CanonicalForward",
]

StudentGraph = RandLAGraph
"""The student's per-subject graph: :class:`models.randlanet.RandLAGraph` (its level-0
``neighbors`` are the cloud's kNN indices, shared by both branches)."""

DEFAULT_NUM_LEVELS = 2


def build_student_graph(
    points: torch.Tensor,
    k: int = 16,
    decimation: int = 4,
    num_levels: int = DEFAULT_NUM_LEVELS,
    seed: int = 0,
    backend: str | None = None,
) -> StudentGraph:
    """Per-subject preprocessing of the student: kNN per level, seeded sampling, upsampling indices.

    The same function as :func:`models.randlanet.build_randla_graph` with the student's default
    number of levels (2); ``num_levels`` must equal ``len(randla_channels)`` of the student.
    Clamping rule for small clouds (:func:`models.randlanet.level_plan`): k_eff = min(k, N);
    level l + 1 keeps n_l // decimation points if that is >= k_eff, else all n_l (no
    decimation at that level). Deterministic for a given seed.

    Args:
        points: (N, 3) float canonical points, N >= 2.
        k: neighbours (16).
        decimation: 4.
        num_levels: 2.
        seed: sampling seed (0).
        backend: ops backend for the kNN.

    Returns:
        :class:`StudentGraph` on the device of ``points``.

    Raises:
        ValueError: as :func:`models.randlanet.build_randla_graph`.
    """
    return build_randla_graph(
        points, k=k, decimation=decimation, num_levels=num_levels, seed=seed, backend=backend
    )


#: The student's feature branches: RandLA-Net (local) and the EdgeConv GCN (global).
BRANCHES = ("randla", "gcn")


@dataclass
class StudentCanonical:
    """The student's per-subject outputs (they depend only on the canonical points; cacheable).

    Attributes:
        points: (N, 3) canonical points.
        albedo: (N, 3) in (0, 1).
        normals: (N, 3) unit canonical normals (predicted directly).
        blendshapes: (N, E, 3) expression blendshapes.
        offset: (N, 3) canonical offset.
        feature: (N, C_s) latent code f_s.
        indices: always None (the student's points are not a padded buffer); present so code
            written for the teacher's ``CanonicalOutput`` runs unchanged.
    """

    points: torch.Tensor
    albedo: torch.Tensor
    normals: torch.Tensor
    blendshapes: torch.Tensor
    offset: torch.Tensor
    feature: torch.Tensor
    indices: torch.Tensor | None = None


def check_canonical_points(points) -> None:
    """Raise ValueError unless ``points`` is a finite (N, 3) tensor (what :meth:`PointStudent.set_canonical` stores)."""
    if not isinstance(points, torch.Tensor) or points.dim() != 2 or points.shape[1] != 3:
        shape = tuple(points.shape) if isinstance(points, torch.Tensor) else type(points).__name__
        raise ValueError(f"set_canonical: points must be a (N, 3) tensor, got {shape}")
    if not bool(torch.isfinite(points).all()):
        raise ValueError("set_canonical: points hold NaN or infinite coordinates")


class PointStudent(PerFrame, nn.Module):
    """The student interface: what the distillation and GAR stages, export and the benchmarks use.

    A new student is one subclass of this (in any importable module) plus a config naming it
    (``model.init_args.student: {class_path: ..., init_args: {...}}``). It must implement:

    * ``__init__(expression_dim, ...)``: ``expression_dim`` E comes from the teacher; set
      ``self.expression_dim``, ``self.latent_dim`` (C_s, the width of f_s, the GAR's latent codes)
      and ``self.shading`` (a module mapping (..., 3) unit camera-space normals to (..., 3) shading
      in (0, 1), compared with the teacher's in the warm-up);
    * call ``super().__init__()`` first: it registers the persistent buffers ``points`` (N, 3) and
      ``radius`` () that :meth:`set_canonical` fills, so the state_dict alone renders the avatar
      (``load_state_dict`` of any N works; a student with more per-point buffers lists them in
      ``_canonical_buffer_names`` and overrides :meth:`set_canonical`);
    * :meth:`canonical` -> :class:`StudentCanonical` (points, albedo, normals, blendshapes,
      offset, feature f_s), the per-subject outputs;
    * :meth:`flop_forward` -> the canonical network as a module and its inputs for a cloud, what
      the FLOP counter counts (per-subject preprocessing such as a kNN graph built outside it).

    Provided here, from those: :meth:`deform`, :meth:`shade`, :meth:`forward` (the teacher's per-frame
    API), :meth:`neighbors` (the kNN graph of the whole cloud that assisted supervision, L_graph,
    compares relations on; k = 16), ``num_points``, :meth:`canonical_network_parameters` (all
    parameters) and :meth:`recalibrate_batchnorm` (nothing to do without batch norm).
    ``tests/models/test_student_contract.py`` runs every student class through this contract.
    """

    expression_dim: int
    latent_dim: int
    shading: nn.Module
    points: torch.Tensor
    radius: torch.Tensor
    avatar_name = "student"

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("points", torch.zeros(0, 3))  # (N, 3), set_canonical / load_state_dict
        self.register_buffer("radius", torch.zeros(()))

    def _canonical_buffer_names(self) -> list[str]:
        """Persistent buffers whose size follows N (``load_state_dict`` resizes them to the incoming ones)."""
        return ["points"]

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # The canonical buffers take the sizes of the incoming ones (any N); parameters do not.
        for name in self._canonical_buffer_names():
            incoming = state_dict.get(prefix + name)
            current = self._buffers.get(name)
            if isinstance(incoming, torch.Tensor) and current is not None and incoming.shape != current.shape:
                self._buffers[name] = torch.empty(incoming.shape, dtype=current.dtype, device=current.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    @torch.no_grad()
    def set_canonical(self, points: torch.Tensor, radius: float | torch.Tensor | None = None) -> None:
        """Store the subject's canonical points and splat radius as buffers (any N).

        Args:
            points: (N, 3) float canonical points (the teacher's active points), N >= 2.
            radius: splat radius in canonical units (the teacher's); default the mean distance from
                each point to its nearest other point.

        Raises:
            ValueError: points that are not a finite (N, 3) tensor (:func:`check_canonical_points`), or N < 2.
        """
        check_canonical_points(points)
        if len(points) < 2:
            raise ValueError(f"set_canonical: points must hold N >= 2 points (a nearest other point), got {len(points)}")
        self._buffers["points"] = points.detach().to(self.points).clone()
        if radius is None:
            nearest = self.neighbors(2)[:, 1]
            radius = (self.points - self.points[nearest]).norm(dim=-1).mean()
        self.radius.copy_(torch.as_tensor(radius, dtype=self.radius.dtype))

    # ------------------------------------------------------------------ to implement
    def canonical(self, points: torch.Tensor | None = None) -> StudentCanonical:
        """The per-subject outputs on ``points`` (default: the held ones)."""
        raise NotImplementedError

    def flop_forward(self, points: torch.Tensor) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        """``(module, inputs)``: ``module(*inputs)`` is the canonical network on ``points`` (N, 3)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ provided
    @property
    def num_points(self) -> int:
        """N, the number of canonical points held (0 before :meth:`set_canonical`)."""
        return int(self.points.shape[0])

    def canonical_network_parameters(self) -> list[nn.Parameter]:
        """The parameters counted as the student's size (``params/student``): all of them by default."""
        return list(self.parameters())

    def recalibrate_batchnorm(self) -> None:
        """Exact batch-norm running statistics for the held cloud (no-op without batch norm)."""

    def neighbors(self, k: int | None = None) -> torch.Tensor:
        """(N, min(k, N)) int64 kNN indices of the held points, each point first (L_graph's graph;
        ``k`` None: the student's own choice, 16 here).

        Computed on demand with :func:`models.ops.knn` (a student holding such a graph returns it).
        """
        from models.ops import knn

        index, _ = knn(self.points, self.points, min(16 if k is None else k, self.num_points))
        return index

    def forward(
        self,
        expression: torch.Tensor,
        world_mat: torch.Tensor,
        canonical: StudentCanonical | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Per-frame points and colours plus the canonical outputs (the teacher's keys where meaningful).

        Args:
            expression: (B, E) expression codes.
            world_mat: (B, 3, 4) or (B, 4, 4) world->camera.
            canonical: cached :meth:`canonical` output (default: computed now on the held points).

        Returns:
            dict with ``points`` (B, N, 3) deformed, ``colors`` (B, N, 3), ``shading`` (B, N, 3),
            ``normals_cam`` (B, N, 3), ``normals`` (N, 3) canonical, ``albedo`` (N, 3), ``feature``
            (N, C_s) f_s, ``blendshapes`` (N, E, 3), ``offset`` (N, 3), ``canonical_points``
            (N, 3), ``indices`` None, ``radius`` () splat radius. The teacher's ``sdf`` and
            ``sdf_grad`` have no student counterpart and are absent.

        Raises:
            ValueError: on bad shapes, differing batch sizes, or no canonical points.
        """
        self._check_expression(expression)
        check_world_mat(world_mat)
        if expression.shape[0] != world_mat.shape[0]:
            raise ValueError(
                f"expression and world_mat batch sizes differ: {expression.shape[0]} vs {world_mat.shape[0]}"
            )
        if canonical is None:
            canonical = self.canonical()
        deformed = self.deform(canonical, expression)
        colors, shading, normals_cam = self._shade(canonical, world_mat)
        return {
            "points": deformed,
            "colors": colors,
            "shading": shading,
            "normals_cam": normals_cam,
            "normals": canonical.normals,
            "albedo": canonical.albedo,
            "feature": canonical.feature,
            "blendshapes": canonical.blendshapes,
            "offset": canonical.offset,
            "canonical_points": canonical.points,
            "indices": None,
            "radius": self.radius,
        }


class Student(PointStudent):
    """RandLA-Net + GCN student with the teacher's per-frame API (module docstring for the maths).

    Args:
        expression_dim: E, from the dataset (16).
        num_points: pre-size the canonical buffers for N points (None: empty until
            :meth:`set_canonical` or ``load_state_dict``).
        k: neighbours per point (16, clamped to N).
        decimation: RandLA sampling ratio per level (4).
        graph_seed: seed of the sampling when the student builds its own graph (0).
        fc0_channels: RandLA fc0 width (8).
        randla_channels: RandLA d_out per level ((8, 16)); its length is the number of levels.
        gcn_channels: EdgeConv widths ((16, 16)).
        gcn_global_channels: width of the global descriptor (32).
        dynamic_graph: recompute the EdgeConv graph in feature space (False).
        fusion_channels: hidden widths of the fusion MLP before f_s ((32,)).
        latent_dim: C_s, the width of f_s (32).
        shading_width, shading_depth: shading MLP (16, 2).
        norm: "batch" or "none" for every hidden 1x1 layer of both branches and the fusion.
        branches: the feature branches fused into f_s: ("randla", "gcn") (the paper's), or one of
            them alone (the ablation's RandLA-only and GCN-only students; ``benchmarks/ablation.py``).

    Buffers (persistent, sizes depend on N): ``points`` (N, 3); ``radius`` () splat radius in
    canonical units; ``canonical_set`` () bool; per level l ``graph_neighbors_l`` (n_l, k_eff),
    ``graph_sub_indices_l`` (n_{l+1},), ``graph_up_indices_l`` (n_l,).

    Raises:
        ValueError: for bad sizes.
    """

    def __init__(
        self,
        expression_dim: int = 16,
        num_points: int | None = None,
        k: int = 16,
        decimation: int = 4,
        graph_seed: int = 0,
        fc0_channels: int = 8,
        randla_channels: tuple[int, ...] = (8, 16),
        gcn_channels: tuple[int, ...] = (16, 16),
        gcn_global_channels: int = 32,
        dynamic_graph: bool = False,
        fusion_channels: tuple[int, ...] = (32,),
        latent_dim: int = 32,
        shading_width: int = 16,
        shading_depth: int = 2,
        norm: str = "batch",
        branches: tuple[str, ...] = BRANCHES,
    ) -> None:
        super().__init__()
        if expression_dim < 1 or k < 1 or decimation < 1 or latent_dim < 1:
            raise ValueError(
                "expression_dim, k, decimation and latent_dim must be >= 1, got "
                f"{expression_dim}, {k}, {decimation}, {latent_dim}"
            )
        self.expression_dim = expression_dim
        self.k = k
        self.decimation = decimation
        self.graph_seed = graph_seed
        self.latent_dim = latent_dim
        self.num_levels = len(tuple(randla_channels))

        self.branches = tuple(branches)
        if not self.branches or set(self.branches) - set(BRANCHES) or len(set(self.branches)) != len(self.branches):
            raise ValueError(f"branches must be one or both of {BRANCHES}, got {branches!r}")
        # a branch left out (the ablation's RandLA-only / GCN-only students) is None
        self.randla = (RandLAEncoderDecoder(3, fc0_channels, tuple(randla_channels), norm=norm)
                       if "randla" in self.branches else None)
        self.gcn = (GCNBranch(3, tuple(gcn_channels), gcn_global_channels, norm=norm, dynamic=dynamic_graph)
                    if "gcn" in self.branches else None)
        layers, width = [], sum(b.out_channels for b in (self.randla, self.gcn) if b is not None)
        for c in (*fusion_channels, latent_dim):
            layers.append(SharedMLP(width, c, norm=norm))
            width = c
        self.fusion = nn.Sequential(*layers)
        self.albedo_head = nn.Linear(latent_dim, 3)
        self.normal_head = nn.Linear(latent_dim, 3)
        self.blendshape_head = nn.Linear(latent_dim, 3 * expression_dim)
        self.offset_head = nn.Linear(latent_dim, 3)
        for head in (self.blendshape_head, self.offset_head):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.shading = ShadingNetwork(width=shading_width, depth=shading_depth)

        if num_points is None:
            k_eff, sizes = k, [0] * (self.num_levels + 1)
        else:
            k_eff, sizes = level_plan(num_points, k, decimation, self.num_levels)
        self.register_buffer("points", torch.zeros(sizes[0], 3))
        self.register_buffer("radius", torch.zeros(()))
        self.register_buffer("canonical_set", torch.zeros((), dtype=torch.bool))
        for level in range(self.num_levels):
            self.register_buffer(
                f"graph_neighbors_{level}", torch.zeros(sizes[level], k_eff, dtype=torch.long)
            )
            self.register_buffer(
                f"graph_sub_indices_{level}", torch.zeros(sizes[level + 1], dtype=torch.long)
            )
            self.register_buffer(f"graph_up_indices_{level}", torch.zeros(sizes[level], dtype=torch.long))

    # ------------------------------------------------------------------ canonical state

    def _canonical_buffer_names(self) -> list[str]:
        names = ["points"]
        for level in range(self.num_levels):
            names += [f"graph_neighbors_{level}", f"graph_sub_indices_{level}", f"graph_up_indices_{level}"]
        return names

    @property
    def graph(self) -> StudentGraph:
        """The held graph as a :class:`StudentGraph` (views of the buffers)."""
        return StudentGraph(
            [getattr(self, f"graph_neighbors_{level}") for level in range(self.num_levels)],
            [getattr(self, f"graph_sub_indices_{level}") for level in range(self.num_levels)],
            [getattr(self, f"graph_up_indices_{level}") for level in range(self.num_levels)],
        )

    @torch.no_grad()
    def recalibrate_batchnorm(self) -> None:
        """Set every BatchNorm's running mean and variance to the held cloud's own statistics.

        One forward pass of the canonical network in training mode, without gradient, with every
        BatchNorm reset and averaging cumulatively (``momentum=None``). The pass covers all the
        points, so the statistics are exact for the current weights. The variance is then stored
        biased, the one training-mode BatchNorm divides by (torch keeps the unbiased one). So the
        eval-mode outputs equal the training-mode ones to float round-off. This is "precise BN"
        (Wu & Johnson, 2021) over the only batch this network sees. Train/eval flags and momenta
        are restored. A no-op without BatchNorm.

        Raises:
            ValueError: if the student holds no canonical points.
        """
        norms = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms:
            return
        self._require_canonical()
        flags = [(m, m.training) for m in self.modules()]
        momenta = [m.momentum for m in norms]
        counts: dict[nn.Module, list[int]] = {m: [] for m in norms}  # values per channel, per call

        def record(module: nn.Module, args: tuple) -> None:
            counts[module].append(args[0].numel() // args[0].shape[1])

        hooks = [m.register_forward_pre_hook(record) for m in norms]
        try:
            for m in norms:
                m.reset_running_stats()
                m.momentum = None
            self.train()
            self.forward_canonical(self.points, *self.graph.tensors())
            for m, n in counts.items():
                if not n:
                    raise RuntimeError(f"recalibrate_batchnorm: {m} is not used by forward_canonical")
                if len(n) == 1 and n[0] > 1:
                    # torch stores the unbiased variance but normalises with the biased one in training
                    m.running_var.mul_((n[0] - 1) / n[0])
        finally:
            for hook in hooks:
                hook.remove()
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
            for m, training in flags:
                m.train(training)

    def canonical_network_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of both branches, fusion and heads, shading included (no adapters)."""
        return [
            *(self.randla.parameters() if self.randla is not None else ()),
            *(self.gcn.parameters() if self.gcn is not None else ()),
            *self.fusion.parameters(),
            *self.albedo_head.parameters(),
            *self.normal_head.parameters(),
            *self.blendshape_head.parameters(),
            *self.offset_head.parameters(),
            *self.shading.parameters(),
        ]

    def build_graph(self, points: torch.Tensor, seed: int | None = None) -> StudentGraph:
        """:func:`build_student_graph` with this student's k, decimation, levels and seed."""
        return build_student_graph(
            points,
            k=self.k,
            decimation=self.decimation,
            num_levels=self.num_levels,
            seed=self.graph_seed if seed is None else seed,
        )

    @torch.no_grad()
    def set_canonical(
        self,
        points: torch.Tensor,
        graph: StudentGraph | None = None,
        radius: float | torch.Tensor | None = None,
    ) -> None:
        """Store the subject's canonical points, graph and splat radius as buffers (any N).

        Args:
            points: (N, 3) float canonical points (e.g. the teacher's active points), N >= 2.
            graph: their :class:`StudentGraph` with ``num_levels`` levels (default: built now with
                :meth:`build_graph`).
            radius: splat radius in canonical units (e.g. the teacher's ``radius``); default the
                mean distance from each point to its nearest other point.

        Raises:
            ValueError: for bad points, or a graph that does not fit them or this network.
        """
        check_canonical_points(points)
        if graph is None:
            graph = self.build_graph(points)
        graph.validate(num_points=int(points.shape[0]), num_levels=self.num_levels)
        device, dtype = self.points.device, self.points.dtype
        self._buffers["points"] = points.detach().to(device=device, dtype=dtype).clone()
        for level in range(self.num_levels):
            self._buffers[f"graph_neighbors_{level}"] = graph.neighbors[level].to(device, torch.long).clone()
            self._buffers[f"graph_sub_indices_{level}"] = (
                graph.sub_indices[level].to(device, torch.long).clone()
            )
            self._buffers[f"graph_up_indices_{level}"] = (
                graph.up_indices[level].to(device, torch.long).clone()
            )
        if radius is None:
            nbrs = self.graph_neighbors_0
            if nbrs.shape[1] > 1:
                radius = (self.points - self.points[nbrs[:, 1]]).norm(dim=-1).mean()
            else:
                radius = torch.zeros(())
        self.radius.copy_(torch.as_tensor(radius, dtype=self.radius.dtype))
        self.canonical_set.fill_(True)

    # ------------------------------------------------------------------ networks

    def forward_canonical(
        self, points: torch.Tensor, *graph_tensors: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The canonical network on plain tensors (what FLOP counters, tracing and ONNX see).

        Args:
            points: (N, 3) canonical points.
            *graph_tensors: ``StudentGraph.tensors()`` of their graph (3 per level).

        Returns:
            albedo (N, 3), normals (N, 3), blendshapes (N, E, 3), offset (N, 3), feature f_s
            (N, C_s).

        Raises:
            ValueError: if the points or the graph do not fit (shapes only; no data checks).
        """
        graph = StudentGraph.from_tensors(graph_tensors)
        if not torch.jit.is_tracing():  # shape checks would be recorded as constants
            if points.dim() != 2 or points.shape[1] != 3:
                raise ValueError(f"points must be (N, 3), got {tuple(points.shape)}")
            graph.validate(num_points=int(points.shape[0]), num_levels=self.num_levels)
        parts = []
        if self.randla is not None:
            parts.append(self.randla(points, points, graph))  # (N, C_A) local
        if self.gcn is not None:
            parts.append(self.gcn(points, graph.neighbors[0]))  # (N, C_B) global
        feature = self.fusion(torch.cat(parts, dim=-1))  # (N, C_s)
        albedo = torch.sigmoid(self.albedo_head(feature))  # (N, 3)
        normals = F.normalize(self.normal_head(feature), dim=-1, eps=1e-12)  # (N, 3)
        blendshapes = self.blendshape_head(feature).reshape(-1, self.expression_dim, 3)  # (N, E, 3)
        offset = self.offset_head(feature)  # (N, 3)
        return albedo, normals, blendshapes, offset, feature

    def canonical_inputs(self) -> tuple[torch.Tensor, ...]:
        """``(points, *graph.tensors())`` of the held canonical state, for :meth:`forward_canonical`.

        Copies (detached clones), not the buffers themselves: ``torch.jit.trace`` rejects a
        module whose own buffers are passed as its inputs.
        """
        self._require_canonical()
        return tuple(t.detach().clone() for t in (self.points, *self.graph.tensors()))

    def _require_canonical(self) -> None:
        if not bool(self.canonical_set):
            raise ValueError(
                "the student holds no canonical points: call set_canonical(points) or load a state_dict first"
            )

    def canonical(
        self, points: torch.Tensor | None = None, graph: StudentGraph | None = None
    ) -> StudentCanonical:
        """Run both branches, fusion and heads on the canonical points (per subject; cacheable).

        Args:
            points: (N, 3) canonical points; default the held ones (with the held graph).
            graph: their graph; default the held one, or built now (:meth:`build_graph`) for
                other ``points``.

        Returns:
            :class:`StudentCanonical` of N points.

        Raises:
            ValueError: if nothing is held and no points are given, or on bad shapes.
        """
        if points is None:
            self._require_canonical()
            points = self.points
            graph = self.graph if graph is None else graph
        elif graph is None:
            graph = self.build_graph(points)
        albedo, normals, blendshapes, offset, feature = self.forward_canonical(points, *graph.tensors())
        return StudentCanonical(
            points=points,
            albedo=albedo,
            normals=normals,
            blendshapes=blendshapes,
            offset=offset,
            feature=feature,
        )

    def neighbors(self, k: int | None = None) -> torch.Tensor:
        """The level-0 kNN graph the student holds, (N, k_eff) (``k`` None or the student's k)."""
        if k is not None and k != self.k:
            return super().neighbors(k)
        self._require_canonical()
        return self.graph_neighbors_0

    def flop_forward(self, points: torch.Tensor) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        """:class:`CanonicalForward` and ``(points, *graph.tensors())`` with a graph built for ``points``
        (the graph is per-subject preprocessing, outside the counted module)."""
        return CanonicalForward(self), (points, *self.build_graph(points).tensors())


class CanonicalForward(nn.Module):
    """``forward(points, *graph_tensors)`` = ``student.forward_canonical``: a module for
    ``torch.jit.trace``, fvcore's ``FlopCountAnalysis`` and ONNX export.

    Example: ``FlopCountAnalysis(CanonicalForward(student), student.canonical_inputs())``.

    Args:
        student: the :class:`Student` to wrap (shared, not copied).
    """

    def __init__(self, student: Student) -> None:
        super().__init__()
        self.student = student

    def forward(self, points: torch.Tensor, *graph_tensors: torch.Tensor):
        return self.student.forward_canonical(points, *graph_tensors)
