"""RandLA-Net blocks, the multi-level graph they run on, and the reference segmentation network.

Implements Hu et al., "RandLA-Net: Efficient Semantic Segmentation of Large-Scale Point Clouds"
(CVPR 2020), Sec. 3.2-3.4, with the structure of the authors' code (REFERENCES.md, "RandLA-Net"):

* **local spatial encoding** (LocSE, Eq. 1): for centre p_i and neighbour p_k the 10-d relative
  position r_ik = [|p_i - p_k|, p_i - p_k, p_i, p_k], through a shared 1x1 layer;
* **attentive pooling** (Eq. 2-3): scores s = softmax_k(W f_ik) with a bias-free dense W, the
  softmax taken over the K neighbours (per channel), f_i = sum_k s_ik * f_ik, then a 1x1 layer;
* **dilated residual block** (Fig. 3): 1x1 (d_in -> d/2); LocSE + attentive pooling twice
  (to d/2, then d); 1x1 (d -> 2d) plus a 1x1 shortcut (d_in -> 2d), LeakyReLU of the sum;
* **random sampling** (Sec. 3.3): keep the first n/decimation points of a random permutation of
  each level; every kept point max-pools the features of its K neighbours at the finer level;
* **nearest upsampling**: each point of a finer level copies the features of its nearest point
  at the coarser level; the decoder concatenates them with the skip features of that level.

The neighbour searches and the sampling are preprocessing, done once per cloud by
:func:`build_randla_graph` (as RandLA-Net's data pipeline precomputes them) and passed to the
networks as a :class:`RandLAGraph` of index tensors, so the forward passes hold no kNN, no random
numbers and no data-dependent Python control flow (they trace with ``torch.jit.trace``).
Neighbour gathers use :func:`models.ops.gather`.

Layout: one cloud per call, packed ``(N, C)`` features and ``(N, k)`` neighbour rows (the student
runs one subject at a time); relative-position and neighbour tensors are ``(N, k, C)``.

Level plan (:func:`level_plan`, also the clamping rule for tiny clouds): ``k_eff = min(k, N)``;
``n_0 = N``; ``n_{l+1} = n_l // decimation`` when that keeps at least ``k_eff`` points, else
``n_{l+1} = n_l`` (the level is not decimated: its sampling is the identity and its upsampling
too, but the block still runs and still max-pools over the neighbours). So every level that runs
a block has at least ``k_eff`` points and a full ``k_eff``-neighbourhood, the number of levels
(hence the parameters and the state_dict keys) never depends on N, and only the tensor sizes
do. Examples with k = 16, decimation 4, 4 levels: N = 45,056 -> 11,264 -> 2,816 -> 704 -> 176;
N = 400 -> 100 -> 25 -> 25 -> 25; N = 20 -> 20 (all levels).

Parameter count of the reference configuration (:class:`RandLANet` with its defaults: d_in 3,
19 classes, d_out [16, 64, 128, 256], SemanticKITTI), pinned in ``tests/models/test_randlanet.py``.
Every 1x1 layer has a bias and, where the reference has one, BatchNorm (gamma + beta; the running
statistics are buffers), exactly as the authors' ``helper_tf_util.conv2d``; the attention dense
layers have no bias:

==========================  ==============================================================  =========
part                        layers (in -> out)                                              params
==========================  ==============================================================  =========
fc0                         3 -> 8 + BN                                                            48
block 1 (8 -> 2x16)         1x1 8->8; LocSE 10->8, att 16x16, 16->8; LocSE 8->8, att           2,208
                            16x16, 16->16; 1x1 16->32; shortcut 8->32 (all + BN)
block 2 (32 -> 2x64)        same pattern, d = 64                                               30,336
block 3 (128 -> 2x128)      same pattern, d = 128                                             138,496
block 4 (256 -> 2x256)      same pattern, d = 256                                             547,328
decoder_0                   512 -> 512 + BN (1x1 on the coarsest level)                       263,680
decoder (4 upsamplings)     768->256, 384->128, 160->32, 64->32, each + BN                    254,272
head                        32->64 + BN, 64->32 + BN, dropout 0.5, 32->19                       5,011
total                                                                                       1,241,379
==========================  ==============================================================  =========

This is the paper's "1.24 M" exactly; there is no difference to explain. (Ports that drop the
redundant conv bias before BatchNorm, or the BN of the shortcut, count fewer.)

Choices stated here: every hidden activation is LeakyReLU(0.2), as in the authors' code (their
1x1 helper applies LeakyReLU(0.2) whenever a layer has an activation); BatchNorm keeps PyTorch's
defaults (eps 1e-5, momentum 0.1; the authors' TF layers use eps 1e-6 and a 0.99 moving-average
decay, i.e. momentum 0.01); ``norm="none"`` removes BatchNorm (the bias stays), for networks that
must behave identically in train and eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.ops import gather, knn, safe_norm

__all__ = [
    "NORMS",
    "SharedMLP",
    "relative_position_encoding",
    "AttentivePooling",
    "DilatedResidualBlock",
    "random_sample",
    "nearest_upsample",
    "RandLAGraph",
    "level_plan",
    "build_randla_graph",
    "RandLAEncoderDecoder",
    "RandLANet",
]

NORMS = ("batch", "none")
NEGATIVE_SLOPE = 0.2


def check_norm(norm: str) -> str:
    """Return ``norm`` if it is one of :data:`NORMS`; raise ValueError otherwise."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return norm


