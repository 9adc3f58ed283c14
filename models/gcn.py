"""EdgeConv (DGCNN) layers and the student's global graph branch.

Implements the edge convolution of Wang et al., "Dynamic Graph CNN for Learning on Point Clouds"
(ACM TOG 2019), Eq. 7-8 with the asymmetric edge function:

    x'_i = max_{j in N(i)} sigma(BN(W [x_i, x_j - x_i] + b))

with LeakyReLU(0.2) as sigma, and DGCNN's global descriptor: the concatenated EdgeConv outputs
through a shared 1x1 layer, max-pooled over all points and broadcast back to every point.

Factorised evaluation (REFERENCES.md, "DGCNN / EdgeConv"): with W = [W1 | W2],
W [x_i, x_j - x_i] = (W1 - W2) x_i + W2 x_j, so both products are computed once per point and
the second is gathered per edge: 2 N C_in C_out multiply-adds instead of 2 k N C_in C_out, the
same values (tested against the explicit edge features to 1e-10 in float64). The normalisation
and the activation still run per edge (they are not monotone in general, so the max cannot move
before them); they are element-wise, not multiply-adds.

Neighbourhood convention: a point is its own neighbour, as in the reference code and in
:func:`models.ops.knn` ``(x, x, k)`` (the self edge contributes h(x_i || 0)); the student passes
the level-0 kNN of :func:`models.randlanet.build_randla_graph`, which includes the point itself.

Dynamic graph (DGCNN's "dynamic" part, an option, off by default for cost): every EdgeConv
after the first recomputes the kNN in its input feature space with :func:`models.ops.knn`
(indices carry no gradient, as in DGCNN); the kNN search is then part of the forward pass.

Layout: one cloud per call, packed (N, C) features and (N, k) neighbour rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.ops import gather, knn
from models.randlanet import NEGATIVE_SLOPE, SharedMLP, check_norm

__all__ = ["EdgeConv", "GCNBranch"]


class EdgeConv(nn.Module):
    """Edge convolution x'_i = max_j LeakyReLU(BN(W [x_i, x_j - x_i] + b)), evaluated factorised.

    Args:
        in_channels: C_in.
        out_channels: C_out.
        norm: "batch" (BatchNorm over all N x k edges) or "none".
        negative_slope: LeakyReLU slope (0.2, DGCNN's).

    Attributes:
        linear: ``nn.Linear(2 C_in, C_out)``; its weight is [W1 | W2] acting on [x_i, x_j - x_i]
            (parameters: 2 C_in C_out + C_out, plus 2 C_out for BatchNorm).

    Shapes:
        x (N, C_in), neighbors (N, k) int64 rows of x (self included) -> (N, C_out).
    """

    def __init__(
        self, in_channels: int, out_channels: int, norm: str = "batch", negative_slope: float = NEGATIVE_SLOPE
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"EdgeConv needs positive sizes, got {in_channels} -> {out_channels}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.linear = nn.Linear(2 * in_channels, out_channels)
        self.norm = nn.BatchNorm1d(out_channels) if check_norm(norm) == "batch" else None
        self.negative_slope = negative_slope

    def edge_features(self, x: torch.Tensor, neighbors: torch.Tensor) -> torch.Tensor:
        """Pre-normalisation edge values W [x_i, x_j - x_i] + b, computed factorised.

        Returns:
            (N, k, C_out).
        """
        w1 = self.linear.weight[:, : self.in_channels]  # (C_out, C_in) acts on x_i
        w2 = self.linear.weight[:, self.in_channels :]  # (C_out, C_in) acts on x_j - x_i
        centre = F.linear(x, w1 - w2, self.linear.bias)  # (N, C_out)
        neighbour = F.linear(x, w2)  # (N, C_out)
        return centre.unsqueeze(1) + gather(neighbour, neighbors)  # (N, k, C_out)

    def aggregate(self, edges: torch.Tensor) -> torch.Tensor:
        """Normalisation, activation and max over the neighbours: (N, k, C_out) -> (N, C_out)."""
        if self.norm is not None:
            shape = edges.shape
            edges = self.norm(edges.reshape(-1, shape[-1])).reshape(shape)  # (N * k, C) -> (N, k, C)
        return F.leaky_relu(edges, self.negative_slope).amax(dim=1)

    def forward(self, x: torch.Tensor, neighbors: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing():  # shape checks would be recorded as constants
            if x.dim() != 2 or x.shape[1] != self.in_channels:
                raise ValueError(f"EdgeConv: x must be (N, {self.in_channels}), got {tuple(x.shape)}")
            if neighbors.dim() != 2 or neighbors.shape[0] != x.shape[0]:
                raise ValueError(
                    f"EdgeConv: neighbors must be (N, k) with N = {x.shape[0]}, got {tuple(neighbors.shape)}"
                )
        return self.aggregate(self.edge_features(x, neighbors))


class GCNBranch(nn.Module):
    """The student's global branch: stacked EdgeConvs + DGCNN's broadcast global descriptor.

    x_1 = EdgeConv(points), x_2 = EdgeConv(x_1), ... on the given kNN graph (or, with
    ``dynamic=True``, layers after the first on the kNN of their input features);
    local = [x_1, ..., x_m]; g = max over all points of SharedMLP(local) (the global descriptor,
    one vector per cloud); output = [local, g broadcast to every point].

    Args:
        in_channels: input features per point (3: the coordinates).
        edge_channels: output widths of the EdgeConv layers ((16, 16)).
        global_channels: width of the global descriptor (32).
        norm: "batch" or "none".
        dynamic: recompute the graph in feature space for every layer after the first.

    Attributes:
        out_channels: ``sum(edge_channels) + global_channels``.

    Shapes:
        x (N, in_channels), neighbors (N, k) int64 (self included) -> (N, out_channels).
    """

    def __init__(
        self,
        in_channels: int = 3,
        edge_channels: tuple[int, ...] = (16, 16),
        global_channels: int = 32,
        norm: str = "batch",
        dynamic: bool = False,
    ) -> None:
        super().__init__()
        edge_channels = tuple(int(c) for c in edge_channels)
        if not edge_channels:
            raise ValueError("GCNBranch needs at least one EdgeConv layer (edge_channels is empty)")
        self.in_channels = in_channels
        self.dynamic = dynamic
        convs, width = [], in_channels
        for c in edge_channels:
            convs.append(EdgeConv(width, c, norm=norm))
            width = c
        self.convs = nn.ModuleList(convs)
        self.local_channels = sum(edge_channels)
        self.global_mlp = SharedMLP(self.local_channels, global_channels, norm=norm)
        self.out_channels = self.local_channels + global_channels

    def local_features(self, x: torch.Tensor, neighbors: torch.Tensor) -> torch.Tensor:
        """(N, in_channels) -> (N, sum(edge_channels)): the concatenated EdgeConv outputs."""
        outputs, h, graph = [], x, neighbors
        for layer, conv in enumerate(self.convs):
            if self.dynamic and layer > 0:
                feat = h.detach()
                graph = knn(feat, feat, int(neighbors.shape[1]))[0]  # (N, k) in feature space
            h = conv(h, graph)  # (N, C_l)
            outputs.append(h)
        return torch.cat(outputs, dim=-1)  # (N, sum C_l)

    def global_descriptor(self, local: torch.Tensor) -> torch.Tensor:
        """(N, sum(edge_channels)) -> (1, global_channels): max over points of the shared 1x1."""
        return self.global_mlp(local).amax(dim=0, keepdim=True)

    def forward(self, x: torch.Tensor, neighbors: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and (x.dim() != 2 or x.shape[1] != self.in_channels):
            raise ValueError(f"GCNBranch: x must be (N, {self.in_channels}), got {tuple(x.shape)}")
        local = self.local_features(x, neighbors)  # (N, L)
        glob = self.global_descriptor(local)  # (1, G)
        return torch.cat([local, glob.expand(local.shape[0], -1)], dim=-1)  # (N, L + G)
