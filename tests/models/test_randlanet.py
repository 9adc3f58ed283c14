"""Tests of models/randlanet.py (RandLA-Net, Hu et al. CVPR 2020; DESIGN.md "Models" -> Student)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.randlanet import (
    AttentivePooling,
    DilatedResidualBlock,
    RandLAEncoderDecoder,
    RandLAGraph,
    RandLANet,
    build_randla_graph,
    level_plan,
    nearest_upsample,
    random_sample,
    relative_position_encoding,
)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def conv(i: int, o: int, bn: bool = True) -> int:
    """A 1x1 layer of the authors' code: weight + bias, plus BatchNorm gamma and beta."""
    return i * o + o + (2 * o if bn else 0)


def brute_knn(points: torch.Tensor, k: int) -> np.ndarray:
    """(N, k) neighbour rows sorted by (squared distance, index), float64 numpy."""
    p = points.double().numpy()
    d = ((p[:, None, :] - p[None, :, :]) ** 2).sum(-1)
    idx = np.arange(len(p))
    return np.stack([np.lexsort((idx, d[i]))[:k] for i in range(len(p))])


def random_cloud(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ golden count


def test_reference_parameter_count_is_the_papers_1_24_m():
    """fc0, four dilated residual blocks, decoder_0, four decoder layers, head; counted by hand."""

    def att(c_in, c_out):  # bias-free dense c_in x c_in, then a 1x1 with BN
        return c_in * c_in + conv(c_in, c_out)

    def block(d_in, d):
        h = d // 2
        return (
            conv(d_in, h)  # 1x1 d_in -> d/2
            + conv(10, h)
            + att(2 * h, h)  # LocSE 1 + attentive pooling 1
            + conv(h, h)
            + att(2 * h, d)  # LocSE 2 + attentive pooling 2
            + conv(d, 2 * d)
            + conv(d_in, 2 * d)  # 1x1 d -> 2d and the shortcut
        )

    blocks = [block(8, 16), block(32, 64), block(128, 128), block(256, 256)]
    decoder = [conv(256 + 512, 256), conv(128 + 256, 128), conv(32 + 128, 32), conv(32 + 32, 32)]
    head = conv(32, 64) + conv(64, 32) + conv(32, 19, bn=False)
    total = conv(3, 8) + sum(blocks) + conv(512, 512) + sum(decoder) + head
    assert total == 1_241_379  # the paper's "1.24 M"

    torch.manual_seed(0)
    net = RandLANet()  # d_in 3, 19 classes, d_out (16, 64, 128, 256), BatchNorm
    assert count(net) == 1_241_379
    assert count(net.backbone.fc0) == conv(3, 8) == 48
    assert [count(b) for b in net.backbone.encoder] == blocks
    assert count(net.backbone.bottom) == conv(512, 512)
    assert [count(m) for m in net.backbone.decoder] == decoder
    assert count(net.head) == head


# ------------------------------------------------------------------------------ building blocks


def test_relative_position_encoding_hand_case():
    points = torch.tensor([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0], [1.0, 0.0, 0.0]], requires_grad=True)
    neighbors = torch.tensor([[0, 1], [1, 2], [2, 0]])
    enc = relative_position_encoding(points, neighbors)
    assert enc.shape == (3, 2, 10)
    # centre 0, neighbour 1: [|p0 - p1|, p0 - p1, p0, p1]
    assert enc[0, 1].tolist() == [5.0, -3.0, -4.0, 0.0, 0.0, 0.0, 0.0, 3.0, 4.0, 0.0]
    # centre 1, neighbour 2: p1 - p2 = (2, 4, 0), |.| = sqrt(20)
    assert torch.allclose(enc[1, 1], torch.tensor([20**0.5, 2.0, 4.0, 0.0, 3.0, 4.0, 0.0, 1.0, 0.0, 0.0]))
    # a point is its own neighbour: zero distance, and a finite (zero) gradient through it
    assert enc[0, 0, :4].tolist() == [0.0, 0.0, 0.0, 0.0]
    enc[:, :, 0].sum().backward()
    assert torch.isfinite(points.grad).all()


