"""Tests of models/ops.py: both backends against each other and against brute-force references.

The "user report" cases reproduce failures people hit with fixed-k reshapes, empty or unsorted
batches, ratio-based FPS, max over negatives and duplicated points.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from models import ops

BACKENDS = ops.available_backends()
OPS_FILE = Path(__file__).resolve().parents[2] / "models" / "ops.py"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The loops of small ops (FPS) lose more to thread hand-offs on a busy machine than they gain."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------
# Brute-force references (numpy, float64, written independently of the implementation)
# ------------------------------------------------------------------------------------------


def brute_knn(x, y, k, bx=None, by=None):
    """Per query: same-cloud references sorted by (squared distance, index), first k."""
    X, Y = x.double().numpy(), y.double().numpy()
    bx = np.zeros(len(X), int) if bx is None else bx.numpy()
    by = np.zeros(len(Y), int) if by is None else by.numpy()
    out = []
    for i in range(len(X)):
        cand = np.nonzero(by == bx[i])[0]
        d = ((Y[cand] - X[i]) ** 2).sum(1)
        order = np.lexsort((cand, d))[:k]  # last key is primary
        out.append((cand[order].tolist(), d[order].tolist()))
    return out


def brute_graph(x, k, batch, loop):
    """Edge list [(j, i)] grouped by centre i, neighbours by (distance, index)."""
    X = x.double().numpy()
    b = np.zeros(len(X), int) if batch is None else batch.numpy()
    edges = []
    for i in range(len(X)):
        cand = np.array([j for j in np.nonzero(b == b[i])[0] if j != i], dtype=int)
        d = ((X[cand] - X[i]) ** 2).sum(1)
        nbrs = cand[np.lexsort((cand, d))].tolist()
        chosen = [i] + nbrs[: k - 1] if loop else nbrs[:k]
        edges += [(j, i) for j in chosen]
    return edges


def brute_fps(points, n, start=0):
    P = points.double().numpy()
    chosen = [start]
    dist = ((P - P[start]) ** 2).sum(1)
    while len(chosen) < n:
        j = int(np.argmax(dist))  # first index among equal maxima
        chosen.append(j)
        dist = np.minimum(dist, ((P - P[j]) ** 2).sum(1))
    return chosen


def brute_scatter(src, index, dim_size, reduce):
    S = src.detach().double().numpy()
    out = np.zeros((dim_size,) + S.shape[1:])
    for s in range(dim_size):
        rows = S[index.numpy() == s]
        if len(rows):
            out[s] = {"sum": rows.sum(0), "mean": rows.mean(0), "max": rows.max(0), "min": rows.min(0)}[
                reduce
            ]
    return torch.from_numpy(out)


def batch_of(sizes, shuffle_gen=None):
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    if shuffle_gen is not None:
        batch = batch[torch.randperm(len(batch), generator=shuffle_gen)]
    return batch


def check_knn_against_brute(index, valid, x, y, k, bx=None, by=None):
    ref = brute_knn(x, y, k, bx, by)
    for i, (ref_idx, ref_d) in enumerate(ref):
        n_valid = len(ref_idx)
        assert valid[i].tolist() == [True] * n_valid + [False] * (k - n_valid)
        assert index[i, :n_valid].tolist() == ref_idx
        # padded slots repeat the nearest neighbour, so gathers stay inside the cloud
        assert index[i, n_valid:].tolist() == [ref_idx[0]] * (k - n_valid)
        got_d = ((y[index[i, :n_valid]].double() - x[i].double()) ** 2).sum(1)
        np.testing.assert_allclose(got_d.numpy(), ref_d, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------
# Backend selection
# ------------------------------------------------------------------------------------------


def test_available_backends_and_resolution(monkeypatch):
    monkeypatch.delenv(ops.BACKEND_ENV_VAR, raising=False)
    try:
        import torch_cluster  # noqa: F401
        import torch_scatter  # noqa: F401

        importable = True
    except ImportError:
        importable = False
    assert ops.available_backends() == (["cluster", "torch"] if importable else ["torch"])
    assert ops.get_backend() == ("cluster" if importable else "torch")
    assert ops.get_backend("auto") == ops.get_backend(None)
    assert ops.get_backend("torch") == "torch"
    with pytest.raises(ValueError, match="unknown ops backend 'numpy'"):
        ops.get_backend("numpy")
    with pytest.raises(ValueError, match="unknown ops backend"):
        ops.knn(torch.rand(4, 3), torch.rand(4, 3), 2, backend="gpu")


def test_env_var_set_backend_and_context(monkeypatch):
    monkeypatch.setenv(ops.BACKEND_ENV_VAR, "torch")
    assert ops.get_backend() == "torch"
    monkeypatch.setenv(ops.BACKEND_ENV_VAR, "fast")
    with pytest.raises(ValueError, match=ops.BACKEND_ENV_VAR):
        ops.get_backend()
    monkeypatch.setenv(ops.BACKEND_ENV_VAR, "auto")
    auto = "cluster" if "cluster" in BACKENDS else "torch"
    assert ops.get_backend() == auto
    with ops.use_backend("torch") as name:
        assert name == "torch" and ops.get_backend() == "torch"
        assert ops.get_backend("auto") == "torch"
    assert ops.get_backend() == auto
    ops.set_backend("torch")
    try:
        assert ops.get_backend() == "torch"
    finally:
        ops.set_backend(None)
    assert ops.get_backend() == auto


def test_cluster_unavailable_falls_back_to_torch(monkeypatch):
    monkeypatch.delenv(ops.BACKEND_ENV_VAR, raising=False)
    monkeypatch.setattr(ops, "_cluster_importable", lambda: False)
    assert ops.available_backends() == ["torch"]
    assert ops.get_backend() == "torch"
    with pytest.raises(ValueError, match="torch_scatter and torch_cluster"):
        ops.get_backend("cluster")
    with pytest.raises(ValueError, match="torch_scatter and torch_cluster"):
        ops.set_backend("cluster")


def test_optional_packages_are_not_imported_at_module_level():
    tree = ast.parse(OPS_FILE.read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            top.add((node.module or "").split(".")[0])
    assert top == {"__future__", "contextlib", "functools", "math", "os", "collections", "torch"}


# ------------------------------------------------------------------------------------------
# kNN and kNN graph
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_matches_bruteforce_on_unsorted_batches(backend):
    gen = torch.Generator().manual_seed(0)
    sx, sy = [37, 5, 0, 120, 64], [40, 3, 2, 100, 1]  # cloud 2: references, no queries
    bx, by = batch_of(sx, gen), batch_of(sy, gen)
    x, y = torch.rand(len(bx), 3, generator=gen), torch.rand(len(by), 3, generator=gen)
    index, valid = ops.knn(x, y, 8, bx, by, backend=backend)
    assert index.dtype == torch.int64 and valid.dtype == torch.bool and index.shape == (len(bx), 8)
    check_knn_against_brute(index, valid, x, y, 8, bx, by)


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_single_cloud_float64_and_high_dimension(backend):
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(300, 3, generator=gen, dtype=torch.float64)
    index, valid = ops.knn(x, x, 16, backend=backend)
    check_knn_against_brute(index, valid, x, x, 16)
    assert torch.equal(index[:, 0], torch.arange(300))  # self is the nearest point
    feats = torch.randn(200, 32, generator=gen)  # feature-space kNN (PointDistiller)
    index, valid = ops.knn(feats, feats[:50], 5, backend=backend)
    check_knn_against_brute(index, valid, feats, feats[:50], 5)


def test_torch_knn_chunking_and_grouping(monkeypatch):
    # A tiny block budget forces query chunks inside a cloud, clouds split over blocks and
    # several small clouds sharing one masked block: the answer must not change.
    monkeypatch.setattr(ops, "_CHUNK_ELEMENTS", 300)
    gen = torch.Generator().manual_seed(16)
    sx, sy = [3, 4, 2, 90, 5, 6], [4, 2, 3, 70, 6, 5]
    bx, by = batch_of(sx, gen), batch_of(sy, gen)
    x, y = torch.rand(len(bx), 3, generator=gen), torch.rand(len(by), 3, generator=gen)
    index, valid = ops.knn(x, y, 5, bx, by, backend="torch")
    check_knn_against_brute(index, valid, x, y, 5, bx, by)


def test_backends_agree_with_each_other():
    gen = torch.Generator().manual_seed(2)
    sizes = [700, 3, 0, 1300]
    batch = batch_of(sizes, gen)
    x = torch.rand(len(batch), 3, generator=gen)
    results = [ops.knn(x, x, 16, batch, batch, backend=b) for b in BACKENDS]
    graphs = [ops.knn_graph(x, 16, batch, backend=b) for b in BACKENDS]
    samples = [ops.fps(x, [3, 3, 0, 3], batch, backend=b) for b in BACKENDS]
    for (index, valid), graph, sample in zip(results, graphs, samples):
        assert torch.equal(index, results[0][0]) and torch.equal(valid, results[0][1])
        assert torch.equal(graph, graphs[0])
        assert torch.equal(sample, samples[0])
    # and against the reference, on a subset of queries to keep the test fast
    rows = torch.arange(0, len(batch), 37)
    ref = brute_knn(x[rows], x, 16, batch[rows], batch)
    for r, (ref_idx, _) in zip(rows.tolist(), ref):
        assert results[0][0][r, : len(ref_idx)].tolist() == ref_idx


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_larger_than_a_cloud_does_not_mix_neighbours(backend):
    # User report: k = 32 with clouds [50, 31, 510]; a fixed-k reshape of a flat edge list
    # shifts the neighbours of every point after the 31-point cloud onto the wrong centre.
    gen = torch.Generator().manual_seed(3)
    sizes = [50, 31, 510]
    batch = batch_of(sizes)
    x = torch.rand(len(batch), 3, generator=gen)
    index, valid = ops.knn(x, x, 32, batch, batch, backend=backend)
    assert valid.sum(1).tolist() == [32] * 50 + [31] * 31 + [32] * 510
    assert int(valid.sum()) == 50 * 32 + 31 * 31 + 510 * 32 == 18881
    assert torch.equal(batch[index], batch[:, None].expand(-1, 32))  # padding stays in the cloud
    check_knn_against_brute(index, valid, x, x, 32, batch, batch)

    edges = ops.knn_graph(x, 32, batch, loop=False, backend=backend)
    assert edges.shape == (2, 50 * 32 + 31 * 30 + 510 * 32) == (2, 18850)
    assert edges.tolist() == [list(e) for e in zip(*brute_graph(x, 32, batch, loop=False))]
    assert not bool((edges[0] == edges[1]).any())
    degree = torch.bincount(edges[1], minlength=len(batch))
    assert degree.tolist() == [32] * 50 + [30] * 31 + [32] * 510

    edges = ops.knn_graph(x, 32, batch, loop=True, backend=backend)
    assert edges.shape == (2, 18881)
    assert edges.tolist() == [list(e) for e in zip(*brute_graph(x, 32, batch, loop=True))]
    assert int((edges[0] == edges[1]).sum()) == len(batch)  # exactly one self loop per point


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_cloud_in_batch(backend):
    gen = torch.Generator().manual_seed(4)
    batch = batch_of([20, 0, 15, 0, 6])
    x = torch.rand(len(batch), 3, generator=gen)
    edges = ops.knn_graph(x, 16, batch, backend=backend)
    assert edges.shape[1] == 20 * 16 + 15 * 14 + 6 * 5
    assert torch.equal(batch[edges[0]], batch[edges[1]])  # no edge crosses clouds
    assert edges.tolist() == [list(e) for e in zip(*brute_graph(x, 16, batch, loop=False))]
    # a cloud with queries but no reference points is named in the error
    y_batch = batch_of([4, 3, 0])  # cloud 2 of x has 15 queries and no references
    with pytest.raises(ValueError, match=r"cloud\(s\) \[2, 4\]"):
        ops.knn(x, torch.rand(7, 3), 4, batch, y_batch, backend=backend)
    with pytest.raises(ValueError, match="y has no points"):
        ops.knn(x, torch.rand(0, 3), 4, backend=backend)
    index, valid = ops.knn(torch.rand(0, 3), x, 4, backend=backend)
    assert index.shape == valid.shape == (0, 4)
    assert ops.knn_graph(torch.rand(0, 3), 4, backend=backend).shape == (2, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsorted_batch_gives_the_sorted_graph(backend):
    gen = torch.Generator().manual_seed(5)
    batch = batch_of([40, 25, 60])
    x = torch.rand(len(batch), 3, generator=gen)
    perm = torch.randperm(len(batch), generator=gen)
    sorted_edges = ops.knn_graph(x, 10, batch, backend=backend)
    shuffled = ops.knn_graph(x[perm], 10, batch[perm], backend=backend)
    mapped = perm[shuffled]  # back to the sorted numbering

    def by_centre(e):
        return {i: e[0, e[1] == i].tolist() for i in range(len(batch))}

    assert by_centre(mapped) == by_centre(sorted_edges)
    assert sorted(shuffled[1].tolist()) == shuffled[1].tolist()  # grouped by centre


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicated_points_give_no_nan(backend):
    gen = torch.Generator().manual_seed(6)
    base = torch.rand(30, 3, generator=gen)
    x = base.repeat(3, 1)  # every point three times: rows i, i + 30, i + 60
    index, valid = ops.knn(x, x, 4, backend=backend)
    assert bool(valid.all())
    d = ((x[index] - x[:, None]) ** 2).sum(-1)
    assert d[:, :3].abs().max() == 0  # the three copies come first, lowest index first
    assert torch.equal(
        index[:, :3], torch.stack([torch.arange(30)] * 3, 1).repeat(3, 1) + torch.tensor([0, 30, 60])
    )
    edges = ops.knn_graph(x, 4, backend=backend)
    assert edges.shape == (2, 90 * 4) and not bool((edges[0] == edges[1]).any())

    # zero-length relative vectors p_j - p_i: norms and gradients stay finite
    pts = x.clone().requires_grad_(True)
    rel = ops.gather(pts, edges[0]) - pts[edges[1]]  # (E, 3)
    dist = ops.safe_norm(rel)
    weights = ops.scatter_softmax(-dist, edges[1], dim_size=90, backend=backend)
    out = ops.scatter(weights[:, None] * rel, edges[1], dim_size=90, reduce="sum", backend=backend)
    out.sum().backward()
    assert bool(torch.isfinite(dist).all() and torch.isfinite(out).all() and torch.isfinite(pts.grad).all())
    assert int((dist == 0).sum()) == 90 * 2  # two duplicates per point among its 4 neighbours


def test_safe_norm_values_and_gradients():
    v = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    n = ops.safe_norm(v)
    assert n.tolist() == [5.0, 0.0]
    (g,) = torch.autograd.grad(n.sum(), v, create_graph=True)
    torch.testing.assert_close(g, torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64))
    (g2,) = torch.autograd.grad(g.sum(), v)  # twice differentiable, still finite at zero
    assert bool(torch.isfinite(g2).all())
    torch.autograd.gradcheck(ops.safe_norm, (torch.randn(4, 3, dtype=torch.float64, requires_grad=True),))


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_upcasts_half_precision_and_ignores_autocast(backend):
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(200, 3, generator=gen)
    ref = ops.knn(x.bfloat16().float(), x.bfloat16().float(), 8, backend=backend)
    got = ops.knn(x.bfloat16(), x.bfloat16(), 8, backend=backend)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    plain = ops.knn(x, x, 8, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = ops.knn(x, x, 8, backend=backend)
    assert torch.equal(auto[0], plain[0])


def test_knn_input_validation():
    x = torch.rand(10, 3)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        ops.knn(x, x, 0)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        ops.knn_graph(x, 2.5)
    with pytest.raises(ValueError, match="same dimension"):
        ops.knn(x, torch.rand(10, 2), 2)
    with pytest.raises(ValueError, match="both batch_x and batch_y"):
        ops.knn(x, x, 2, batch_x=torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match=r"one cloud id per point \(10\)"):
        ops.knn_graph(x, 2, batch=torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="integer cloud ids"):
        ops.knn_graph(x, 2, batch=torch.zeros(10))
    with pytest.raises(ValueError, match="negative cloud ids"):
        ops.knn_graph(x, 2, batch=-torch.ones(10, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(N, D\) tensor"):
        ops.knn(torch.rand(2, 5, 3), x, 2)
    with pytest.raises(ValueError, match="NaN or infinite"):
        ops.knn(torch.full((3, 3), float("nan")), x, 2)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace` is deprecated")
def test_knn_traces_on_the_torch_backend():
    gen = torch.Generator().manual_seed(8)
    a, b = torch.rand(64, 3, generator=gen), torch.rand(64, 3, generator=gen)

    def run(p):
        return ops.knn(p, p, 6, backend="torch")[0]

    traced = torch.jit.trace(run, (a,), check_trace=False)
    assert torch.equal(traced(b), run(b))

    def sample(p):
        return ops.fps(p, 10, backend="torch")

    traced = torch.jit.trace(sample, (a,), check_trace=False)
    assert traced(b).tolist() == brute_fps(b, 10)


# ------------------------------------------------------------------------------------------
# FPS
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_fps_exact_count_for_every_size(backend):
    # User report: ratio-based FPS returns 101 points for N = 732 when 100 are asked for.
    gen = torch.Generator().manual_seed(9)
    sizes = list(range(100, 2001, 100))
    batch = batch_of(sizes)
    x = torch.rand(len(batch), 3, generator=gen)
    idx = ops.fps(x, 100, batch, backend=backend)
    assert idx.shape == (100 * len(sizes),) and idx.dtype == torch.int64
    start = 0
    for c, n in enumerate(sizes):
        part = idx[100 * c : 100 * (c + 1)]
        assert part.unique().numel() == 100
        assert bool(((part >= start) & (part < start + n)).all())
        assert part[0] == start  # deterministic start: the cloud's first point
        start += n
    cloud = torch.rand(732, 3, generator=gen)
    single = ops.fps(cloud, 100, backend=backend)
    assert single.shape == (100,) and single.unique().numel() == 100
    assert single.tolist() == brute_fps(cloud, 100)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fps_matches_bruteforce_per_cloud_counts_and_unsorted(backend):
    gen = torch.Generator().manual_seed(10)
    sizes, wanted = [50, 7, 0, 80], [12, 7, 0, 1]
    batch = batch_of(sizes)
    x = torch.rand(len(batch), 3, generator=gen)
    idx = ops.fps(x, wanted, batch, backend=backend)
    expected, start = [], 0
    for n, s in zip(sizes, wanted):
        if s:
            expected += [start + j for j in brute_fps(x[start : start + n], s)]
        start += n
    assert idx.tolist() == expected
    perm = torch.randperm(len(batch), generator=gen)
    shuffled = ops.fps(x[perm], wanted, batch[perm], backend=backend)
    # same picks; the start is the first point of each cloud in the shuffled order
    assert batch[perm][shuffled].tolist() == [0] * 12 + [1] * 7 + [3]
    shuffled_expected, pos = [], torch.arange(len(batch))
    for c, s in enumerate(wanted):
        members = pos[batch[perm] == c]
        if s:
            shuffled_expected += members[brute_fps(x[perm][members], s)].tolist()
    assert shuffled.tolist() == shuffled_expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_fps_errors_and_random_start(backend):
    batch = batch_of([10, 33, 5])
    x = torch.rand(len(batch), 3)
    with pytest.raises(ValueError, match="cloud 0 has 10 < 32, cloud 2 has 5 < 32"):
        ops.fps(x, 32, batch, backend=backend)
    with pytest.raises(ValueError, match="has 48 points, fewer than the 49"):
        ops.fps(x, 49, backend=backend)
    with pytest.raises(ValueError, match="num_samples gives 2 counts"):
        ops.fps(x, [1, 1], batch, backend=backend)
    with pytest.raises(ValueError, match=">= 0"):
        ops.fps(x, -1, backend=backend)
    torch.manual_seed(0)
    idx = ops.fps(x, 5, batch, random_start=True, backend=backend)
    for c in range(3):
        part = idx[5 * c : 5 * (c + 1)]
        assert part.unique().numel() == 5 and bool((batch[part] == c).all())
    assert ops.fps(x, 0, batch, backend=backend).numel() == 0


# ------------------------------------------------------------------------------------------
# gather, scatter, softmax, layouts
# ------------------------------------------------------------------------------------------


def test_gather_packed_and_padded():
    x = torch.arange(12.0).view(6, 2)
    index = torch.tensor([[0, 5], [3, 3]])
    assert ops.gather(x, index).tolist() == [[[0, 1], [10, 11]], [[6, 7], [6, 7]]]
    padded = torch.arange(24.0).view(2, 4, 3)
    bidx = torch.tensor([[[3, 0]], [[1, 2]]])  # (B=2, M=1, k=2)
    out = ops.gather(padded, bidx)
    assert out.shape == (2, 1, 2, 3)
    assert out.tolist() == [[[[9, 10, 11], [0, 1, 2]]], [[[15, 16, 17], [18, 19, 20]]]]
    with pytest.raises(ValueError, match=r"values must lie in \[0, 6\), got \[-1, 2\]"):
        ops.gather(x, torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match=r"values must lie in \[0, 4\)"):
        ops.gather(padded, torch.tensor([[[4]], [[0]]]))
    with pytest.raises(ValueError, match="integer tensor"):
        ops.gather(x, torch.tensor([0.0]))
    with pytest.raises(ValueError, match=r"\(B, M, k\) index with B = 2"):
        ops.gather(padded, torch.tensor([[0, 1]]))


def test_gather_gradcheck():
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([[0, 4, 4], [2, 1, 0]])
    torch.autograd.gradcheck(lambda t: ops.gather(t, index), (x,))
    xp = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    bidx = torch.tensor([[[0, 3], [3, 3]], [[1, 2], [0, 0]]])
    torch.autograd.gradcheck(lambda t: ops.gather(t, bidx), (xp,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_scatter_hand_values_negative_max_and_upcast(backend, dtype):
    src = torch.tensor([-3.0, -1.0, -2.0, -5.0], dtype=dtype)
    index = torch.tensor([0, 0, 0, 2])
    expected = {
        "sum": [-6.0, 0.0, -5.0, 0.0],
        "mean": [-2.0, 0.0, -5.0, 0.0],
        "max": [-1.0, 0.0, -5.0, 0.0],  # negatives survive; empty segments 1 and 3 get 0
        "min": [-3.0, 0.0, -5.0, 0.0],
    }
    for reduce, values in expected.items():
        out = ops.scatter(src, index, dim_size=4, reduce=reduce, backend=backend)
        assert out.dtype == torch.float32 and out.tolist() == values
    out2d = ops.scatter(torch.stack([src, -src], 1), index, reduce="max", backend=backend)
    assert out2d.dtype == torch.float32 and out2d.tolist() == [[-1.0, 3.0], [0.0, 0.0], [-5.0, 5.0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_scatter_matches_bruteforce_and_autocast(backend):
    gen = torch.Generator().manual_seed(11)
    src = torch.randn(200, 5, generator=gen)
    index = torch.randint(0, 30, (200,), generator=gen)
    index[index == 7] = 8  # segment 7 empty
    for reduce in ("sum", "mean", "max", "min"):
        out = ops.scatter(src, index, dim_size=33, reduce=reduce, backend=backend)
        torch.testing.assert_close(out.double(), brute_scatter(src, index, 33, reduce), rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = ops.scatter(src, index, dim_size=33, reduce=reduce, backend=backend)
        assert auto.dtype == torch.float32 and torch.equal(auto, out)
    # bf16 activations coming out of an autocast region are reduced in float32
    layer = torch.nn.Linear(5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = layer(src)
        assert feats.dtype == torch.bfloat16
        out = ops.scatter(feats, index, dim_size=33, reduce="sum", backend=backend)
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out.double(), brute_scatter(feats.float(), index, 33, "sum"), rtol=1e-5, atol=1e-5
    )


def test_scatter_backends_agree_including_gradients():
    gen = torch.Generator().manual_seed(12)
    src = torch.randn(100, 4, generator=gen)
    index = torch.randint(0, 20, (100,), generator=gen)
    for reduce in ("sum", "mean", "max", "min"):
        outs, grads = [], []
        for backend in BACKENDS:
            s = src.clone().requires_grad_(True)
            out = ops.scatter(s, index, dim_size=22, reduce=reduce, backend=backend)
            (out * torch.arange(88.0).view(22, 4)).sum().backward()
            outs.append(out.detach())
            grads.append(s.grad)
        for out, grad in zip(outs, grads):
            torch.testing.assert_close(out, outs[0], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(grad, grads[0])


@pytest.mark.parametrize("reduce", ["sum", "mean", "max", "min"])
def test_scatter_gradcheck_torch_backend(reduce):
    gen = torch.Generator().manual_seed(13)
    src = torch.randn(12, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([0, 1, 1, 3, 3, 3, 0, 4, 4, 1, 0, 3])  # segment 2 empty
    out = ops.scatter(src, index, dim_size=5, reduce=reduce, backend="torch")
    assert out.dtype == torch.float64
    torch.autograd.gradcheck(lambda s: ops.scatter(s, index, 5, reduce, backend="torch"), (src,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_scatter_softmax(backend):
    src = torch.tensor([1000.0, 1000.0, 1001.0, 0.0, float("-inf"), float("-inf")])
    index = torch.tensor([0, 0, 1, 1, 1, 3])
    out = ops.scatter_softmax(src, index, dim_size=4, backend=backend)
    assert out.dtype == torch.float32
    e = np.exp(-1001.0)
    expected = torch.tensor([0.5, 0.5, 1 / (1 + e), e / (1 + e), 0.0, 0.0], dtype=torch.float32)
    torch.testing.assert_close(out, expected)
    gen = torch.Generator().manual_seed(14)
    logits = torch.randn(50, 2, generator=gen)
    seg = torch.randint(0, 6, (50,), generator=gen)
    out = ops.scatter_softmax(logits.bfloat16(), seg, backend=backend)
    assert out.dtype == torch.float32
    for s in range(6):
        rows = logits.bfloat16().float()[seg == s]
        torch.testing.assert_close(out[seg == s], torch.softmax(rows, dim=0))


def test_scatter_softmax_gradcheck_torch_backend():
    gen = torch.Generator().manual_seed(15)
    src = torch.randn(9, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([0, 0, 1, 2, 2, 2, 0, 1, 2])
    torch.autograd.gradcheck(lambda s: ops.scatter_softmax(s, index, backend="torch"), (src,))


def test_scatter_validation():
    src, index = torch.randn(4, 2), torch.tensor([0, 1, 1, 2])
    with pytest.raises(ValueError, match="reduce must be one of"):
        ops.scatter(src, index, reduce="prod")
    with pytest.raises(ValueError, match=r"one entry per row of src \(4\)"):
        ops.scatter(src, index[:3])
    with pytest.raises(ValueError, match=r"values must lie in \[0, 2\)"):
        ops.scatter(src, index, dim_size=2)
    with pytest.raises(ValueError, match="non-negative integers"):
        ops.scatter(src, torch.tensor([0, -1, 1, 2]))
    assert ops.scatter(src, index).shape == (3, 2)
    assert ops.scatter(torch.empty(0, 2), torch.empty(0, dtype=torch.long)).shape == (0, 2)


def test_padded_packed_round_trip():
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]])
    batch = torch.tensor([1, 0, 1, 1, 0])  # unsorted; cloud order kept inside each cloud
    padded, mask = ops.to_padded(x, batch, batch_size=3)
    assert padded.squeeze(-1).tolist() == [[2.0, 5.0, 0.0], [1.0, 3.0, 4.0], [0.0, 0.0, 0.0]]
    assert mask.tolist() == [[True, True, False], [True, True, True], [False, False, False]]
    packed, pbatch = ops.to_packed(padded, mask)
    assert packed.squeeze(-1).tolist() == [2.0, 5.0, 1.0, 3.0, 4.0] and pbatch.tolist() == [0, 0, 1, 1, 1]
    order = torch.sort(batch, stable=True).indices
    assert torch.equal(packed, x[order])
    with pytest.raises(ValueError, match="cloud id 1 but batch_size is 1"):
        ops.to_padded(x, batch, batch_size=1)
    with pytest.raises(ValueError, match="bool tensor"):
        ops.to_packed(padded, mask.float())
