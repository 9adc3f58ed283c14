"""PointAvatar-style teacher: a deformable canonical point cloud with three MLPs.

Implements the point avatar of Zheng et al., "PointAvatar: Deformable Point-based Head Avatars
from Videos" (CVPR 2023), adapted to a head without a skeleton (DESIGN.md, "Models" -> Teacher):

* canonical points ``x`` (learnable) in a fixed-capacity buffer of ``max_points`` rows with a
  boolean ``active`` mask; growth and pruning only flip the mask and overwrite inactive rows;
* geometry MLP ``G(gamma(x)) -> (sdf, albedo_raw)`` with the 256-d penultimate feature ``f_t``
  (the distillation target); ``albedo = sigmoid(10 * albedo_raw)``; canonical normal
  ``n = grad_x sdf / |grad_x sdf|``;
* deformer MLP ``D(x) -> (B_1..B_E, o)``; deformed point ``x' = x + o + sum_e psi_e B_e(x)`` for
  the expression code ``psi`` (no pose correctives, no skinning);
* shading MLP ``S(n_cam)`` of the camera-space normal ``n_cam = R n`` (``R`` = the rotation of
  ``world_mat``); colour ``c = clamp(2 * S(n_cam) * albedo, 0, 1)``.

Parameter count of the default teacher (``expression_dim=16``), weight-norm gains included
(``tests/models/test_teacher.py`` pins it from the layer sizes):

=========  =========================================================  ==========
network    layers (in -> out; wn = weight norm adds one gain per out)  parameters
=========  =========================================================  ==========
geometry   39->256, 256->256 x2, 256->217, 256->256 x5, 256->4; wn      529,850
deformer   3->128, 128->128 x3 (wn); heads 128->48, 128->3 (no wn)       57,139
shading    3->64, 64->64, 64->3; wn                                        4,742
total      canonical network (``canonical_network_parameters``)         591,731
=========  =========================================================  ==========

PointAvatar reports about 530 K (geometry), 102 K (its deformer, which also predicts 50
expression and 36 pose blendshapes and skinning weights) and 4.7 K (shading). The point
coordinates (``3 * max_points`` numbers, ``num_active`` of them in use) are not counted; they are
reported as ``num_points`` (DESIGN.md, "Counting rules").

Layouts (padded vs packed):

==============================  ======================  =======================================
tensor                          layout                  notes
==============================  ======================  =======================================
``points`` (parameter)          padded (N_max, 3)       only rows with ``active`` are used
``active`` (buffer)             padded (N_max,) bool
``radius`` (buffer)             scalar                  splat radius, canonical-space units
every MLP output                packed (N, ...)         N = ``num_active``, rows in ascending
                                                        order of ``active_indices()``
per-frame outputs               (B, N, ...)             same point order
==============================  ======================  =======================================

Choices stated here (DESIGN.md leaves them open):

* The geometry MLP is evaluated at *detached* point positions, as in PointAvatar: the SDF,
  albedo and normals do not move the points; points move through the deformer and the image.
* Geometric initialisation (Atzmon & Lipman, SAL, CVPR 2020; IDR): hidden weights
  N(0, sqrt(2)/sqrt(out)), zero biases, the encoded (sin/cos) inputs of the first and the skip
  layer zeroed, the SDF row of the last layer ~ N(sqrt(pi)/sqrt(256), 1e-4) with bias
  ``-sdf_init_radius`` (default 0.5, the radius of the initial point sphere; PointAvatar uses
  0.6). Then one deterministic least-squares calibration of the SDF row's gain and bias
  (``GeometryNetwork._calibrate_sphere``) so the zero level sits at ``sdf_init_radius`` with unit
  slope whatever the seed (Softplus(beta=100) at width 256 shifts it by tens of per cent). The
  albedo rows start at N(0, 1e-4) with bias 0 (albedo ~ 0.5 grey) instead of PointAvatar's copy
  of the SDF row.
* Shading MLP: ReLU hidden activations and a sigmoid output, weight norm (PointAvatar's).
* Deformer: Softplus(beta=100) hidden layers with weight norm and N(0, sqrt(2)/sqrt(out)) weights,
  zero-initialised heads without weight norm (a zero row would make weight norm divide 0 by 0).
* ``max_points`` defaults to 102,400 (PointAvatar: 409,600), a size a CPU can train; doubling from
  400 fills it exactly (400 * 2^8).
* Growth draws its noise from ``generator`` when given: under DDP pass a generator seeded the
  same on every rank (or broadcast the points afterwards) so the replicas stay identical.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from models.frame import PerFrame, check_world_mat

__all__ = [
    "positional_encoding",
    "fibonacci_sphere",
    "GeometryOutput",
    "CanonicalOutput",
    "GeometryNetwork",
    "DeformerNetwork",
    "ShadingNetwork",
    "PointAvatarTeacher",
]


def positional_encoding(x: torch.Tensor, num_frequencies: int) -> torch.Tensor:
    """NeRF positional encoding gamma(x) = [x, sin(2^0 x), cos(2^0 x), ..., sin(2^(F-1) x), cos(...)].

    No factor pi, as in IDR/PointAvatar.

    Args:
        x: (N, 3) float, canonical coordinates.
        num_frequencies: F >= 0.

    Returns:
        (N, 3 + 6F) float, same dtype as ``x``.
    """
    parts = [x]
    for k in range(num_frequencies):
        freq = 2.0**k
        parts.append(torch.sin(freq * x))
        parts.append(torch.cos(freq * x))
    return torch.cat(parts, dim=-1)  # (N, 3 + 6F)


def fibonacci_sphere(n: int, radius: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Deterministic, nearly uniform points on a sphere (golden-angle spiral).

    Args:
        n: number of points, >= 1.
        radius: sphere radius (canonical-space units).
        dtype: output dtype.

    Returns:
        (n, 3) points with norm ``radius``.

    Raises:
        ValueError: if ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"fibonacci_sphere needs n >= 1 points, got {n}")
    i = torch.arange(n, dtype=torch.float64)
    z = 1.0 - (2.0 * i + 1.0) / n
    rho = torch.sqrt((1.0 - z * z).clamp_min(0.0))
    phi = i * math.pi * (3.0 - math.sqrt(5.0))  # golden angle
    pts = torch.stack([rho * torch.cos(phi), rho * torch.sin(phi), z], dim=-1)  # (n, 3)
    return (radius * pts).to(dtype)


@dataclass
class GeometryOutput:
    """Outputs of :class:`GeometryNetwork` at N query points.

    Attributes:
        sdf: (N, 1) signed distance (canonical-space units, negative inside).
        albedo: (N, 3) in (0, 1), ``sigmoid(10 * raw)``.
        feature: (N, hidden) penultimate activation f_t (the distillation target).
        sdf_grad: (N, 3) unnormalised grad_x sdf (for the eikonal loss), or None.
        normals: (N, 3) unit canonical normals, or None.
    """

    sdf: torch.Tensor
    albedo: torch.Tensor
    feature: torch.Tensor
    sdf_grad: torch.Tensor | None = None
    normals: torch.Tensor | None = None


@dataclass
class CanonicalOutput:
    """Everything that depends only on the canonical points (cacheable per subject).

    Attributes:
        points: (N, 3) canonical points (attached to the ``points`` parameter when they are the
            model's own).
        indices: (N,) int64 rows of the model's buffer, or None for external points.
        sdf: (N, 1); albedo: (N, 3); feature: (N, 256) f_t; sdf_grad: (N, 3); normals: (N, 3)
            (``sdf_grad``/``normals`` None when computed without normals).
        blendshapes: (N, E, 3) expression blendshapes B_e(x) = s_e B'_e(x), per unit of the raw code
            (s_e the expression scale, one unless set: :meth:`PointAvatarTeacher.set_expression_scale`).
        offset: (N, 3) canonical offset o(x) - sum_e psi_c,e B_e(x) (psi_c the canonical
            expression, zero unless set: :meth:`PointAvatarTeacher.set_canonical_expression`).
    """

    points: torch.Tensor
    indices: torch.Tensor | None
    sdf: torch.Tensor
    albedo: torch.Tensor
    feature: torch.Tensor
    sdf_grad: torch.Tensor | None
    normals: torch.Tensor | None
    blendshapes: torch.Tensor
    offset: torch.Tensor


class GeometryNetwork(nn.Module):
    """Implicit geometry and albedo MLP of PointAvatar (IDR-style), with geometric initialisation.

    ``gamma(x)`` (3 + 6F) -> ``depth`` hidden layers of ``width`` (Softplus(beta=100)), the input
    encoding concatenated again (and the sum scaled by 1/sqrt(2)) before each layer in
    ``skip_layers`` -> linear layer to (sdf, albedo_raw x 3). Every layer is weight-normalised.

    Args:
        num_frequencies: positional-encoding frequencies F (PointAvatar: 6 -> 39-d input).
        width: hidden width (256).
        depth: number of hidden layers (9).
        skip_layers: indices of the linear layers whose input is [h, gamma(x)] / sqrt(2) ((4,)).
        sdf_init_radius: radius of the sphere the SDF starts as.
        beta: Softplus sharpness (100).

    Raises:
        ValueError: on sizes that cannot build the network.
    """

    def __init__(
        self,
        num_frequencies: int = 6,
        width: int = 256,
        depth: int = 9,
        skip_layers: tuple[int, ...] = (4,),
        sdf_init_radius: float = 0.5,
        beta: float = 100.0,
    ) -> None:
        super().__init__()
        if num_frequencies < 0 or width < 1 or depth < 1:
            raise ValueError(
                f"geometry MLP needs num_frequencies >= 0, width >= 1, depth >= 1; got "
                f"{num_frequencies}, {width}, {depth}"
            )
        self.num_frequencies = num_frequencies
        self.in_dim = 3 + 6 * num_frequencies
        self.width = width
        self.skip_layers = tuple(sorted(set(int(s) for s in skip_layers)))
        if any(s < 1 or s > depth for s in self.skip_layers):
            raise ValueError(f"skip_layers must lie in [1, depth={depth}], got {skip_layers}")
        if self.skip_layers and width <= self.in_dim:
            raise ValueError(f"skip connections need width > input size {self.in_dim}, got width={width}")
        self.beta = beta
        self.activation = nn.Softplus(beta=beta)

        num_linear = depth + 1
        layers = []
        for layer_idx in range(num_linear):
            d_in = self.in_dim if layer_idx == 0 else width
            if layer_idx == num_linear - 1:
                d_out = 4  # sdf + 3 albedo
            elif layer_idx + 1 in self.skip_layers:
                d_out = width - self.in_dim  # the next layer sees [h, gamma(x)] of size width
            else:
                d_out = width
            lin = nn.Linear(d_in, d_out)
            self._geometric_init(lin, layer_idx, num_linear, sdf_init_radius)
            layers.append(weight_norm(lin))
        self.layers = nn.ModuleList(layers)
        self._calibrate_sphere(sdf_init_radius)

    @torch.no_grad()
    def _calibrate_sphere(self, radius: float) -> None:
        """Rescale the SDF row so the initial SDF is |x| - radius in the least-squares sense.

        SAL's initialisation gives |x| - radius only in expectation and for ReLU; with
        Softplus(beta=100) (an offset of log(2)/100 per unit) and width 256 the initial slope
        and zero level vary by tens of per cent between seeds. A least-squares fit
        sdf ~ a |x| + c on fixed samples around the sphere (|x| in [0.25, 0.75], Fibonacci
        directions; no randomness) is undone through the SDF row: gain / a, bias
        (b - c) / a - radius. What stays is the angular ripple of a finite random network
        (about 0.05 mean absolute SDF error for |x| in [0.2, 1]; mean cos(normal, x/|x|) ~ 0.97).
        """
        dirs = fibonacci_sphere(128, 1.0)  # (128, 3)
        radii = torch.linspace(0.25, 0.75, 11)
        x = (radii[:, None, None] * dirs[None]).reshape(-1, 3)  # (11 * 128, 3)
        x = x.to(self.layers[0].bias.dtype)
        sdf = self.forward(x)[0][:, 0]
        design = torch.stack([x.norm(dim=-1), torch.ones_like(sdf)], dim=-1)  # (M, 2)
        slope, intercept = torch.linalg.lstsq(design, sdf[:, None]).solution[:, 0].tolist()
        if not slope > 1e-3:
            raise ValueError(
                f"geometric initialisation failed (fitted SDF slope {slope:.3g}); use another seed"
            )
        last = self.layers[-1]
        last.parametrizations.weight.original0[0] /= slope  # weight-norm gain of the SDF row
        last.bias[0] = (last.bias[0] - intercept) / slope - radius

    @torch.no_grad()
    def _geometric_init(self, lin: nn.Linear, layer_idx: int, num_linear: int, radius: float) -> None:
        d_in, d_out = lin.in_features, lin.out_features
        lin.bias.zero_()
        if layer_idx == num_linear - 1:
            # SDF row: mean sqrt(pi)/sqrt(d_in) so that sdf(x) ~ |x| - radius (SAL/IGR).
            lin.weight[0].normal_(math.sqrt(math.pi) / math.sqrt(d_in), 1e-4)
            lin.bias[0] = -radius
            lin.weight[1:].normal_(0.0, 1e-4)  # albedo rows: ~0.5 grey at start
            return
        lin.weight.normal_(0.0, math.sqrt(2.0) / math.sqrt(d_out))
        if layer_idx == 0 and self.num_frequencies > 0:
            lin.weight[:, 3:] = 0.0  # only raw xyz drive the start: a smooth sphere
        elif layer_idx in self.skip_layers and self.num_frequencies > 0:
            lin.weight[:, d_in - (self.in_dim - 3) :] = 0.0  # encoded part of the skip input

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluate the MLP.

        Args:
            x: (N, 3) canonical points.

        Returns:
            raw: (N, 4) = (sdf, albedo logits before the x10 sigmoid).
            feature: (N, width) the penultimate activation f_t.
        """
        raw, feature, _ = self._run(x, keep_preactivations=False)
        return raw, feature

    def _run(
        self, x: torch.Tensor, keep_preactivations: bool
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        enc = positional_encoding(x, self.num_frequencies)  # (N, in_dim)
        h = enc
        pre: list[torch.Tensor] = []
        last = len(self.layers) - 1
        for layer_idx, lin in enumerate(self.layers):
            if layer_idx in self.skip_layers:
                h = torch.cat([h, enc], dim=-1) / math.sqrt(2.0)  # (N, width)
            z = lin(h)
            if layer_idx == last:
                return z, h, pre
            if keep_preactivations:
                pre.append(z)
            h = self.activation(z)
        raise AssertionError("unreachable")

    def forward_with_gradient(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Evaluate the MLP and grad_x sdf by an explicit backward pass (no autograd.grad).

        The chain rule is written out layer by layer (Softplus' = sigmoid(beta z), the skip
        concatenation split back, d gamma/dx per frequency), so it also works under
        ``torch.inference_mode`` and traces as plain matmuls (for FLOP counters). Differentiable
        with respect to the weights like any other expression.

        Args:
            x: (N, 3) canonical points.

        Returns:
            raw: (N, 4); feature: (N, width); sdf_grad: (N, 3).
        """
        raw, feature, pre = self._run(x, keep_preactivations=True)
        weights = [lin.weight for lin in self.layers]
        g = weights[-1][0].expand(x.shape[0], -1)  # (N, width) d sdf / d h_last
        g_enc = torch.zeros(x.shape[0], self.in_dim, dtype=x.dtype, device=x.device)
        for layer_idx in range(len(self.layers) - 2, -1, -1):
            g = g * torch.sigmoid(self.beta * pre[layer_idx])  # (N, d_out) d sdf / d z
            g = g @ weights[layer_idx]  # (N, d_in) d sdf / d (layer input)
            if layer_idx in self.skip_layers:
                g = g / math.sqrt(2.0)
                split = g.shape[-1] - self.in_dim
                g_enc = g_enc + g[:, split:]
                g = g[:, :split]
        g_enc = g_enc + g  # layer 0 reads gamma(x)
        grad = g_enc[:, :3]
        for k in range(self.num_frequencies):
            freq = 2.0**k
            g_sin = g_enc[:, 3 + 6 * k : 6 + 6 * k]
            g_cos = g_enc[:, 6 + 6 * k : 9 + 6 * k]
            grad = grad + freq * (torch.cos(freq * x) * g_sin - torch.sin(freq * x) * g_cos)
        return raw, feature, grad


class DeformerNetwork(nn.Module):
    """Expression deformer: x -> ``depth`` x ``width`` Softplus(beta=100) -> blendshapes, offset.

    Args:
        expression_dim: E, the number of expression blendshapes.
        width: hidden width (128).
        depth: hidden layers (4).
        beta: Softplus sharpness (100).
    """

    def __init__(
        self, expression_dim: int = 16, width: int = 128, depth: int = 4, beta: float = 100.0
    ) -> None:
        super().__init__()
        if expression_dim < 1 or width < 1 or depth < 1:
            raise ValueError(
                f"deformer needs expression_dim, width, depth >= 1; got {expression_dim}, {width}, {depth}"
            )
        self.expression_dim = expression_dim
        layers = []
        for layer_idx in range(depth):
            lin = nn.Linear(3 if layer_idx == 0 else width, width)
            with torch.no_grad():
                lin.weight.normal_(0.0, math.sqrt(2.0) / math.sqrt(width))
                lin.bias.zero_()
            layers.append(weight_norm(lin))
        self.layers = nn.ModuleList(layers)
        self.activation = nn.Softplus(beta=beta)
        self.blendshape_head = nn.Linear(width, 3 * expression_dim)
        self.offset_head = nn.Linear(width, 3)
        for head in (self.blendshape_head, self.offset_head):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: x (N, 3). Returns: blendshapes (N, E, 3), offset (N, 3)."""
        h = x
        for lin in self.layers:
            h = self.activation(lin(h))
        blend = self.blendshape_head(h).reshape(x.shape[0], self.expression_dim, 3)  # (N, E, 3)
        return blend, self.offset_head(h)


class ShadingNetwork(nn.Module):
    """Shading MLP: camera-space normal (3) -> 64 -> 64 -> 3, ReLU hidden, sigmoid output, weight norm.

    Args:
        width: hidden width (64).
        depth: hidden layers (2).
    """

    def __init__(self, width: int = 64, depth: int = 2) -> None:
        super().__init__()
        if width < 1 or depth < 1:
            raise ValueError(f"shading MLP needs width, depth >= 1; got {width}, {depth}")
        dims = [3] + [width] * depth + [3]
        self.layers = nn.ModuleList(weight_norm(nn.Linear(a, b)) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, normals: torch.Tensor) -> torch.Tensor:
        """Args: normals (..., 3) unit camera-space normals. Returns: shading (..., 3) in (0, 1)."""
        h = normals
        for layer_idx, lin in enumerate(self.layers):
            h = lin(h)
            if layer_idx < len(self.layers) - 1:
                h = torch.relu(h)
        return torch.sigmoid(h)


class PointAvatarTeacher(PerFrame, nn.Module):
    """PointAvatar-style teacher (see the module docstring for the maths, sizes and layouts).

    Args:
        expression_dim: E, from the dataset (default 16).
        max_points: N_max, capacity of the point buffer (PointAvatar: 409,600; default 102,400).
        init_points: N0 points on a Fibonacci sphere at start (400).
        init_sphere_radius: radius of that sphere (0.5).
        min_points: pruning never leaves fewer active points than this floor (100).
        prune_threshold: points whose accumulated visibility is below this are pruned (0.5).
        radius_factor: the initial splat radius is ``radius_factor * 0.75 ** log2(N0 / 100)``
            (PointAvatar: 0.3); each growth multiplies it by 0.75.
        num_frequencies, geometry_width, geometry_depth, skip_layers, sdf_init_radius: geometry
            MLP (6, 256, 9, (4,), 0.5).
        deformer_width, deformer_depth: deformer MLP (128, 4).
        shading_width, shading_depth: shading MLP (64, 2).

    Raises:
        ValueError: on inconsistent sizes (e.g. ``min_points > init_points``).
    """

    avatar_name = "teacher"

    def __init__(
        self,
        expression_dim: int = 16,
        max_points: int = 102_400,
        init_points: int = 400,
        init_sphere_radius: float = 0.5,
        min_points: int = 100,
        prune_threshold: float = 0.5,
        radius_factor: float = 0.3,
        num_frequencies: int = 6,
        geometry_width: int = 256,
        geometry_depth: int = 9,
        skip_layers: tuple[int, ...] = (4,),
        sdf_init_radius: float = 0.5,
        deformer_width: int = 128,
        deformer_depth: int = 4,
        shading_width: int = 64,
        shading_depth: int = 2,
    ) -> None:
        super().__init__()
        if not 1 <= min_points <= init_points <= max_points:
            raise ValueError(
                "need 1 <= min_points <= init_points <= max_points, got "
                f"min_points={min_points}, init_points={init_points}, max_points={max_points}"
            )
        if init_sphere_radius <= 0 or radius_factor <= 0 or prune_threshold < 0:
            raise ValueError(
                "init_sphere_radius and radius_factor must be > 0 and prune_threshold >= 0, got "
                f"{init_sphere_radius}, {radius_factor}, {prune_threshold}"
            )
        self.expression_dim = expression_dim
        self.max_points = max_points
        self.min_points = min_points
        self.prune_threshold = prune_threshold

        points = torch.zeros(max_points, 3)
        points[:init_points] = fibonacci_sphere(init_points, init_sphere_radius)
        self.points = nn.Parameter(points)  # (N_max, 3) padded; inactive rows unused
        active = torch.zeros(max_points, dtype=torch.bool)
        active[:init_points] = True
        self.register_buffer("active", active)
        self.register_buffer("radius", torch.tensor(radius_factor * 0.75 ** math.log2(init_points / 100.0)))

        self.geometry = GeometryNetwork(
            num_frequencies=num_frequencies,
            width=geometry_width,
            depth=geometry_depth,
            skip_layers=skip_layers,
            sdf_init_radius=sdf_init_radius,
        )
        self.deformer = DeformerNetwork(expression_dim, width=deformer_width, depth=deformer_depth)
        self.shading = ShadingNetwork(width=shading_width, depth=shading_depth)
        # psi_c: the expression the canonical points are in (PointAvatar's use_mean_expression sets it
        # to the mean training expression); zero = the tracker's neutral
        self.register_buffer("canonical_expression", torch.zeros(expression_dim))
        # s_e: the deformer's blendshapes are per unit of s_e psi_e (1 / the training standard deviation
        # of each code component when normalised: every component learns at one rate); ones = raw codes
        self.register_buffer("expression_scale", torch.ones(expression_dim))

    # ------------------------------------------------------------------ point set

    @property
    def num_active(self) -> int:
        """Number of active points N (a host sync on GPU)."""
        return int(self.active.sum().item())

    @property
    def num_points(self) -> int:
        """Alias of :attr:`num_active` (the ``num_points`` of metrics.json)."""
        return self.num_active

    def active_indices(self) -> torch.Tensor:
        """(N,) int64 rows of the buffer that are active, ascending (the order of every output)."""
        return torch.nonzero(self.active, as_tuple=False).squeeze(1)

    def active_points(self) -> torch.Tensor:
        """(N, 3) active canonical points, attached to the ``points`` parameter."""
        return self.points[self.active_indices()]

    @torch.no_grad()
    def set_canonical_expression(self, expression: torch.Tensor) -> None:
        """Set psi_c, the expression of the canonical points (PointAvatar's ``use_mean_expression``:
        the mean training expression).

        Deformation becomes x' = x + o(x) + sum_e (psi_e - psi_c,e) B_e(x); :meth:`canonical` folds
        the constant part into its ``offset`` (o - sum_e psi_c,e B_e), so every consumer of the
        canonical outputs (the per-frame path, the student's distillation targets, export) is unchanged.

        Args:
            expression: (E,) float.

        Raises:
            ValueError: if the shape is not (E,).
        """
        if expression.shape != (self.expression_dim,):
            raise ValueError(f"canonical expression must be ({self.expression_dim},), got {tuple(expression.shape)}")
        self.canonical_expression.copy_(expression.to(self.canonical_expression))

    @torch.no_grad()
    def set_expression_scale(self, scale: torch.Tensor) -> None:
        """Set s_e, the scale of each expression component at the deformer's input.

        The deformer's blendshape head predicts B'_e, the displacement per unit of s_e psi_e;
        :meth:`canonical` returns B_e = s_e B'_e, so deformation stays x' = x + o + sum_e psi_e B_e for
        every consumer. With s_e = 1 / std_e of the training codes, a component that varies a hundred
        times less than the first (the PCA's tail) is no longer a hundred times slower to learn.

        Args:
            scale: (E,) positive float.

        Raises:
            ValueError: if the shape is not (E,) or a scale is not positive.
        """
        if scale.shape != (self.expression_dim,) or not bool((scale > 0).all()):
            raise ValueError(f"expression scale must be ({self.expression_dim},) positive values, got "
                             f"{tuple(scale.shape)}")
        self.expression_scale.copy_(scale.to(self.expression_scale))

    def canonical_network_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of geometry + deformer + shading MLPs (not the point coordinates)."""
        return [*self.geometry.parameters(), *self.deformer.parameters(), *self.shading.parameters()]

    @torch.no_grad()
    def grow(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Duplicate every active point with uniform noise and shrink the radius (PointAvatar upsampling).

        Each active point p gets a copy p + u, u ~ U[-r/2, r/2]^3 with r the current ``radius``,
        written into free rows; then ``radius *= 0.75``. Nothing happens when 2N > max_points.

        Args:
            generator: optional torch.Generator for the noise (seed it identically on every DDP
                rank); the noise is drawn on the generator's device.

        Returns:
            (M,) int64 rows that were activated (M = N, or 0 when the buffer is too full); reset
            their optimiser state with :meth:`reset_optimizer_rows`.
        """
        src = self.active_indices()
        n = src.numel()
        if 2 * n > self.max_points:
            return src.new_empty(0)
        dst = torch.nonzero(~self.active, as_tuple=False).squeeze(1)[:n]
        noise_device = generator.device if generator is not None else self.points.device
        noise = torch.rand(n, 3, generator=generator, device=noise_device, dtype=self.points.dtype)
        noise = (noise.to(self.points.device) - 0.5) * self.radius  # (N, 3) in [-r/2, r/2]
        self.points[dst] = self.points[src] + noise
        self.active[dst] = True
        self.radius.mul_(0.75)
        return dst

    @torch.no_grad()
    def prune(self, visibility: torch.Tensor) -> torch.Tensor:
        """Deactivate active points whose accumulated visibility is below ``prune_threshold``.

        Never leaves fewer than ``min_points`` active points: if the threshold would, the
        ``min_points`` most visible points (ties: lower row first) are kept and a warning is issued.
        All-reduce the visibility across DDP ranks before calling.

        Args:
            visibility: (N_max,) bool (visible or not) or numeric (accumulated counts/weights),
                indexed by buffer row; inactive rows are ignored.

        Returns:
            (M,) int64 rows that were deactivated.

        Raises:
            ValueError: if ``visibility`` is not of shape (max_points,).
        """
        if visibility.shape != (self.max_points,):
            raise ValueError(
                f"visibility must have shape ({self.max_points},) (one entry per buffer row), "
                f"got {tuple(visibility.shape)}"
            )
        vis = visibility.to(device=self.active.device, dtype=torch.float32)
        rows = self.active_indices()
        vis_active = vis[rows]
        keep = vis_active >= self.prune_threshold
        n_keep = int(keep.sum().item())
        if n_keep < self.min_points:
            n_floor = min(self.min_points, rows.numel())
            warnings.warn(
                f"prune would leave {n_keep} of {rows.numel()} active points, below min_points="
                f"{self.min_points}: keeping the {n_floor} most visible points instead",
                stacklevel=2,
            )
            order = torch.sort(-vis_active, stable=True).indices
            keep = torch.zeros_like(keep)
            keep[order[:n_floor]] = True
        removed = rows[~keep]
        self.active[removed] = False
        return removed

    @torch.no_grad()
    def reset_optimizer_rows(self, optimizer: torch.optim.Optimizer, rows: torch.Tensor) -> None:
        """Zero the per-row optimiser state (e.g. Adam moments) of ``points`` at ``rows``.

        Call after :meth:`grow`/:meth:`prune` so reused rows do not inherit the momentum of the
        points that lived there before. State tensors of another shape (e.g. ``step``) are kept.
        """
        state = optimizer.state.get(self.points, {})
        for value in state.values():
            if torch.is_tensor(value) and value.shape == self.points.shape:
                value[rows.to(value.device)] = 0

    # ------------------------------------------------------------------ networks

    def geometry_at(
        self,
        points: torch.Tensor,
        compute_normals: bool = True,
        create_graph: bool | None = None,
        method: str = "autograd",
    ) -> GeometryOutput:
        """Evaluate the geometry MLP at (detached) points; optionally SDF gradient and normals.

        Use it also for eikonal samples off the cloud.

        Args:
            points: (N, 3) canonical points; their own graph is cut (as in PointAvatar).
            compute_normals: compute ``sdf_grad`` and ``normals``.
            create_graph: keep the graph of the gradient so losses on ``sdf_grad``/``normals``
                train the MLP; default ``torch.is_grad_enabled()``.
            method: "autograd" (torch.autograd.grad) or "explicit" (:meth:`GeometryNetwork.
                forward_with_gradient`); under ``torch.inference_mode`` "explicit" is always used.

        Returns:
            :class:`GeometryOutput`; without grad mode every tensor is detached.

        Raises:
            ValueError: on a bad shape or method.
        """
        if points.dim() != 2 or points.shape[-1] != 3:
            raise ValueError(f"points must be (N, 3), got {tuple(points.shape)}")
        if method not in ("autograd", "explicit"):
            raise ValueError(f"method must be 'autograd' or 'explicit', got {method!r}")
        grad_enabled = torch.is_grad_enabled()
        if create_graph is None:
            create_graph = grad_enabled
        x = points.detach()
        sdf_grad = None
        if not compute_normals:
            raw, feature = self.geometry(x)
        elif method == "explicit" or torch.is_inference_mode_enabled():
            raw, feature, sdf_grad = self.geometry.forward_with_gradient(x)
        else:
            with torch.enable_grad():
                x = x.requires_grad_(True)
                raw, feature = self.geometry(x)
                (sdf_grad,) = torch.autograd.grad(
                    raw[:, 0].sum(), x, create_graph=create_graph, retain_graph=True
                )
            if not grad_enabled:
                raw, feature = raw.detach(), feature.detach()
        sdf = raw[:, :1]
        albedo = torch.sigmoid(10.0 * raw[:, 1:])
        normals = F.normalize(sdf_grad, dim=-1, eps=1e-12) if sdf_grad is not None else None
        return GeometryOutput(sdf=sdf, albedo=albedo, feature=feature, sdf_grad=sdf_grad, normals=normals)

    def canonical(
        self,
        points: torch.Tensor | None = None,
        compute_normals: bool = True,
        create_graph: bool | None = None,
        method: str = "autograd",
    ) -> CanonicalOutput:
        """Run geometry and deformer MLPs on the canonical points (per subject; cacheable).

        Args:
            points: (N, 3) canonical points; default the active points of the buffer.
            compute_normals, create_graph, method: see :meth:`geometry_at`.

        Returns:
            :class:`CanonicalOutput` of N points.
        """
        indices = None
        if points is None:
            indices = self.active_indices()
            points = self.points[indices]  # (N, 3) packed
        geo = self.geometry_at(
            points, compute_normals=compute_normals, create_graph=create_graph, method=method
        )
        blendshapes, offset = self.deformer(points)  # deformer input keeps the points' graph
        if not bool((self.expression_scale == 1).all()):  # B_e = s_e B'_e: per unit of the raw code
            blendshapes = blendshapes * self.expression_scale.to(blendshapes.dtype)[None, :, None]
        if bool(self.canonical_expression.any()):  # psi_c folded in: x' = x + (o - sum psi_c B) + sum psi B
            offset = offset - torch.einsum("e,nec->nc", self.canonical_expression.to(offset.dtype), blendshapes)
        return CanonicalOutput(
            points=points,
            indices=indices,
            sdf=geo.sdf,
            albedo=geo.albedo,
            feature=geo.feature,
            sdf_grad=geo.sdf_grad,
            normals=geo.normals,
            blendshapes=blendshapes,
            offset=offset,
        )

    def forward(
        self,
        expression: torch.Tensor,
        world_mat: torch.Tensor,
        canonical: CanonicalOutput | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Per-frame points and colours, plus the canonical outputs the losses need.

        Args:
            expression: (B, E) expression codes.
            world_mat: (B, 3, 4) or (B, 4, 4) world->camera.
            canonical: cached :meth:`canonical` output (default: computed now).

        Returns:
            dict with ``points`` (B, N, 3) deformed, ``colors`` (B, N, 3), ``shading`` (B, N, 3),
            ``normals_cam`` (B, N, 3), ``normals`` (N, 3) canonical, ``sdf`` (N, 1), ``sdf_grad``
            (N, 3), ``albedo`` (N, 3), ``feature`` (N, 256), ``blendshapes`` (N, E, 3), ``offset``
            (N, 3), ``canonical_points`` (N, 3), ``indices`` (N,) buffer rows (None for external
            canonical points), ``radius`` () splat radius.

        Raises:
            ValueError: on bad shapes or differing batch sizes.
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
            "sdf": canonical.sdf,
            "sdf_grad": canonical.sdf_grad,
            "albedo": canonical.albedo,
            "feature": canonical.feature,
            "blendshapes": canonical.blendshapes,
            "offset": canonical.offset,
            "canonical_points": canonical.points,
            "indices": canonical.indices,
            "radius": self.radius,
        }