def test_attention_softmax_is_over_the_neighbours():
    torch.manual_seed(0)
    pool = AttentivePooling(6, 4).double().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        pool.mlp.norm.running_mean.uniform_(-0.5, 0.5)
        pool.mlp.norm.running_var.uniform_(0.5, 2.0)
    fs = torch.randn(5, 7, 6, dtype=torch.float64)  # (N, k, C)
    weights = pool.attention(fs)
    assert torch.allclose(weights.sum(dim=1), torch.ones(5, 6, dtype=torch.float64), atol=1e-12)
    assert not torch.allclose(weights.sum(dim=2), torch.ones(5, 7, dtype=torch.float64))  # not over channels

    # Eq. 2-3 by hand: logits = W f, softmax over k with exp / sum, weighted sum, then the 1x1 + BN + LReLU
    logits = torch.einsum("nkc,dc->nkd", fs, pool.score.weight)
    expo = torch.exp(logits - logits.amax(dim=1, keepdim=True))
    hand_weights = expo / expo.sum(dim=1, keepdim=True)
    pooled = (fs * hand_weights).sum(dim=1)
    lin = pooled @ pool.mlp.linear.weight.T + pool.mlp.linear.bias
    bn = pool.mlp.norm
    normed = (lin - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    expected = torch.where(normed > 0, normed, 0.2 * normed)
    assert torch.allclose(pool(fs), expected, atol=1e-12)
    # a set function of the neighbours: their order does not matter
    perm = torch.randperm(7)
    assert torch.allclose(pool(fs[:, perm]), pool(fs), atol=1e-12)


def test_dilated_residual_block_shapes_symmetry_and_gradcheck():
    torch.manual_seed(0)
    points = random_cloud(8, seed=1).double()
    neighbors = torch.from_numpy(brute_knn(points, 4))
    block = DilatedResidualBlock(3, 6, norm="none").double()
    features = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    out = block(features, points, neighbors)
    assert out.shape == (8, 12) and block.out_channels == 12
    # LeakyReLU(0.2) output: some values are negative
    assert (out < 0).any()
    # neighbour order does not matter (softmax-weighted sums)
    shuffled = neighbors[:, torch.tensor([2, 0, 3, 1])]
    assert torch.allclose(block(features, points, shuffled), out, atol=1e-12)
    # finite differences agree with autograd w.r.t. features and coordinates
    pts = points.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda f, p: block(f, p, neighbors), (features, pts), eps=1e-6, atol=1e-6, fast_mode=True
    )


def test_random_sample_max_pools_hand_case():
    features = torch.tensor(
        [[1.0, -1.0], [5.0, 0.0], [2.0, 7.0], [0.0, 3.0], [-4.0, -2.0], [6.0, 1.0], [3.0, 3.0], [-1.0, 9.0]]
    )  # 8 points
    pool_index = torch.tensor([[0, 3, 5], [7, 2, 4]])  # the neighbours of the two kept points
    sampled = random_sample(features, pool_index)
    # kept point A: max over rows 0, 3, 5 = (max(1, 0, 6), max(-1, 3, 1)); B: rows 7, 2, 4
    assert sampled.tolist() == [[6.0, 3.0], [2.0, 9.0]]


def test_random_sample_through_the_graph_pools_the_kept_points_neighbours():
    x = torch.tensor([0.0, 1.0, 3.0, 7.0, 12.0, 20.0, 30.0, 45.0])  # 8 points on a line, no distance ties
    points = torch.stack([x, torch.zeros(8), torch.zeros(8)], dim=1)
    graph = build_randla_graph(points, k=3, decimation=2, num_levels=1, seed=5)
    kept = graph.sub_indices[0]
    assert kept.shape == (4,)
    # neighbours by hand: each point, then the nearest others along the line
    hand_neighbours = {0: {0, 1, 2}, 1: {1, 0, 2}, 2: {2, 1, 0}, 3: {3, 2, 4}, 4: {4, 3, 5}, 5: {5, 4, 6},
                       6: {6, 5, 7}, 7: {7, 6, 5}}  # fmt: skip
    for i in range(8):
        assert set(graph.neighbors[0][i].tolist()) == hand_neighbours[i]
        assert graph.neighbors[0][i, 0] == i  # the point itself comes first
    features = torch.arange(16, dtype=torch.float32).reshape(8, 2) * torch.tensor([1.0, -1.0])
    sampled = random_sample(features, graph.pool_index(0))
    for row, i in enumerate(kept.tolist()):
        rows = sorted(hand_neighbours[i])
        assert sampled[row].tolist() == [2.0 * max(rows), -2.0 * min(rows) - 1.0]