class SharedMLP(nn.Module):
    """Shared 1x1 layer: Linear (with bias) on the last dimension, then BatchNorm, then LeakyReLU.

    The 1x1 convolution of point networks (the same weights for every point and neighbour).
    BatchNorm statistics are taken over every leading position (all points, or all point x
    neighbour pairs), as a 2-D BatchNorm over (points, neighbours) in the reference.

    Args:
        in_channels: C_in.
        out_channels: C_out.
        norm: "batch" (BatchNorm1d over C_out) or "none".
        activation: apply LeakyReLU(``negative_slope``) at the end.
        negative_slope: LeakyReLU slope (0.2).

    Shapes:
        input (..., C_in) float -> output (..., C_out).

    Raises:
        ValueError: for non-positive sizes or an unknown norm.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm: str = "batch",
        activation: bool = True,
        negative_slope: float = NEGATIVE_SLOPE,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"SharedMLP needs positive sizes, got {in_channels} -> {out_channels}")
        self.linear = nn.Linear(in_channels, out_channels)
        self.norm = nn.BatchNorm1d(out_channels) if check_norm(norm) == "batch" else None
        self.activation = activation
        self.negative_slope = negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        if self.norm is not None:
            shape = y.shape
            y = self.norm(y.reshape(-1, shape[-1])).reshape(shape)  # (prod(...), C) -> (..., C)
        if self.activation:
            y = F.leaky_relu(y, self.negative_slope)
        return y


def relative_position_encoding(points: torch.Tensor, neighbors: torch.Tensor) -> torch.Tensor:
    """RandLA-Net's 10-d relative point position (Eq. 1): [|p_i - p_k|, p_i - p_k, p_i, p_k].

    The distance uses :func:`models.ops.safe_norm`, so a point that is its own neighbour
    (distance 0) gives a zero, not a NaN, gradient.

    Args:
        points: (N, 3) float, the level's coordinates.
        neighbors: (N, k) int64 rows of ``points``, the neighbours of each point.

    Returns:
        (N, k, 10) float, same dtype as ``points``.
    """
    neigh = gather(points, neighbors)  # (N, k, 3)
    centre = points.unsqueeze(1).expand_as(neigh)  # (N, k, 3)
    rel = centre - neigh  # (N, k, 3)
    dist = safe_norm(rel, dim=-1, keepdim=True)  # (N, k, 1)
    return torch.cat([dist, rel, centre, neigh], dim=-1)  # (N, k, 10)


class AttentivePooling(nn.Module):
    """Attentive pooling (RandLA-Net Eq. 2-3): softmax over the K neighbours, weighted sum, 1x1.

    s_ik = softmax_k(W f_ik) per channel (W: bias-free C_in x C_in dense layer), pooled
    f_i = sum_k s_ik * f_ik, output = SharedMLP(f_i).

    Args:
        in_channels: C_in of the neighbour feature set.
        out_channels: C_out.
        norm: see :class:`SharedMLP`.

    Shapes:
        input (N, k, C_in) -> output (N, C_out).
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str = "batch") -> None:
        super().__init__()
        self.score = nn.Linear(in_channels, in_channels, bias=False)
        self.mlp = SharedMLP(in_channels, out_channels, norm=norm)

    def attention(self, feature_set: torch.Tensor) -> torch.Tensor:
        """(N, k, C_in) -> (N, k, C_in) attention weights; they sum to 1 over k (dim 1)."""
        return torch.softmax(self.score(feature_set), dim=1)

    def forward(self, feature_set: torch.Tensor) -> torch.Tensor:
        pooled = (feature_set * self.attention(feature_set)).sum(dim=1)  # (N, C_in)
        return self.mlp(pooled)


