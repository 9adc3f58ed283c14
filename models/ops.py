"""Point-cloud neighbourhood and segment operations with two interchangeable backends.

Every stage that needs neighbours, sampling or per-segment reductions (RandLA-Net, EdgeConv,
the graph losses, the rasterizer's per-pixel reductions) calls these functions, never
torch-cluster / torch-scatter directly.

Backends (DESIGN.md, "Ops backends"):

=========  ===========================================  ==========================================
name       kNN / FPS                                    scatter reductions
=========  ===========================================  ==========================================
cluster    torch_cluster (CPU: KD-tree; GPU: brute      torch_scatter
           force), ratio-based FPS trimmed to counts
torch      matmul distances + ``topk`` in query         ``index_add_`` / ``scatter_reduce``
           chunks (bounded memory), iterative FPS
=========  ===========================================  ==========================================

``backend=None`` (or ``"auto"``) resolves to the module default: what :func:`set_backend` /
:func:`use_backend` set, else the environment variable ``AVATAR_OPS_BACKEND``, else ``"cluster"``
when both torch_scatter and torch_cluster import, else ``"torch"``. torch_scatter and
torch_cluster are imported lazily, inside the functions that use them. Both backends give the
same results (tested): the torch backend is what runs where the extras are absent (the GPU
machine) and what ``torch.jit.trace`` / ONNX export see.

Layouts (the two ways a batch of B clouds with N_b points each is stored):

=======================  =======================  =============================================
tensor                   packed                   padded
=======================  =======================  =============================================
points / features        ``(sum N_b, C)``         ``(B, N_max, C)``, rows past N_b hold a fill
cloud membership         ``batch (sum N_b,)``     ``mask (B, N_max)`` bool, True on real rows
                         int64 in [0, B)
neighbour indices        ``(sum N_b, k)`` rows    ``(B, M, k)`` rows of the same cloud
                         of the packed tensor
graph                    ``edge_index (2, E)``    --
=======================  =======================  =============================================

kNN, FPS and the graph take the packed layout (``batch=None`` means one cloud). A batch vector
need not be sorted (it is stably sorted internally and the results are mapped back, so the
answer equals that of the sorted batch) and a cloud may be empty. :func:`to_padded` and
:func:`to_packed` convert between the layouts; :func:`gather` reads either.

Conventions:

- kNN neighbours are sorted by squared Euclidean distance, ascending; equal distances are
  ordered by the lower reference index first. When several reference points tie exactly at
  the k-th distance, which of them is kept may differ between backends (the distances agree).
- ``knn(x, x, k)`` includes each point itself (it is at distance 0); with duplicated points a
  lower-index duplicate may come first.
- A cloud with fewer than k reference points gives ``min(k, n_b)`` valid neighbours; the other
  slots hold the query's nearest neighbour index (so gathers stay in range) and ``valid=False``.
- Distances are computed in float32 (float64 inputs stay float64; float16/bfloat16 inputs are
  upcast), with autocast disabled inside the ops. Scatter reductions likewise return float32
  (float64 for float64 input) and fill empty segments with 0.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Iterator, Sequence

import torch

__all__ = [
    "available_backends",
    "get_backend",
    "set_backend",
    "use_backend",
    "knn",
    "knn_graph",
    "fps",
    "gather",
    "scatter",
    "scatter_softmax",
    "to_padded",
    "to_packed",
    "safe_norm",
]

BACKEND_ENV_VAR = "AVATAR_OPS_BACKEND"
_BACKEND_NAMES = ("cluster", "torch")
_REDUCTIONS = ("sum", "mean", "max", "min")
# Elements of one (queries x references) distance block in the torch kNN: 2^23 float32 = 32 MiB
# on the CPU (cache-friendly), 2^26 = 256 MiB on an accelerator (fewer, larger kernels).
_CHUNK_ELEMENTS = 1 << 23
_CHUNK_ELEMENTS_ACCELERATOR = 1 << 26
# The torch kNN keeps this many extra candidates from the matmul distances, then re-ranks them
# with exact differences, so rounding in |x|^2 - 2 x.y + |y|^2 cannot change the chosen set.
_CANDIDATE_MARGIN = 8

_default_backend: str | None = None


# --------------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _cluster_importable() -> bool:
    """True when torch_scatter and torch_cluster both import (checked once, lazily)."""
    try:
        import torch_cluster  # noqa: F401
        import torch_scatter  # noqa: F401
    except (ImportError, OSError):  # OSError: binary built for another torch
        return False
    return True


def available_backends() -> list[str]:
    """Backends usable here: ``["cluster", "torch"]`` or ``["torch"]``.

    "cluster" is listed when torch_scatter and torch_cluster both import; "torch" always is.
    """
    return (["cluster"] if _cluster_importable() else []) + ["torch"]


def _validate_backend(name: object, where: str) -> str:
    if not isinstance(name, str) or name not in _BACKEND_NAMES:
        raise ValueError(f"unknown ops backend {name!r} ({where}); choose one of 'auto', 'cluster', 'torch'")
    if name == "cluster" and not _cluster_importable():
        raise ValueError(
            f"ops backend 'cluster' ({where}) needs torch_scatter and torch_cluster, which do not "
            "import here; use 'torch' or install the 'fast' extra"
        )
    return name


def get_backend(name: str | None = None) -> str:
    """Resolve a backend name.

    Args:
        name: "cluster", "torch", or None / "auto" for the module default: the one set by
            :func:`set_backend` / :func:`use_backend`, else the environment variable
            ``AVATAR_OPS_BACKEND`` (if set and not "auto"), else "cluster" when available,
            else "torch".

    Returns:
        "cluster" or "torch".

    Raises:
        ValueError: if the name (or the environment variable) is unknown, or names "cluster"
            while torch_scatter / torch_cluster do not import.
    """
    if name is not None and name != "auto":
        return _validate_backend(name, "requested")
    if _default_backend is not None:
        return _default_backend
    env = os.environ.get(BACKEND_ENV_VAR, "").strip()
    if env and env != "auto":
        return _validate_backend(env, f"environment variable {BACKEND_ENV_VAR}")
    return "cluster" if _cluster_importable() else "torch"


def set_backend(name: str | None) -> None:
    """Set the module default backend; None or "auto" restores automatic choice.

    Raises:
        ValueError: as :func:`get_backend` for an unknown or unavailable name.
    """
    global _default_backend
    _default_backend = None if name is None or name == "auto" else _validate_backend(name, "set_backend")


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[str]:
    """Context manager: use ``name`` as the default backend inside the block, then restore.

    Yields:
        The resolved backend name.
    """
    global _default_backend
    previous = _default_backend
    set_backend(name)
    try:
        yield get_backend()
    finally:
        _default_backend = previous


# --------------------------------------------------------------------------------------------
# Input validation helpers (public boundary only)
# --------------------------------------------------------------------------------------------


def _checks_enabled() -> bool:
    """Data-dependent checks are skipped while tracing (they would be baked in as constants)."""
    return not torch.jit.is_tracing()


def _check_points(x: torch.Tensor, name: str, op: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{op}: {name} must be a (N, D) tensor, got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"{op}: {name} must be a floating-point tensor, got {x.dtype}")
    if x.shape[1] < 1:
        raise ValueError(f"{op}: {name} must have at least one coordinate per point, got {tuple(x.shape)}")
    if _checks_enabled() and x.numel() and not bool(torch.isfinite(x).all()):  # skipped while tracing
        raise ValueError(f"{op}: {name} holds NaN or infinite coordinates; clean the cloud first")
    return x


def _check_k(k: object, op: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{op}: k must be an integer >= 1, got {k!r}")
    return k


def _check_batch(batch: torch.Tensor, n: int, name: str, op: str) -> torch.Tensor:
    if not isinstance(batch, torch.Tensor) or batch.dim() != 1 or batch.numel() != n:
        shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise ValueError(f"{op}: {name} must be a 1-D tensor with one cloud id per point ({n}), got {shape}")
    if batch.is_floating_point() or batch.is_complex() or batch.dtype == torch.bool:
        raise ValueError(f"{op}: {name} must hold integer cloud ids, got {batch.dtype}")
    batch = batch.long()
    if n and _checks_enabled() and int(batch.min()) < 0:
        raise ValueError(f"{op}: {name} holds negative cloud ids; ids must be 0..B-1")
    return batch


def _check_index(index: torch.Tensor, size: int, op: str, name: str = "index") -> torch.Tensor:
    if (
        not isinstance(index, torch.Tensor)
        or index.is_floating_point()
        or index.is_complex()
        or index.dtype == torch.bool
    ):
        raise ValueError(f"{op}: {name} must be an integer tensor")
    index = index.long()
    # Range check where it is cheap and cannot stall a GPU stream; negative indices would wrap.
    if _checks_enabled() and index.device.type == "cpu" and index.numel():  # no tracer warning
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= size:
            raise ValueError(f"{op}: {name} values must lie in [0, {size}), got [{lo}, {hi}]")
    return index


def _sort_perm(batch: torch.Tensor) -> torch.Tensor | None:
    """Stable permutation that sorts ``batch``, or None when it is already sorted."""
    if batch.numel() < 2 or bool((batch[1:] >= batch[:-1]).all()):
        return None
    return torch.sort(batch, stable=True).indices


def _work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half precision is upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=device.type, enabled=False)


# --------------------------------------------------------------------------------------------
# kNN
# --------------------------------------------------------------------------------------------


def _chunk_elements(device: torch.device) -> int:
    return _CHUNK_ELEMENTS if device.type == "cpu" else _CHUNK_ELEMENTS_ACCELERATOR


def _knn_torch_block(
    xq: torch.Tensor,
    yr: torch.Tensor,
    out: torch.Tensor,
    row0: int,
    col0: int,
    bq: torch.Tensor | None,
    br: torch.Tensor | None,
) -> None:
    """Write candidate neighbours of queries ``xq`` among references ``yr`` into ``out``.

    ``bq``/``br`` (cloud ids) mask pairs from different clouds when a block holds several.
    Slots without a same-cloud reference get -1.
    """
    kc = min(out.shape[1], yr.shape[0])
    if kc == 0 or xq.shape[0] == 0:
        return
    yy = (yr * yr).sum(1)  # (M,)
    rows = max(1, _chunk_elements(xq.device) // yr.shape[0])
    for s in range(0, xq.shape[0], rows):
        q = xq[s : s + rows]  # (r, D)
        # |q - y|^2 - |q|^2 = |y|^2 - 2 q.y: the per-row constant |q|^2 does not change the ranking.
        d = torch.addmm(yy, q, yr.t(), alpha=-2.0)  # (r, M)
        if bq is not None and br is not None:
            d = d.masked_fill(bq[s : s + rows, None] != br[None, :], math.inf)
        vals, idx = d.topk(kc, dim=1, largest=False, sorted=False)  # (r, kc)
        idx = torch.where(torch.isfinite(vals), idx + col0, torch.full_like(idx, -1))
        out[row0 + s : row0 + s + q.shape[0], :kc] = idx


def _knn_candidates_torch(
    x: torch.Tensor,
    y: torch.Tensor,
    k: int,
    bx: torch.Tensor | None,
    by: torch.Tensor | None,
    num_clouds: int,
) -> torch.Tensor:
    """(N, k + margin) candidate indices into y (sorted batches), -1 where there is none."""
    kc = min(k + _CANDIDATE_MARGIN, y.shape[0])
    out = torch.full((x.shape[0], kc), -1, dtype=torch.long, device=x.device)
    if bx is None or by is None:
        _knn_torch_block(x, y, out, 0, 0, None, None)
        return out
    px = [0] + torch.bincount(bx, minlength=num_clouds).cumsum(0).tolist()
    py = [0] + torch.bincount(by, minlength=num_clouds).cumsum(0).tolist()
    b = 0
    while b < num_clouds:
        # Group consecutive small clouds into one masked block; a big cloud gets its own.
        e = b + 1
        while e < num_clouds and (px[e + 1] - px[b]) * (py[e + 1] - py[b]) <= _chunk_elements(x.device):
            e += 1
        xs, ys = x[px[b] : px[e]], y[py[b] : py[e]]
        if e - b == 1:
            _knn_torch_block(xs, ys, out, px[b], py[b], None, None)
        else:
            _knn_torch_block(xs, ys, out, px[b], py[b], bx[px[b] : px[e]], by[py[b] : py[e]])
        b = e
    return out


def _knn_candidates_cluster(
    x: torch.Tensor,
    y: torch.Tensor,
    k: int,
    bx: torch.Tensor | None,
    by: torch.Tensor | None,
    num_clouds: int,
) -> torch.Tensor:
    """(N, k) neighbour indices into y from torch_cluster (sorted batches), -1 where none."""
    import torch_cluster

    n = x.shape[0]
    if bx is None or by is None:
        workers = torch.get_num_threads() if x.device.type == "cpu" else 1
        edges = torch_cluster.knn(y, x, k, num_workers=workers)  # (2, E): [query; reference]
    else:
        edges = torch_cluster.knn(y, x, k, by, bx, batch_size=num_clouds)
    query, ref = edges[0], edges[1]  # (E,), grouped by query as torch_cluster returns them
    if query.numel() > 1 and not bool((query[1:] >= query[:-1]).all()):
        order = torch.argsort(query, stable=True)
        query, ref = query[order], ref[order]
    counts = torch.bincount(query, minlength=n)  # (N,) <= k; fewer when the cloud is small
    start = counts.cumsum(0) - counts
    slot = torch.arange(query.numel(), device=x.device) - start[query]
    out = torch.full((n, k), -1, dtype=torch.long, device=x.device)
    out[query, slot] = ref
    return out


def _rank_candidates(
    x: torch.Tensor, y: torch.Tensor, cand: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort candidates by (exact squared distance, index), keep k, pad with the nearest one."""
    valid = cand >= 0  # (N, kc)
    safe = cand.clamp(min=0)
    kc = cand.shape[1]
    d = torch.empty(cand.shape, dtype=x.dtype, device=x.device)  # (N, kc)
    rows = max(1, _chunk_elements(x.device) // max(1, kc * x.shape[1]))
    for s in range(0, x.shape[0], rows):
        diff = x[s : s + rows, None, :] - y[safe[s : s + rows]]  # (r, kc, D)
        d[s : s + rows] = diff.pow(2).sum(-1)
    d = d.masked_fill(~valid, math.inf)
    key = torch.where(valid, cand, torch.full_like(cand, y.shape[0]))  # secondary key: index
    if d.dtype == torch.float32 and _checks_enabled():
        # One sort on a packed int64 key: the bits of a non-negative float32 order like the
        # float itself, so (distance bits << 32) | index sorts by (distance, index).
        packed = (d.view(torch.int32).to(torch.int64) << 32) | key
        order = packed.topk(min(k, kc), dim=1, largest=False, sorted=True).indices  # (N, <=k)
    else:  # float64, or tracing (keep to ops that export): two stable sorts
        order = torch.argsort(key, dim=1, stable=True)
        d = d.gather(1, order)
        order = order.gather(1, torch.argsort(d, dim=1, stable=True))[:, :k]
    safe, valid = safe.gather(1, order), valid.gather(1, order)
    if kc < k:  # fewer references than k: pad the slots
        pad = k - kc
        safe = torch.cat([safe, safe[:, :1].expand(-1, pad)], dim=1)
        valid = torch.cat([valid, valid.new_zeros(valid.shape[0], pad)], dim=1)
    index = torch.where(valid, safe, safe[:, :1])  # (N, k), nearest neighbour in unused slots
    return index, valid


def knn(
    x: torch.Tensor,
    y: torch.Tensor,
    k: int,
    batch_x: torch.Tensor | None = None,
    batch_y: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest neighbours in ``y`` of every point of ``x``, within the same cloud.

    Euclidean distance. Neighbours are sorted by distance ascending, ties by the lower index of
    ``y`` first. When ``x is y`` each point finds itself (distance 0) among its neighbours.

    Args:
        x: (N, D) float query points, packed layout.
        y: (M, D) float reference points, packed layout.
        k: number of neighbours, >= 1.
        batch_x: (N,) int cloud id of each query, or None (one cloud). Need not be sorted.
        batch_y: (M,) int cloud id of each reference point; given together with ``batch_x``.
        backend: "cluster", "torch" or None/"auto" (see :func:`get_backend`).

    Returns:
        index: (N, k) int64 rows of ``y``. A query whose cloud has n_b < k reference points
            has n_b real neighbours; the remaining slots repeat its nearest neighbour.
        valid: (N, k) bool, False on those padded slots.

    Raises:
        ValueError: for malformed shapes/dtypes, k < 1, non-finite coordinates, only one of the
            batch vectors given, or a cloud with queries but no reference points (named).
    """
    op = "knn"
    name = get_backend(backend)
    x, y = _check_points(x, "x", op), _check_points(y, "y", op)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"knn: x and y must have the same dimension D, got {x.shape[1]} and {y.shape[1]}")
    k = _check_k(k, op)
    if (batch_x is None) != (batch_y is None):
        raise ValueError("knn: give both batch_x and batch_y, or neither (one cloud)")
    n, m = x.shape[0], y.shape[0]
    if n == 0:
        empty = torch.empty(0, k, dtype=torch.long, device=x.device)
        return empty, empty.bool()
    if m == 0:
        raise ValueError("knn: y has no points, so the queries in x have no neighbours; pass a non-empty y")
    candidates = _knn_candidates_cluster if name == "cluster" else _knn_candidates_torch
    work = _work_dtype(x, y)
    with _no_autocast(x.device), torch.no_grad():  # indices only: no graph, no bf16 matmuls
        xw, yw = x.to(work), y.to(work)
        if batch_x is None or batch_y is None:
            cand = candidates(xw, yw, k, None, None, 1)
            return _rank_candidates(xw, yw, cand, k)

        bx, by = _check_batch(batch_x, n, "batch_x", op), _check_batch(batch_y, m, "batch_y", op)
        num_clouds = int(max(int(bx.max()), int(by.max()))) + 1
        cx = torch.bincount(bx, minlength=num_clouds)
        cy = torch.bincount(by, minlength=num_clouds)
        orphan = ((cx > 0) & (cy == 0)).nonzero().flatten().tolist()
        if orphan:
            raise ValueError(
                f"knn: cloud(s) {orphan} have query points in x but no reference points in y; "
                "every cloud with queries needs at least one point in y"
            )
        perm_x, perm_y = _sort_perm(bx), _sort_perm(by)
        xs = xw if perm_x is None else xw[perm_x]
        ys = yw if perm_y is None else yw[perm_y]
        bxs = bx if perm_x is None else bx[perm_x]
        bys = by if perm_y is None else by[perm_y]
        cand = candidates(xs, ys, k, bxs, bys, num_clouds)  # rows: sorted x; values: sorted y
        if perm_y is not None:
            cand = torch.where(cand >= 0, perm_y[cand.clamp(min=0)], cand)
        if perm_x is not None:
            unsorted = torch.empty_like(cand)
            unsorted[perm_x] = cand
            cand = unsorted
        return _rank_candidates(xw, yw, cand, k)


def knn_graph(
    x: torch.Tensor,
    k: int,
    batch: torch.Tensor | None = None,
    loop: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Directed kNN graph of a packed batch of clouds (PyG ``source_to_target`` convention).

    Edge (j -> i) means j is one of the k nearest neighbours of centre i in i's cloud. Self-loop
    convention: with ``loop=False`` the point itself is excluded by index (a duplicate at the
    same position is still a neighbour), so each point of a cloud with n_b points gets
    ``min(k, n_b - 1)`` edges; with ``loop=True`` the self edge comes first and the point gets
    ``min(k, n_b)`` edges. Edges are grouped by centre (ascending index), then by distance.
    Empty clouds contribute nothing and no edge crosses clouds.

    Args:
        x: (N, D) float points, packed layout.
        k: neighbours per point, >= 1.
        batch: (N,) int cloud ids or None (one cloud); need not be sorted.
        loop: include the self edge.
        backend: see :func:`get_backend`.

    Returns:
        edge_index: (2, E) int64; row 0 = neighbour j (source), row 1 = centre i (target).

    Raises:
        ValueError: as :func:`knn`.
    """
    k = _check_k(k, "knn_graph")
    x = _check_points(x, "x", "knn_graph")
    n = x.shape[0]
    if n == 0:
        return torch.empty(2, 0, dtype=torch.long, device=x.device)
    index, valid = knn(x, x, k + 1, batch, batch, backend)  # (N, k + 1)
    centre = torch.arange(n, device=x.device)[:, None].expand_as(index)  # (N, k + 1)
    keep = valid & (index != centre)
    # If self was not among the k + 1 (more than k exact duplicates), drop the farthest instead.
    keep = keep & (keep.cumsum(1) <= (k - 1 if loop else k))
    if loop:
        index = torch.cat([centre[:, :1], index], dim=1)  # (N, k + 2)
        centre = torch.cat([centre[:, :1], centre], dim=1)
        keep = torch.cat([keep.new_ones(n, 1), keep], dim=1)
    return torch.stack([index[keep], centre[keep]], dim=0)


# --------------------------------------------------------------------------------------------
# Farthest point sampling
# --------------------------------------------------------------------------------------------


def _fps_torch_single(x: torch.Tensor, num: int, random_start: bool) -> torch.Tensor:
    """Iterative FPS of one cloud; control flow depends on shapes only (traceable)."""
    out = torch.empty(num, dtype=torch.long, device=x.device)
    if num == 0:
        return out
    if random_start:
        cur = torch.randint(x.shape[0], (), device=x.device)
    else:
        cur = torch.zeros((), dtype=torch.long, device=x.device)
    dist = torch.full((x.shape[0],), math.inf, dtype=x.dtype, device=x.device)  # (N,)
    for i in range(num):
        out[i] = cur
        if i + 1 < num:
            dist = torch.minimum(dist, (x - x[cur]).pow(2).sum(1))
            cur = dist.argmax()  # first index among equal maxima
    return out


def _fps_torch_batched(
    x: torch.Tensor, batch: torch.Tensor, counts: list[int], samples: list[int], random_start: bool
) -> torch.Tensor:
    """FPS of all clouds at once in the padded layout (sorted batch)."""
    num_clouds = len(counts)
    padded, mask = to_padded(x, batch, batch_size=num_clouds)  # (B, Nmax, D), (B, Nmax)
    coords = padded.transpose(1, 2).contiguous()  # (B, D, Nmax): the reduction over D runs on rows
    count_t = torch.tensor(counts, device=x.device)
    if random_start:
        cur = (torch.rand(num_clouds, device=x.device) * count_t).long()
        cur = torch.minimum(cur, (count_t - 1).clamp(min=0))
    else:
        cur = torch.zeros(num_clouds, dtype=torch.long, device=x.device)
    steps = max(samples)
    out = torch.empty(num_clouds, steps, dtype=torch.long, device=x.device)  # (B, S)
    dist = torch.where(mask, math.inf, -1.0).to(x.dtype)  # padding never wins the argmax
    rows = torch.arange(num_clouds, device=x.device)
    for i in range(steps):
        out[:, i] = cur
        if i + 1 < steps:
            step = (coords - padded[rows, cur][:, :, None]).pow(2).sum(1)  # (B, Nmax)
            dist = torch.where(mask, torch.minimum(dist, step), dist)
            cur = dist.argmax(1)
    ptr = [0]
    for c in counts[:-1]:
        ptr.append(ptr[-1] + c)
    return torch.cat([out[b, : samples[b]] + ptr[b] for b in range(num_clouds)])


def _fps_cluster(
    x: torch.Tensor, batch: torch.Tensor, counts: list[int], samples: list[int], random_start: bool
) -> torch.Tensor:
    """FPS with torch_cluster (sorted batch). Its count per cloud is ceil(ratio * n_b), which
    rounding can push one past the request (100 / 732 * 732 -> 101); the ratio here selects at
    least n and the first n of each cloud are kept (they are chosen in order)."""
    import torch_cluster

    num_clouds = len(counts)
    wanted = torch.tensor(samples, device=x.device)
    used = [b for b in range(num_clouds) if samples[b] > 0]
    point_mask = (wanted > 0)[batch]  # clouds asked for nothing are left out of the call
    sub = x[point_mask]
    sub_to_full = point_mask.nonzero().flatten()
    ptr = [0]
    for b in used:
        ptr.append(ptr[-1] + counts[b])
    ratio = torch.tensor([samples[b] / counts[b] for b in used], dtype=torch.float64, device=x.device)
    idx = torch_cluster.fps(
        sub, ratio=ratio, random_start=random_start, ptr=torch.tensor(ptr, device=x.device)
    )
    idx = sub_to_full[idx]  # (S',) grouped by cloud, in selection order
    cloud = batch[idx]
    got = torch.bincount(cloud, minlength=num_clouds)
    slot = torch.arange(idx.numel(), device=x.device) - (got.cumsum(0) - got)[cloud]
    return idx[slot < wanted[cloud]]


def fps(
    x: torch.Tensor,
    num_samples: int | Sequence[int],
    batch: torch.Tensor | None = None,
    random_start: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Farthest point sampling (PointNet++, Qi et al. 2017) with an exact count per cloud.

    Starting from the first point of each cloud (or a uniformly random one), repeatedly pick the
    point whose squared distance to the already picked set is largest (ties: lowest index).

    Args:
        x: (N, D) float points, packed layout.
        num_samples: points to pick per cloud: one int for every cloud or a sequence with one
            entry per cloud (its length is the number of clouds B).
        batch: (N,) int cloud ids or None (one cloud); need not be sorted.
        random_start: start from a random point of each cloud (torch's global RNG).
        backend: see :func:`get_backend`.

    Returns:
        (sum_b num_samples_b,) int64 rows of ``x``, grouped by cloud in cloud order, each group
        in selection order; the indices of one cloud are distinct.

    Raises:
        ValueError: if a cloud has fewer points than requested (the cloud is named), a count is
            negative, the sequence length disagrees with the batch, or shapes are malformed.
    """
    op = "fps"
    name = get_backend(backend)
    x = _check_points(x, "x", op)
    n = x.shape[0]
    counts_given = [num_samples] if isinstance(num_samples, int) else num_samples
    if not isinstance(counts_given, Sequence) or not all(
        isinstance(s, int) and not isinstance(s, bool) for s in counts_given
    ):
        raise ValueError(f"fps: num_samples must be an int or a sequence of ints, got {num_samples!r}")
    if any(s < 0 for s in counts_given):
        raise ValueError(f"fps: num_samples must be >= 0, got {num_samples!r}")
    with _no_autocast(x.device), torch.no_grad():
        xw = x.to(_work_dtype(x))
        if batch is None:
            if not isinstance(num_samples, int):
                if len(num_samples) != 1:
                    raise ValueError(
                        f"fps: batch is None (one cloud) but num_samples has {len(num_samples)} entries"
                    )
                num_samples = num_samples[0]
            if num_samples > n:
                raise ValueError(f"fps: the cloud has {n} points, fewer than the {num_samples} requested")
            if name == "cluster" and num_samples > 0:
                zeros = torch.zeros(n, dtype=torch.long, device=x.device)
                return _fps_cluster(xw, zeros, [n], [num_samples], random_start)
            return _fps_torch_single(xw, num_samples, random_start)

        b = _check_batch(batch, n, "batch", op)
        present = int(b.max()) + 1 if n else 0
        if isinstance(num_samples, int):
            samples = [num_samples] * present
        else:
            samples = list(num_samples)
            if len(samples) < present:
                raise ValueError(
                    f"fps: batch has {present} clouds but num_samples gives {len(samples)} counts"
                )
        num_clouds = len(samples)
        counts = torch.bincount(b, minlength=num_clouds).tolist()
        short = [i for i in range(num_clouds) if counts[i] < samples[i]]
        if short:
            detail = ", ".join(f"cloud {i} has {counts[i]} < {samples[i]}" for i in short)
            raise ValueError(
                f"fps: fewer points than requested ({detail}); request at most n_b points per cloud"
            )
        if num_clouds == 0 or sum(samples) == 0:
            return torch.empty(0, dtype=torch.long, device=x.device)
        perm = _sort_perm(b)
        xs = xw if perm is None else xw[perm]
        bs = b if perm is None else b[perm]
        run = _fps_cluster if name == "cluster" else _fps_torch_batched
        idx = run(xs, bs, counts, samples, random_start)
        return idx if perm is None else perm[idx]


# --------------------------------------------------------------------------------------------
# Gather, scatter, layouts
# --------------------------------------------------------------------------------------------


def gather(x: torch.Tensor, index: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Gather neighbour rows: packed ``x[index]`` or its padded, per-cloud form.

    Args:
        x: (N, C) packed features (or (N,)), or (B, N, C) padded features.
        index: (M, k) int rows of ``x`` (any shape for packed x), or (B, M, k) rows of each
            cloud of the padded ``x``.
        backend: accepted for a uniform interface; both backends use the same torch indexing.

    Returns:
        (M, k, C) for packed ``x`` (generally ``index.shape + x.shape[1:]``), or (B, M, k, C)
        for padded ``x``; same dtype as ``x``, differentiable w.r.t. ``x``.

    Raises:
        ValueError: for a non-integer index, a batch-size mismatch, or (on CPU) an index out of
            range.
    """
    get_backend(backend)
    if not isinstance(x, torch.Tensor) or x.dim() not in (1, 2, 3):
        raise ValueError("gather: x must be (N,), (N, C) packed or (B, N, C) padded")
    if x.dim() == 3:
        if not isinstance(index, torch.Tensor) or index.dim() != 3 or index.shape[0] != x.shape[0]:
            shape = tuple(index.shape) if isinstance(index, torch.Tensor) else type(index).__name__
            raise ValueError(
                f"gather: padded x {tuple(x.shape)} needs a (B, M, k) index with B = {x.shape[0]}, got {shape}"
            )
        bsz, npts, ch = x.shape
        index = _check_index(index, npts, "gather")
        offset = torch.arange(bsz, device=index.device).view(bsz, 1, 1) * npts  # (B, 1, 1)
        return x.reshape(bsz * npts, ch)[index + offset]  # (B, M, k, C)
    index = _check_index(index, x.shape[0], "gather")
    return x[index]  # (M, k, C)


def _segment_setup(
    src: torch.Tensor, index: torch.Tensor, dim_size: int | None, op: str
) -> tuple[torch.Tensor, torch.Tensor, int]:
    if not isinstance(src, torch.Tensor) or src.dim() < 1:
        raise ValueError(f"{op}: src must be a tensor of shape (E,) or (E, C)")
    if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.shape[0] != src.shape[0]:
        shape = tuple(index.shape) if isinstance(index, torch.Tensor) else type(index).__name__
        raise ValueError(
            f"{op}: index must be 1-D with one entry per row of src ({src.shape[0]}), got {shape}"
        )
    if src.is_complex():
        raise ValueError(f"{op}: complex src is not supported")
    if dim_size is None:
        if _checks_enabled() and index.numel() and (index.is_floating_point() or int(index.min()) < 0):
            raise ValueError(f"{op}: index must hold non-negative integers")
        dim_size = int(index.max()) + 1 if index.numel() else 0
    elif isinstance(dim_size, bool) or not isinstance(dim_size, int) or dim_size < 0:
        raise ValueError(f"{op}: dim_size must be a non-negative int, got {dim_size!r}")
    index = _check_index(index, dim_size, op)
    return src.to(_work_dtype(src)), index, dim_size


def _scatter_impl(
    src: torch.Tensor, index: torch.Tensor, dim_size: int, reduce: str, name: str
) -> torch.Tensor:
    if name == "cluster":
        import torch_scatter

        return torch_scatter.scatter(src, index, dim=0, dim_size=dim_size, reduce=reduce)
    out = src.new_zeros((dim_size,) + tuple(src.shape[1:]))  # (S, C)
    if reduce in ("sum", "mean"):
        out = out.index_add(0, index, src)
        if reduce == "mean":
            count = torch.bincount(index, minlength=dim_size).clamp(min=1).to(src.dtype)  # (S,)
            out = out / count.view((dim_size,) + (1,) * (src.dim() - 1))
        return out
    expanded = index.view((-1,) + (1,) * (src.dim() - 1)).expand_as(src)  # (E, C)
    return out.scatter_reduce(
        0, expanded, src, reduce="amax" if reduce == "max" else "amin", include_self=False
    )


def scatter(
    src: torch.Tensor,
    index: torch.Tensor,
    dim_size: int | None = None,
    reduce: str = "sum",
    backend: str | None = None,
) -> torch.Tensor:
    """Reduce rows of ``src`` into segments: ``out[s] = reduce({src[e] : index[e] = s})``.

    Computed with autocast off, in float32 (float64 input stays float64; float16, bfloat16 and
    integer inputs are upcast), so a bf16-mixed run cannot lose the reductions' precision.
    Empty segments are filled with 0 for every reduction; max/min over all-negative (positive)
    values return those values, not 0. Gradients: sum/mean exact; for max/min the gradient goes
    to the extreme element (with exact ties the split between tied elements is backend-specific).

    Args:
        src: (E,) or (E, C) values.
        index: (E,) int segment of each row, in [0, dim_size); need not be sorted.
        dim_size: number of segments S; default ``index.max() + 1`` (pass it to avoid a sync).
        reduce: "sum", "mean", "max" or "min".
        backend: see :func:`get_backend`.

    Returns:
        (S,) or (S, C) float32 (float64 for float64 input).

    Raises:
        ValueError: for an unknown reduce, mismatched lengths, or (on CPU) an index out of range.
    """
    op = "scatter"
    name = get_backend(backend)
    if reduce not in _REDUCTIONS:
        raise ValueError(f"scatter: reduce must be one of {_REDUCTIONS}, got {reduce!r}")
    with _no_autocast(src.device if isinstance(src, torch.Tensor) else torch.device("cpu")):
        src, index, dim_size = _segment_setup(src, index, dim_size, op)
        return _scatter_impl(src, index, dim_size, reduce, name)


def scatter_softmax(
    src: torch.Tensor,
    index: torch.Tensor,
    dim_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Softmax of ``src`` within each segment: exp(src_e - max_s) / sum_{e' in s} exp(src_e' - max_s).

    Numerically stable (the segment maximum is subtracted) and computed in float32 (float64
    stays float64) with autocast off. Entries equal to -inf get probability 0; a segment whose
    entries are all -inf gives zeros rather than NaN. Used for attentive pooling over
    neighbours (RandLA-Net) and the relation-matching loss on graph edges.

    Args:
        src: (E,) or (E, C) logits.
        index: (E,) int segment of each entry.
        dim_size: number of segments; default ``index.max() + 1``.
        backend: see :func:`get_backend`.

    Returns:
        Same shape as ``src``, float32 (float64 for float64 input); sums to 1 over each
        non-empty segment (per channel).

    Raises:
        ValueError: as :func:`scatter`.
    """
    op = "scatter_softmax"
    name = get_backend(backend)
    with _no_autocast(src.device if isinstance(src, torch.Tensor) else torch.device("cpu")):
        src, index, dim_size = _segment_setup(src, index, dim_size, op)
        seg_max = _scatter_impl(src.detach(), index, dim_size, "max", name)  # (S, C)
        seg_max = torch.where(torch.isfinite(seg_max), seg_max, torch.zeros_like(seg_max))
        exp = (src - seg_max[index]).exp()  # (E, C)
        denom = _scatter_impl(exp, index, dim_size, "sum", name)  # (S, C)
        return exp / denom.clamp(min=torch.finfo(src.dtype).tiny)[index]


def to_padded(
    x: torch.Tensor, batch: torch.Tensor, batch_size: int | None = None, fill_value: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed -> padded layout (see the module docstring's table).

    Args:
        x: (sum N_b, C) or (sum N_b,) packed values.
        batch: (sum N_b,) int cloud ids; need not be sorted (points keep their order within a
            cloud).
        batch_size: number of clouds B; default ``batch.max() + 1``.
        fill_value: value of the padding rows.

    Returns:
        padded: (B, N_max, C) (or (B, N_max)), same dtype as ``x``, differentiable.
        mask: (B, N_max) bool, True on real points.

    Raises:
        ValueError: for mismatched lengths, or a cloud id >= batch_size.
    """
    op = "to_padded"
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("to_padded: x must be a (N, ...) tensor")
    b = _check_batch(batch, x.shape[0], "batch", op)
    present = int(b.max()) + 1 if b.numel() else 0
    if batch_size is None:
        batch_size = present
    elif present > batch_size:
        raise ValueError(f"to_padded: batch holds cloud id {present - 1} but batch_size is {batch_size}")
    counts = torch.bincount(b, minlength=batch_size)  # (B,)
    n_max = int(counts.max()) if batch_size else 0
    order = torch.sort(b, stable=True).indices
    start = counts.cumsum(0) - counts  # (B,)
    pos_sorted = torch.arange(b.numel(), device=b.device) - start[b[order]]
    pos = torch.empty_like(pos_sorted)
    pos[order] = pos_sorted  # position of each point inside its cloud
    padded = x.new_full((batch_size, n_max) + tuple(x.shape[1:]), fill_value)  # (B, N_max, C)
    padded = padded.index_put((b, pos), x)
    mask = torch.zeros(batch_size, n_max, dtype=torch.bool, device=x.device)
    mask[b, pos] = True
    return padded, mask


def to_packed(padded: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded -> packed layout, the inverse of :func:`to_padded` for a sorted batch.

    Args:
        padded: (B, N_max, C) or (B, N_max) values.
        mask: (B, N_max) bool, True on real points.

    Returns:
        packed: (sum N_b, C) real rows, cloud by cloud, in row order.
        batch: (sum N_b,) int64 sorted cloud ids.

    Raises:
        ValueError: if the mask is not boolean or its shape differs from ``padded``'s first two.
    """
    if (
        mask.dtype != torch.bool
        or mask.dim() != 2
        or padded.dim() < 2
        or tuple(padded.shape[:2]) != tuple(mask.shape)
    ):
        raise ValueError(
            f"to_packed: mask must be a (B, N_max) bool tensor matching padded {tuple(padded.shape)}, "
            f"got {tuple(mask.shape)} {mask.dtype}"
        )
    batch = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
    return padded[mask], batch


def safe_norm(v: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """Euclidean norm whose value is 0 and whose gradient is 0 (not NaN) at the zero vector.

    ``sqrt(sum(v^2))`` has an infinite derivative at 0, which turns the zero-length relative
    vectors of duplicated points (p_i - p_j with p_i = p_j, e.g. RandLA-Net's |p_i - p_k|)
    into NaN gradients. Differentiable twice, traceable.

    Args:
        v: (..., D) vectors.
        dim: the dimension to reduce.
        keepdim: keep the reduced dimension.

    Returns:
        (...) norms, same dtype as ``v``.
    """
    sq = (v * v).sum(dim=dim, keepdim=keepdim)
    positive = sq > 0
    return torch.where(positive, torch.where(positive, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))