def test_nearest_upsampling_hand_case():
    coarse = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert nearest_upsample(coarse, torch.tensor([1, 0, 0, 1])).tolist() == [[3, 4], [1, 2], [1, 2], [3, 4]]

    x = torch.tensor([0.0, 1.0, 3.0, 7.0, 12.0, 20.0, 30.0, 45.0])
    points = torch.stack([x, torch.zeros(8), torch.zeros(8)], dim=1)
    graph = build_randla_graph(points, k=2, decimation=4, num_levels=1, seed=0)
    kept = graph.sub_indices[0].tolist()
    for i in range(8):  # the nearest kept point along the line, by hand
        nearest = min(range(2), key=lambda j: (abs(x[i] - x[kept[j]]).item(), j))
        assert graph.up_indices[0][i].item() == nearest
    for j, i in enumerate(kept):  # a kept point upsamples from itself
        assert graph.up_indices[0][i].item() == j


# ------------------------------------------------------------------------------ the graph


def test_level_plan_clamps_k_and_decimation():
    assert level_plan(45_056, 16, 4, 4) == (16, [45_056, 11_264, 2_816, 704, 176])
    assert level_plan(10_000, 16, 4, 4) == (16, [10_000, 2_500, 625, 156, 39])
    assert level_plan(400, 16, 4, 4) == (16, [400, 100, 25, 25, 25])  # 25 // 4 = 6 < 16: stop decimating
    assert level_plan(20, 16, 4, 2) == (16, [20, 20, 20])
    assert level_plan(10, 16, 4, 2) == (10, [10, 10, 10])  # k clamps to N
    with pytest.raises(ValueError, match="k must be"):
        level_plan(10, 0, 4, 2)


def test_random_sampling_covers_beyond_the_first_quarter():
    """Not the `randperm(N // d)` mistake: over 50 seeds, the kept rows reach the whole cloud."""
    n = 64
    points = random_cloud(n)
    union, draws = set(), set()
    for seed in range(50):
        sub = build_randla_graph(points, k=4, decimation=4, num_levels=1, seed=seed).sub_indices[0]
        assert sub.shape == (16,) and len(set(sub.tolist())) == 16
        assert 0 <= int(sub.min()) and int(sub.max()) < n
        union |= set(sub.tolist())
        draws.add(tuple(sorted(sub.tolist())))
    assert max(union) >= n // 4
    assert union == set(range(n))  # P(some row never drawn) < 64 * 0.75^50 ~ 4e-5
    assert len(draws) == 50


def test_graph_is_seeded_and_matches_brute_force():
    points = random_cloud(300, seed=2)
    graph = build_randla_graph(points, k=16, decimation=4, num_levels=3, seed=7)
    again = build_randla_graph(points, k=16, decimation=4, num_levels=3, seed=7)
    other = build_randla_graph(points, k=16, decimation=4, num_levels=3, seed=8)
    assert all(torch.equal(a, b) for a, b in zip(graph.tensors(), again.tensors()))
    assert not torch.equal(graph.sub_indices[0], other.sub_indices[0])

    assert graph.sizes == [300, 75, 18, 18] and graph.k == 16
    graph.validate(num_points=300, num_levels=3)
    level_points = graph.level_points(points)
    for level in range(3):
        p = level_points[level]
        assert torch.equal(graph.neighbors[level], torch.from_numpy(brute_knn(p, 16)))
        nxt = level_points[level + 1]
        d = ((p[:, None, :].double() - nxt[None, :, :].double()) ** 2).sum(-1)
        assert torch.equal(graph.up_indices[level], d.argmin(dim=1))
    # the last level is not decimated (18 // 4 < 16): identity sampling
    assert torch.equal(graph.sub_indices[2], torch.arange(18))
    assert torch.equal(graph.up_indices[2], torch.arange(18))