class DilatedResidualBlock(nn.Module):
    """Dilated residual block of RandLA-Net (Fig. 3): two local feature aggregations and a shortcut.

    With h = d // 2: f = 1x1(d_in -> h); pos = LocSE(r_ik) (10 -> h); f = AttPool([f_k, pos])
    (2h -> h); pos = 1x1(pos) (h -> h); f = AttPool([f_k, pos]) (2h -> d); out =
    LeakyReLU(1x1(f) (d -> 2d, no activation) + shortcut (d_in -> 2d, no activation)). As in the
    authors' code the second LocSE re-encodes the first's output rather than the raw 10-d r_ik.

    Args:
        in_channels: d_in.
        channels: d (the block outputs 2d channels); >= 2.
        norm: see :class:`SharedMLP`.

    Shapes:
        features (N, d_in), points (N, 3), neighbors (N, k) int64 -> (N, 2d).
    """

    def __init__(self, in_channels: int, channels: int, norm: str = "batch") -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"a dilated residual block needs d >= 2 channels, got {channels}")
        half = channels // 2
        self.out_channels = 2 * channels
        self.mlp1 = SharedMLP(in_channels, half, norm=norm)
        self.locse1 = SharedMLP(10, half, norm=norm)
        self.pool1 = AttentivePooling(2 * half, half, norm=norm)
        self.locse2 = SharedMLP(half, half, norm=norm)
        self.pool2 = AttentivePooling(2 * half, channels, norm=norm)
        self.mlp2 = SharedMLP(channels, 2 * channels, norm=norm, activation=False)
        self.shortcut = SharedMLP(in_channels, 2 * channels, norm=norm, activation=False)

    def forward(self, features: torch.Tensor, points: torch.Tensor, neighbors: torch.Tensor) -> torch.Tensor:
        rel = relative_position_encoding(points, neighbors)  # (N, k, 10)
        f = self.mlp1(features)  # (N, h)
        pos = self.locse1(rel)  # (N, k, h)
        f = self.pool1(torch.cat([gather(f, neighbors), pos], dim=-1))  # (N, k, 2h) -> (N, h)
        pos = self.locse2(pos)  # (N, k, h)
        f = self.pool2(torch.cat([gather(f, neighbors), pos], dim=-1))  # (N, k, 2h) -> (N, d)
        return F.leaky_relu(self.mlp2(f) + self.shortcut(features), NEGATIVE_SLOPE)  # (N, 2d)


