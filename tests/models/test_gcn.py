"""Tests of models/gcn.py (EdgeConv / DGCNN, Wang et al. TOG 2019; DESIGN.md "Models" -> Student)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models.gcn import EdgeConv, GCNBranch


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def randomise_batchnorm(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=gen))  # some negative gammas
                m.bias.copy_(torch.randn(m.num_features, generator=gen))


def naive_edgeconv(conv: EdgeConv, x: torch.Tensor, neighbors: torch.Tensor) -> torch.Tensor:
    """max_j LReLU(BN(W [x_i, x_j - x_i] + b)) with the edge features written out, by hand."""
    n, k = neighbors.shape
    xi = x[:, None, :].expand(n, k, x.shape[1])  # (N, k, C)
    xj = x[neighbors]  # (N, k, C)
    edges = torch.cat([xi, xj - xi], dim=-1)  # (N, k, 2C)
    h = edges @ conv.linear.weight.T + conv.linear.bias  # (N, k, C_out)
    bn = conv.norm
    if bn is not None:
        if bn.training:
            flat = h.reshape(-1, h.shape[-1])
            mean, var = flat.mean(0), flat.var(0, unbiased=False)
        else:
            mean, var = bn.running_mean, bn.running_var
        h = (h - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
    return torch.where(h > 0, h, 0.2 * h).amax(dim=1)


def random_graph(n: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (n, k), generator=gen)


def brute_knn(x: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(x.double(), x.double())
    return torch.argsort(d, dim=1, stable=True)[:, :k]


# ------------------------------------------------------------------------------ EdgeConv


@pytest.mark.parametrize("mode", ["eval", "train", "no norm"])
def test_factorised_edgeconv_equals_the_naive_edge_features(mode):
    """W [x_i, x_j - x_i] = (W1 - W2) x_i + W2 x_j on a random graph, float64, to 1e-10."""
    torch.manual_seed(0)
    conv = EdgeConv(5, 7, norm="none" if mode == "no norm" else "batch").double()
    randomise_batchnorm(conv)
    conv.train(mode == "train")
    x = torch.randn(30, 5, dtype=torch.float64)
    neighbors = random_graph(30, 6)
    out = conv(x, neighbors)
    assert out.shape == (30, 7)
    assert torch.allclose(out, naive_edgeconv(conv, x, neighbors), atol=1e-10, rtol=0)


def test_edgeconv_parameter_count_and_factorised_multiply_adds():
    conv = EdgeConv(5, 7).eval()
    assert count(conv) == 2 * 5 * 7 + 7 + 2 * 7  # Linear(2 C_in, C_out) + BatchNorm
    n, k = 50, 8
    x = torch.randn(n, 5)
    neighbors = random_graph(n, k)
    with FlopCounterMode(display=False) as factorised, torch.no_grad():
        conv.edge_features(x, neighbors)
    with FlopCounterMode(display=False) as naive, torch.no_grad():
        naive_edgeconv(conv, x, neighbors)
    # flop counter: 2 flops per multiply-add; two per-point products of C_in x C_out each
    assert factorised.get_total_flops() == 2 * (2 * n * 5 * 7)
    assert naive.get_total_flops() == 2 * (n * k * 10 * 7)  # k times more
    assert naive.get_total_flops() == k * factorised.get_total_flops()


def test_self_neighbour_convention_hand_case():
    """A point that is its own (only) neighbour: x'_i = LReLU(W1 x_i + b) (the x_j - x_i half is 0)."""
    conv = EdgeConv(2, 2, norm="none")
    with torch.no_grad():
        conv.linear.weight.copy_(torch.tensor([[1.0, 2.0, 5.0, 7.0], [-1.0, 0.0, 3.0, 3.0]]))
        conv.linear.bias.copy_(torch.tensor([0.5, -0.5]))
    x = torch.tensor([[1.0, 1.0], [2.0, -1.0]])
    out = conv(x, torch.tensor([[0], [1]]))
    # point 0: (1 + 2 + 0.5, -1 - 0.5) = (3.5, -1.5) -> (3.5, -0.3); point 1: (2 - 2 + 0.5, -2 - 0.5)
    assert torch.allclose(out, torch.tensor([[3.5, -0.3], [0.5, -0.5]]))
    # with neighbour 1 added to point 0: edge (x_0, x_1 - x_0) = (1, 1, 1, -2)
    out = conv(x, torch.tensor([[0, 1], [1, 1]]))
    # edge value: (1 + 2 + 5 - 14 + 0.5, -1 + 3 - 6 - 0.5) = (-5.5, -4.5) -> max with the self edge
    assert torch.allclose(out[0], torch.tensor([3.5, -0.3]))