def test_graph_of_a_tiny_cloud_clamps():
    graph = build_randla_graph(random_cloud(20), k=16, decimation=4, num_levels=3)
    assert graph.sizes == [20, 20, 20, 20] and graph.k == 16
    for sub, up in zip(graph.sub_indices, graph.up_indices):
        assert torch.equal(sub, torch.arange(20)) and torch.equal(up, torch.arange(20))
    graph = build_randla_graph(random_cloud(5), k=16, num_levels=2)
    assert graph.k == 5 and graph.sizes == [5, 5, 5]


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        build_randla_graph(torch.zeros(10, 2))
    with pytest.raises(ValueError, match="at least 2 points"):
        build_randla_graph(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="3 tensors per level"):
        RandLAGraph.from_tensors([torch.zeros(3, 2, dtype=torch.long)] * 4)
    net = RandLAEncoderDecoder(3, 8, (8, 16), norm="none")
    points = random_cloud(40)
    with pytest.raises(ValueError, match="levels"):
        net(points, points, build_randla_graph(points, k=4, num_levels=3))
    with pytest.raises(ValueError, match="features must be"):
        net(points[:, :2], points, build_randla_graph(points, k=4, num_levels=2))
    with pytest.raises(ValueError, match="norm must be"):
        RandLAEncoderDecoder(norm="group")


# ------------------------------------------------------------------------------ model contract


@pytest.fixture(scope="module")
def cloud():
    points = random_cloud(256, seed=3)
    return points, build_randla_graph(points, k=16, decimation=4, num_levels=4, seed=0)


def test_reference_network_contract():
    """Output shape, determinism in eval, state_dict round trip into a fresh instance."""
    points = random_cloud(64, seed=3)
    graph = build_randla_graph(points, k=16, decimation=4, num_levels=4, seed=0)  # 64, 16, 16, 16, 16
    torch.manual_seed(0)
    net = RandLANet()
    net.train()
    net(points, points, graph)  # moves the BatchNorm running statistics away from their init
    net.eval()
    with torch.no_grad():
        logits = net(points, points, graph)
        again = net(points, points, graph)
        rebuilt = build_randla_graph(points, k=16, decimation=4, num_levels=4, seed=0)
        seeded = net(points, points, rebuilt)
    assert logits.shape == (64, 19) and torch.isfinite(logits).all()
    assert torch.equal(logits, again) and torch.equal(logits, seeded)

    torch.manual_seed(1)
    fresh = RandLANet().eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(points, points, graph), logits)
        fresh.load_state_dict(net.state_dict())
        assert torch.equal(fresh(points, points, graph), logits)


def test_gradients_reach_every_parameter(cloud):
    points, graph = cloud
    torch.manual_seed(0)
    net = RandLANet(channels=(8, 16, 16, 32), dropout=0.0).train()
    net(points, points, graph).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_encoder_decoder_output_width_and_point_order(cloud):
    """Output (N, 2 d_0); a per-point network: permuting the cloud (and its graph) permutes the output."""
    points, graph = cloud
    torch.manual_seed(0)
    net = RandLAEncoderDecoder(3, 8, (8, 16, 16, 32), norm="batch").eval()
    with torch.no_grad():
        out = net(points, points, graph)
        assert out.shape == (256, 16) and net.out_channels == 16
        perm = torch.randperm(256)
        inv = torch.argsort(perm)
        moved = RandLAGraph(
            [inv[graph.neighbors[0][perm]]] + graph.neighbors[1:],
            [inv[graph.sub_indices[0]]] + graph.sub_indices[1:],
            [graph.up_indices[0][perm]] + graph.up_indices[1:],
        )
        assert torch.allclose(net(points[perm], points[perm], moved), out[perm], atol=1e-5)