def random_sample(features: torch.Tensor, pool_index: torch.Tensor) -> torch.Tensor:
    """RandLA-Net's sampling step: each kept point takes the max of its neighbours' features.

    Args:
        features: (N, C) features of the finer level.
        pool_index: (M, k) int64 rows of ``features``: the neighbours (at the finer level) of
            the M kept points (``RandLAGraph.pool_index(l)``).

    Returns:
        (M, C) channel-wise maximum over the k neighbours.
    """
    return gather(features, pool_index).amax(dim=1)  # (M, k, C) -> (M, C)


def nearest_upsample(features: torch.Tensor, up_index: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour upsampling: finer point i copies coarser row ``up_index[i]``.

    Args:
        features: (M, C) features of the coarser level.
        up_index: (N,) int64 rows of ``features``, the nearest coarser point of each finer one.

    Returns:
        (N, C).
    """
    return gather(features, up_index)  # (N, C)


@dataclass
class RandLAGraph:
    """Precomputed neighbour, sampling and upsampling indices of a multi-level cloud.

    Level 0 is the input cloud (n_0 = N points); level l + 1 holds the rows
    ``sub_indices[l]`` of level l, so its points are ``points_l[sub_indices[l]]``. All tensors
    are int64 on the cloud's device.

    Attributes:
        neighbors: L tensors (n_l, k): the k nearest level-l points of every level-l point,
            itself included (it comes first), sorted by distance (the level-0 tensor is the
            cloud's kNN graph, also used by the GCN branch).
        sub_indices: L tensors (n_{l+1},): rows of level l kept at level l + 1 (the first
            n_{l+1} entries of a seeded random permutation; ``arange`` on a level that is not
            decimated).
        up_indices: L tensors (n_l,): row of level l + 1 nearest to each level-l point.
    """

    neighbors: list[torch.Tensor]
    sub_indices: list[torch.Tensor]
    up_indices: list[torch.Tensor]

    @property
    def num_levels(self) -> int:
        """L, the number of levels that run a block."""
        return len(self.neighbors)

    @property
    def k(self) -> int:
        """Neighbours per point (the clamped ``k_eff``)."""
        return int(self.neighbors[0].shape[1])

    @property
    def sizes(self) -> list[int]:
        """[n_0, ..., n_L] points per level."""
        return [int(t.shape[0]) for t in self.neighbors] + [int(self.sub_indices[-1].shape[0])]

    def pool_index(self, level: int) -> torch.Tensor:
        """(n_{l+1}, k) neighbours at level l of the points kept at level l + 1."""
        return self.neighbors[level][self.sub_indices[level]]  # (n_{l+1}, k)

    def level_points(self, points: torch.Tensor) -> list[torch.Tensor]:
        """[(n_0, 3), ..., (n_L, 3)] coordinates of every level, from the level-0 ``points``."""
        out = [points]
        for sub in self.sub_indices:
            out.append(out[-1][sub])
        return out

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The index tensors as a flat tuple (neighbors_0, sub_0, up_0, neighbors_1, ...)."""
        return tuple(t for level in zip(self.neighbors, self.sub_indices, self.up_indices) for t in level)

    @classmethod
    def from_tensors(cls, tensors: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> RandLAGraph:
        """Inverse of :meth:`tensors`.

        Raises:
            ValueError: if the number of tensors is not a positive multiple of 3.
        """
        tensors = list(tensors)
        if not tensors or len(tensors) % 3:
            raise ValueError(
                f"a RandLAGraph is 3 tensors per level (neighbors, sub_indices, up_indices), got {len(tensors)}"
            )
        return cls(list(tensors[0::3]), list(tensors[1::3]), list(tensors[2::3]))

    def to(self, device: torch.device | str) -> RandLAGraph:
        """A copy with every tensor on ``device``."""
        return RandLAGraph(
            [t.to(device) for t in self.neighbors],
            [t.to(device) for t in self.sub_indices],
            [t.to(device) for t in self.up_indices],
        )

    def validate(self, num_points: int | None = None, num_levels: int | None = None) -> None:
        """Check the shapes link up (level by level) and, if given, N and L.

        Raises:
            ValueError: naming the first inconsistency.
        """
        if not (len(self.neighbors) == len(self.sub_indices) == len(self.up_indices) >= 1):
            raise ValueError(
                "RandLAGraph needs the same number (>= 1) of neighbors, sub_indices and up_indices "
                f"tensors, got {len(self.neighbors)}, {len(self.sub_indices)}, {len(self.up_indices)}"
            )
        if num_levels is not None and self.num_levels != num_levels:
            raise ValueError(
                f"the graph has {self.num_levels} levels but the network has {num_levels}; build it "
                f"with num_levels={num_levels}"
            )
        if num_points is not None and self.neighbors[0].shape[0] != num_points:
            raise ValueError(
                f"the graph was built for {self.neighbors[0].shape[0]} points but the cloud has {num_points}"
            )
        k = self.neighbors[0].shape[-1]
        for level, (nb, sub, up) in enumerate(zip(self.neighbors, self.sub_indices, self.up_indices)):
            n = nb.shape[0]
            if nb.dim() != 2 or nb.shape[1] != k or sub.dim() != 1 or up.shape != (n,):
                raise ValueError(
                    f"graph level {level}: expected neighbors (n, {k}), sub_indices (m,), up_indices "
                    f"(n,) with n = {n}; got {tuple(nb.shape)}, {tuple(sub.shape)}, {tuple(up.shape)}"
                )
            if level + 1 < self.num_levels and self.neighbors[level + 1].shape[0] != sub.shape[0]:
                raise ValueError(
                    f"graph level {level + 1} has {self.neighbors[level + 1].shape[0]} points but "
                    f"level {level} keeps {sub.shape[0]}"
                )
            for name, t in (("neighbors", nb), ("sub_indices", sub), ("up_indices", up)):
                if t.is_floating_point() or t.dtype == torch.bool:
                    raise ValueError(f"graph level {level}: {name} must be an integer tensor, got {t.dtype}")


def level_plan(num_points: int, k: int, decimation: int, num_levels: int) -> tuple[int, list[int]]:
    """Clamped neighbour count and level sizes for a cloud of ``num_points`` (module docstring).

    Args:
        num_points: N >= 1.
        k: requested neighbours >= 1.
        decimation: points kept per level = n // decimation (>= 1).
        num_levels: L >= 1 levels that run a block.

    Returns:
        k_eff = min(k, N), and [n_0, ..., n_L] with n_0 = N and n_{l+1} = n_l // decimation if
        that is >= k_eff, else n_l.

    Raises:
        ValueError: for a non-positive argument.
    """
    for name, value in (
        ("num_points", num_points),
        ("k", k),
        ("decimation", decimation),
        ("num_levels", num_levels),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"level_plan: {name} must be an integer >= 1, got {value!r}")
    k_eff = min(k, num_points)
    sizes = [num_points]
    for _ in range(num_levels):
        n = sizes[-1]
        sizes.append(n // decimation if n // decimation >= k_eff else n)
    return k_eff, sizes


@torch.no_grad()
def build_randla_graph(
    points: torch.Tensor,
    k: int = 16,
    decimation: int = 4,
    num_levels: int = 4,
    seed: int = 0,
    backend: str | None = None,
) -> RandLAGraph:
    """Precompute RandLA-Net's multi-level kNN, random-sampling and upsampling indices.

    Per level l (sizes from :func:`level_plan`): the kNN of the level's points among themselves
    (:func:`models.ops.knn`, self included); the first n_{l+1} entries of a random permutation of
    the level's rows (a ``torch.Generator`` seeded with ``seed``, on the CPU, so the result is
    the same on every device and every call with the same seed); the nearest kept point of every
    level-l point. Training pipelines may draw a fresh seed per step (sampling as augmentation);
    evaluation uses a fixed seed, so it is deterministic. Per-subject preprocessing: not part of
    any FLOP count.

    Args:
        points: (N, 3) float canonical points (N >= 2); gradients are not tracked.
        k: neighbours per point (clamped to N).
        decimation: sampling ratio per level (RandLA-Net: 4).
        num_levels: L, the levels that run a block (RandLA-Net: 4).
        seed: seed of the sampling permutation.
        backend: ops backend for the kNN (see :func:`models.ops.get_backend`).

    Returns:
        :class:`RandLAGraph` on the device of ``points``.

    Raises:
        ValueError: for points that are not (N, 3) float with N >= 2, non-finite points, or a
            non-positive k, decimation or num_levels.
    """
    if not isinstance(points, torch.Tensor) or points.dim() != 2 or points.shape[1] != 3:
        shape = tuple(points.shape) if isinstance(points, torch.Tensor) else type(points).__name__
        raise ValueError(f"build_randla_graph: points must be a (N, 3) tensor, got {shape}")
    if not points.is_floating_point():
        raise ValueError(f"build_randla_graph: points must be floating point, got {points.dtype}")
    if points.shape[0] < 2:
        raise ValueError(f"build_randla_graph: need at least 2 points, got {points.shape[0]}")
    k_eff, sizes = level_plan(int(points.shape[0]), k, decimation, num_levels)
    generator = torch.Generator().manual_seed(int(seed))
    device = points.device
    xyz = points.detach()
    neighbors, subs, ups = [], [], []
    for level in range(num_levels):
        n, m = sizes[level], sizes[level + 1]
        neighbors.append(knn(xyz, xyz, k_eff, backend=backend)[0])  # (n, k_eff), all valid
        if m < n:
            sub = torch.randperm(n, generator=generator)[:m].to(device)  # (m,)
            sub_xyz = xyz[sub]  # (m, 3)
            up = knn(xyz, sub_xyz, 1, backend=backend)[0][:, 0]  # (n,)
        else:  # level not decimated (tiny cloud): identity sampling and upsampling
            sub = torch.arange(n, device=device)
            sub_xyz = xyz
            up = torch.arange(n, device=device)
        subs.append(sub)
        ups.append(up)
        xyz = sub_xyz
    return RandLAGraph(neighbors, subs, ups)


class RandLAEncoderDecoder(nn.Module):
    """RandLA-Net's encoder-decoder without the classification head.

    fc0 (d_in -> ``fc0_channels``) -> per level l: dilated residual block (-> 2 d_l) at level l,
    random sampling to level l + 1 -> 1x1 on the coarsest level ("decoder_0", keeps its width)
    -> per level from coarse to fine: nearest upsampling, concatenation with the skip features of
    that level (the block output at level 0, the sampled features at level l >= 1), 1x1 down to
    the skip width. Output width ``2 * channels[0]``.

    Args:
        in_channels: d_in of the input features (3 for xyz only).
        fc0_channels: width after fc0 (8).
        channels: d_out per level ((16, 64, 128, 256) in the reference); L = len(channels).
        norm: "batch" or "none" (see :class:`SharedMLP`).

    Shapes:
        features (N, d_in), points (N, 3), graph with L levels built on ``points`` ->
        (N, 2 * channels[0]).
    """

    def __init__(
        self,
        in_channels: int = 3,
        fc0_channels: int = 8,
        channels: tuple[int, ...] = (16, 64, 128, 256),
        norm: str = "batch",
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if not channels:
            raise ValueError("RandLAEncoderDecoder needs at least one level (channels is empty)")
        self.in_channels = in_channels
        self.num_levels = len(channels)
        self.fc0 = SharedMLP(in_channels, fc0_channels, norm=norm)
        blocks, d_in = [], fc0_channels
        for d in channels:
            blocks.append(DilatedResidualBlock(d_in, d, norm=norm))
            d_in = 2 * d
        self.encoder = nn.ModuleList(blocks)
        self.bottom = SharedMLP(d_in, d_in, norm=norm)
        skip = [2 * channels[0]] + [2 * d for d in channels[:-1]]  # width of the skip at level l
        decoder, width = [], d_in
        for level in reversed(range(self.num_levels)):
            decoder.append(SharedMLP(skip[level] + width, skip[level], norm=norm))
            width = skip[level]
        self.decoder = nn.ModuleList(decoder)  # coarse -> fine
        self.out_channels = skip[0]

    def _check_inputs(self, features: torch.Tensor, points: torch.Tensor, graph: RandLAGraph) -> None:
        if features.dim() != 2 or features.shape[1] != self.in_channels:
            raise ValueError(f"features must be (N, {self.in_channels}), got {tuple(features.shape)}")
        if points.dim() != 2 or points.shape != (features.shape[0], 3):
            raise ValueError(f"points must be (N, 3) with N = {features.shape[0]}, got {tuple(points.shape)}")
        if graph.num_levels != self.num_levels or graph.neighbors[0].shape[0] != points.shape[0]:
            raise ValueError(
                f"graph has {graph.num_levels} levels for {graph.neighbors[0].shape[0]} points; this network "
                f"needs {self.num_levels} levels for the {points.shape[0]} given points"
            )

    def forward(self, features: torch.Tensor, points: torch.Tensor, graph: RandLAGraph) -> torch.Tensor:
        """Per-point features.

        Raises:
            ValueError: if the shapes of ``features``, ``points`` and ``graph`` disagree.
        """
        if not torch.jit.is_tracing():  # shape checks would be recorded as constants
            self._check_inputs(features, points, graph)
        f = self.fc0(features)  # (N, fc0)
        xyz = points
        skips = []
        for level, block in enumerate(self.encoder):
            f = block(f, xyz, graph.neighbors[level])  # (n_l, 2 d_l)
            if level == 0:
                skips.append(f)
            f = random_sample(f, graph.pool_index(level))  # (n_{l+1}, 2 d_l)
            xyz = xyz[graph.sub_indices[level]]  # (n_{l+1}, 3)
            skips.append(f)
        f = self.bottom(skips[-1])  # (n_L, 2 d_{L-1})
        for step, level in enumerate(reversed(range(self.num_levels))):
            up = nearest_upsample(f, graph.up_indices[level])  # (n_l, C)
            f = self.decoder[step](torch.cat([skips[level], up], dim=-1))  # (n_l, skip_l)
        return f


class RandLANet(nn.Module):
    """The reference RandLA-Net segmentation network (SemanticKITTI configuration by default).

    Encoder-decoder (:class:`RandLAEncoderDecoder`) + head 1x1 (-> 64, BN) -> 1x1 (-> 32, BN)
    -> dropout -> 1x1 (-> classes, no BN, no activation). 1,241,379 parameters with the defaults
    (module docstring table).

    Args:
        in_channels: d_in (3).
        num_classes: output classes (19).
        fc0_channels: 8.
        channels: d_out per level ((16, 64, 128, 256)).
        head_channels: hidden widths of the head ((64, 32)).
        dropout: dropout probability before the last layer (0.5).
        norm: "batch" (reference) or "none".

    Shapes:
        features (N, d_in), points (N, 3), graph (:func:`build_randla_graph` with
        ``num_levels=len(channels)``) -> logits (N, num_classes).
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 19,
        fc0_channels: int = 8,
        channels: tuple[int, ...] = (16, 64, 128, 256),
        head_channels: tuple[int, ...] = (64, 32),
        dropout: float = 0.5,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        self.backbone = RandLAEncoderDecoder(in_channels, fc0_channels, channels, norm=norm)
        layers, width = [], self.backbone.out_channels
        for c in head_channels:
            layers.append(SharedMLP(width, c, norm=norm))
            width = c
        layers.append(nn.Dropout(dropout))
        layers.append(SharedMLP(width, num_classes, norm="none", activation=False))
        self.head = nn.Sequential(*layers)

    @property
    def num_levels(self) -> int:
        return self.backbone.num_levels

    def forward(self, features: torch.Tensor, points: torch.Tensor, graph: RandLAGraph) -> torch.Tensor:
        return self.head(self.backbone(features, points, graph))  # (N, num_classes)