def test_edgeconv_gradcheck():
    torch.manual_seed(0)
    conv = EdgeConv(3, 4, norm="none").double()
    x = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    neighbors = random_graph(10, 3, seed=1)
    assert torch.autograd.gradcheck(lambda t: conv(t, neighbors), (x,), eps=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ the branch


def test_global_descriptor_is_the_max_over_points_broadcast_to_every_point():
    torch.manual_seed(0)
    branch = GCNBranch(3, (8, 6), 5).double().eval()
    randomise_batchnorm(branch)
    points = torch.randn(40, 3, dtype=torch.float64)
    neighbors = brute_knn(points, 6)
    out = branch(points, neighbors)
    assert out.shape == (40, 8 + 6 + 5) and branch.out_channels == 19

    x1 = branch.convs[0](points, neighbors)
    x2 = branch.convs[1](x1, neighbors)
    local = torch.cat([x1, x2], dim=-1)
    assert torch.equal(out[:, :14], local)
    g = branch.global_mlp(local)  # (N, 5) before pooling
    assert torch.equal(out[:, 14:], g.max(dim=0).values.expand(40, 5))  # same vector at every point
    # the descriptor is global: moving one point changes the output of a far-away one
    far = int(torch.cdist(points[:1], points).argmax())
    moved = points.clone()
    moved[0] += 3.0
    changed = branch(moved, neighbors)
    assert not torch.allclose(changed[far, 14:], out[far, 14:])


def test_dynamic_graph_recomputes_the_knn_in_feature_space():
    torch.manual_seed(0)
    branch = GCNBranch(3, (8, 6), 5, dynamic=True).double().eval()
    points = torch.randn(40, 3, dtype=torch.float64)
    neighbors = brute_knn(points, 6)
    x1 = branch.convs[0](points, neighbors)
    x2 = branch.convs[1](x1, brute_knn(x1, 6))  # the second layer's graph: kNN of x1
    assert torch.allclose(branch.local_features(points, neighbors), torch.cat([x1, x2], -1), atol=1e-12)
    static = GCNBranch(3, (8, 6), 5, dynamic=False).double().eval()
    static.load_state_dict(branch.state_dict())
    assert not torch.allclose(static(points, neighbors), branch(points, neighbors))


def test_branch_contract():
    """Shapes, determinism in eval, gradients to every parameter, state_dict round trip."""
    torch.manual_seed(0)
    branch = GCNBranch()
    points = torch.randn(60, 3)
    neighbors = brute_knn(points, 16)
    branch(points, neighbors).square().mean().backward()
    for name, p in branch.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name

    branch.eval()
    with torch.no_grad():
        out = branch(points, neighbors)
        assert out.shape == (60, 64) and torch.equal(out, branch(points, neighbors))
        torch.manual_seed(1)
        fresh = GCNBranch().eval()
        assert not torch.allclose(fresh(points, neighbors), out)
        fresh.load_state_dict(branch.state_dict())
        assert torch.equal(fresh(points, neighbors), out)


def test_bad_inputs_raise():
    conv = EdgeConv(3, 4)
    with pytest.raises(ValueError, match=r"x must be \(N, 3\)"):
        conv(torch.zeros(5, 2), torch.zeros(5, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="neighbors must be"):
        conv(torch.zeros(5, 3), torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one EdgeConv"):
        GCNBranch(edge_channels=())
    with pytest.raises(ValueError, match="norm must be"):
        EdgeConv(3, 4, norm="layer")
