"""Loss functions (pure functions of tensors; no training loop, no files).

Image losses of the teacher (PointAvatar, Zheng et al. CVPR 2023, Sec. 3.4): RGB L1, mask,
SSIM, eikonal and a blendshape regulariser. Distillation and adversarial losses join this module
with their stages (DESIGN.md, "Distillation losses", "GAR").
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from models.ops import gather

__all__ = [
    "blendshape_regularization",
    "composite_on_white",
    "eikonal_loss",
    "gaussian_ssim",
    "masked_l1",
    "mask_loss",
    "sdf_consistency_loss",
    "ssim_loss",
]


def composite_on_white(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """image * mask + (1 - mask): (B, 3, H, W) in [0, 1] with a (B, 1, H, W) mask -> (B, 3, H, W), the frame
    on white under its mask (what every render on white is compared with)."""
    return image * mask + (1.0 - mask)


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute error, over the pixels where ``mask`` is 1 when a mask is given.

    Args:
        pred, target: (B, C, H, W) images, same range (usually [0, 1]).
        mask: optional (B, 1, H, W) weights in [0, 1].

    Returns:
        scalar float32; 0 when the mask is empty.
    """
    diff = (pred.float() - target.float()).abs()
    if mask is None:
        return diff.mean()
    weight = mask.float().expand_as(diff)
    return (diff * weight).sum() / weight.sum().clamp_min(1.0)


def mask_loss(alpha: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1 between the rendered accumulated alpha (B, 1, H, W) and the head mask (B, 1, H, W); scalar."""
    return (alpha.float() - mask.float()).abs().mean()


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()  # (C, 1, k, k)


def gaussian_ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    window: int = 11,
    sigma: float = 1.5,
    data_range: float = 1.0,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Mean structural similarity with a Gaussian window (Wang et al. 2004, Eq. 13).

    The images are reflection-padded by half the window so the SSIM map has the image's size, and
    local variances are clamped at 0, as torchmetrics' ``structural_similarity_index_measure``
    does with its defaults (11x11, sigma 1.5); the two agree to float precision (tested).

    Args:
        pred, target: (B, C, H, W), H and W >= ``window``.

    Returns:
        scalar float32 SSIM in [-1, 1] (1 for identical images).

    Raises:
        ValueError: when the images are smaller than the window.
    """
    if pred.shape[-1] < window or pred.shape[-2] < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window}, got {tuple(pred.shape[-2:])}")
    pred, target = pred.float(), target.float()
    c = pred.shape[1]
    w = _gaussian_window(window, sigma, c, pred.device, pred.dtype)
    pad = (window // 2,) * 4
    with torch.autocast(device_type=pred.device.type, enabled=False):  # float32 convolutions under mixed precision
        pred, target = F.pad(pred, pad, mode="reflect"), F.pad(target, pad, mode="reflect")
        mu_x = F.conv2d(pred, w, groups=c)
        mu_y = F.conv2d(target, w, groups=c)
        sxx = (F.conv2d(pred * pred, w, groups=c) - mu_x**2).clamp_min(0)
        syy = (F.conv2d(target * target, w, groups=c) - mu_y**2).clamp_min(0)
        sxy = F.conv2d(pred * target, w, groups=c) - mu_x * mu_y
        c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
        ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
        return ssim_map.mean()


def ssim_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - :func:`gaussian_ssim` (scalar, 0 for identical images)."""
    return 1.0 - gaussian_ssim(pred, target)


def eikonal_loss(sdf_gradient: torch.Tensor) -> torch.Tensor:
    """Eikonal term mean((|∇SDF| - 1)^2) (Gropp et al. 2020, IGR Eq. 2); (N, 3) -> scalar."""
    return ((sdf_gradient.float().norm(dim=-1) - 1.0) ** 2).mean()


def sdf_consistency_loss(sdf: torch.Tensor) -> torch.Tensor:
    """SDF consistency mean(sdf(x)^2) at the canonical points x (PointAvatar, Sec. 3.4; weight 1.0).

    The points are meant to lie on the zero level set of the SDF whose gradient gives their normals;
    the SDF is evaluated at detached points, so this term moves the SDF to the points, not the
    points to the SDF.

    Args:
        sdf: (N, 1) or (N,) SDF values at the canonical points (canonical units).

    Returns:
        scalar float32 (canonical units squared).
    """
    return sdf.float().pow(2).mean()


def blendshape_regularization(
    blendshapes: torch.Tensor,
    offset: torch.Tensor | None = None,
    expression_var: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared magnitude of the per-point blendshapes (N, E, 3) and offsets (N, 3).

    PointAvatar regularises its blendshapes towards those of the nearest FLAME vertex; our head
    model has no template, so the prior is zero (small deformations unless the images ask for them).
    With ``expression_var`` (PointAvatar's ``use_var_expression``) blendshape e is weighted by
    w_e = (1 / var_e) / mean_e(1 / var_e): a weaker prior where the training expression varies
    more, the same total weight as the unweighted prior for equal variances:

        L = mean_{n,e} w_e |B_e(x_n)|^2 + mean_n |o(x_n)|^2

    Args:
        blendshapes: (N, E, 3); offset: optional (N, 3); expression_var: optional (E,) variances of
            the training expression codes (> 0).

    Returns:
        scalar float32.

    Raises:
        ValueError: if ``expression_var`` is not (E,) or not positive.
    """
    squared = blendshapes.float().pow(2).sum(-1)  # (N, E)
    if expression_var is not None:
        var = expression_var.float().to(squared.device)
        if var.shape != squared.shape[-1:] or not bool((var > 0).all()):
            raise ValueError(f"expression_var must be ({squared.shape[-1]},) positive variances, got "
                             f"{tuple(var.shape)} with min {float(var.min()) if var.numel() else 'n/a'}")
        inverse = 1.0 / var
        squared = squared * (inverse / inverse.mean())
    loss = squared.mean()
    if offset is not None:
        loss = loss + offset.float().pow(2).sum(-1).mean()
    return loss


# ============================================================================================
# Distillation losses (stage 2; DESIGN.md, "Distillation losses")
# ============================================================================================
#
#   L = λ_gt L_gt + λ_out L_out + λ_feat L_feat + λ_graph L_graph
#
# L_gt is the teacher's image losses above, applied to the student's render. The functions below
# take the student's outputs first and the teacher's second; every teacher tensor is detached
# inside, so no gradient ever reaches the teacher. They compute in float32 (float64 inputs stay
# float64) with autocast disabled, so a bf16-mixed run gets full-precision losses.
#
# Layouts: per-point tensors are packed (N, ...) rows of one canonical cloud, student and teacher
# in the same point order; images are (B, C, H, W).

__all__ += [
    "DISTILLATION_TERMS",
    "albedo_distillation_loss",
    "deformation_distillation_loss",
    "distillation_loss",
    "feature_distillation_loss",
    "graph_distillation_loss",
    "normal_distillation_loss",
    "output_distillation_loss",
    "ground_truth_loss",
    "per_point_distillation_losses",
    "rendered_image_distillation_loss",
    "sample_anchors",
]

#: The four terms of the distillation objective, in the order of DESIGN.md.
DISTILLATION_TERMS = ("gt", "out", "feat", "graph")

# Logit given to masked neighbours before the softmax: finite (no inf - inf = NaN), and
# exp(-1e9 - max) is exactly 0 in float32 and float64.
_MASKED_LOGIT = -1.0e9


def _work(x: torch.Tensor) -> torch.Tensor:
    """float64 stays float64; everything else (float16, bfloat16, float32, int) becomes float32."""
    return x if x.dtype == torch.float64 else x.float()


def _full_precision(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def _check_pair(student: torch.Tensor, teacher: torch.Tensor, name: str, last_dim: int | None = None) -> None:
    if not isinstance(student, torch.Tensor) or not isinstance(teacher, torch.Tensor):
        raise ValueError(f"{name}: student and teacher values must be tensors")
    if student.shape != teacher.shape:
        raise ValueError(
            f"{name}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} shapes differ; "
            "pass the outputs of the same points in the same order"
        )
    if last_dim is not None and (student.dim() < 1 or student.shape[-1] != last_dim):
        raise ValueError(f"{name}: expected (..., {last_dim}) tensors, got {tuple(student.shape)}")


def albedo_distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """L1 between the student's and the teacher's albedo: mean |a_s - a_t| over points and channels.

    Args:
        student: (N, 3) student albedo in [0, 1].
        teacher: (N, 3) teacher albedo (detached here).

    Returns:
        scalar float32 (float64 for float64 input).

    Raises:
        ValueError: on differing shapes or a last dimension other than 3.
    """
    _check_pair(student, teacher, "albedo_distillation_loss", 3)
    with _full_precision(student.device):
        return (_work(student) - _work(teacher.detach())).abs().mean()


def normal_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normal alignment mean_i (1 - cos(n_s,i, n_t,i)), in [0, 2]; 0 when the directions agree.

    Both normals are normalised here (norms clamped at ``eps``), so unnormalised SDF gradients
    may be passed; a zero vector has cosine 0 with everything.

    Args:
        student: (N, 3) student canonical normals.
        teacher: (N, 3) teacher canonical normals (detached here).
        eps: norm floor.

    Returns:
        scalar float32 (float64 for float64 input).

    Raises:
        ValueError: on differing shapes or a last dimension other than 3.
    """
    _check_pair(student, teacher, "normal_distillation_loss", 3)
    with _full_precision(student.device):
        s = F.normalize(_work(student), dim=-1, eps=eps)
        t = F.normalize(_work(teacher.detach()), dim=-1, eps=eps)
        return (1.0 - (s * t).sum(-1)).mean()


def deformation_distillation_loss(
    student_blendshapes: torch.Tensor,
    teacher_blendshapes: torch.Tensor,
    student_offset: torch.Tensor | None = None,
    teacher_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE of the expression blendshapes plus MSE of the canonical offsets.

    ``mean((B_s - B_t)^2) + mean((o_s - o_t)^2)``, each mean over all elements (points, E, xyz);
    the offset term is left out when both offsets are None.

    Args:
        student_blendshapes, teacher_blendshapes: (N, E, 3) blendshapes B_e(x) (canonical units).
        student_offset, teacher_offset: (N, 3) canonical offsets o(x), or both None.

    Returns:
        scalar float32 (float64 for float64 input).

    Raises:
        ValueError: on differing shapes, or only one offset given.
    """
    _check_pair(student_blendshapes, teacher_blendshapes, "deformation_distillation_loss (blendshapes)", 3)
    if (student_offset is None) != (teacher_offset is None):
        raise ValueError("deformation_distillation_loss: give both offsets (student and teacher) or neither")
    with _full_precision(student_blendshapes.device):
        loss = (_work(student_blendshapes) - _work(teacher_blendshapes.detach())).pow(2).mean()
        if student_offset is not None:
            _check_pair(student_offset, teacher_offset, "deformation_distillation_loss (offset)", 3)
            loss = loss + (_work(student_offset) - _work(teacher_offset.detach())).pow(2).mean()
        return loss


def rendered_image_distillation_loss(
    student_image: torch.Tensor, teacher_image: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """L1 between the student's and the teacher's rendered images (:func:`masked_l1`).

    The stage renders both clouds with the same rasterizer and camera; this only compares them.

    Args:
        student_image: (B, C, H, W) student render.
        teacher_image: (B, C, H, W) teacher render (detached here).
        mask: optional (B, 1, H, W) pixel weights (e.g. the head mask).

    Returns:
        scalar float32.

    Raises:
        ValueError: on differing shapes or images that are not (B, C, H, W).
    """
    _check_pair(student_image, teacher_image, "rendered_image_distillation_loss")
    if student_image.dim() != 4:
        raise ValueError(f"rendered_image_distillation_loss: images must be (B, C, H, W), got {tuple(student_image.shape)}")
    with _full_precision(student_image.device):
        return masked_l1(student_image, teacher_image.detach(), mask)


def output_distillation_loss(
    student_albedo: torch.Tensor,
    teacher_albedo: torch.Tensor,
    student_normals: torch.Tensor,
    teacher_normals: torch.Tensor,
    student_blendshapes: torch.Tensor,
    teacher_blendshapes: torch.Tensor,
    student_offset: torch.Tensor | None = None,
    teacher_offset: torch.Tensor | None = None,
    student_image: torch.Tensor | None = None,
    teacher_image: torch.Tensor | None = None,
    image_mask: torch.Tensor | None = None,
    deformation_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """L_out, the output-level distillation: the student imitates every teacher output.

    ``L_out = albedo L1 + normal (1 - cos) + w_d * blendshape/offset MSE + rendered-image L1``
    (the paper's sum is unweighted, w_d = 1; the stage weights L_out as a whole with λ_out).
    ``deformation_weight`` w_d balances the blendshapes, small numbers whose MSE is about 1e-4 of
    the other terms at w_d = 1.

    Args:
        student_albedo, teacher_albedo: (N, 3).
        student_normals, teacher_normals: (N, 3) canonical normals.
        student_blendshapes, teacher_blendshapes: (N, E, 3).
        student_offset, teacher_offset: (N, 3), or both None.
        student_image, teacher_image: (B, C, H, W) renders of the two clouds in the same frames,
            or both None (then the ``render`` term is absent).
        image_mask: optional (B, 1, H, W) weights of the render term.
        deformation_weight: w_d >= 0 on the blendshape/offset term in ``total``.

    Returns:
        dict with scalar tensors ``albedo``, ``normal``, ``deformation`` (unweighted), ``render``
        (when images are given) and ``total`` (their sum with w_d on ``deformation``, L_out).

    Raises:
        ValueError: as the term functions, when only one of the images is given, or on a
            negative ``deformation_weight``.
    """
    if not deformation_weight >= 0:
        raise ValueError(f"output_distillation_loss: deformation_weight must be >= 0, got {deformation_weight}")
    terms = {
        "albedo": albedo_distillation_loss(student_albedo, teacher_albedo),
        "normal": normal_distillation_loss(student_normals, teacher_normals),
        "deformation": deformation_distillation_loss(
            student_blendshapes, teacher_blendshapes, student_offset, teacher_offset
        ),
    }
    if (student_image is None) != (teacher_image is None):
        raise ValueError("output_distillation_loss: give both rendered images (student and teacher) or neither")
    if student_image is not None:
        terms["render"] = rendered_image_distillation_loss(student_image, teacher_image, image_mask)
    terms["total"] = sum(deformation_weight * v if k == "deformation" else v for k, v in terms.items())
    return terms


def feature_distillation_loss(adapted_student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """L_feat = mean_i ||A f_s,i - f_t,i||^2 (squared Euclidean norm per point, mean over points).

    Args:
        adapted_student: (N, C_t) student features after the 1x1 adapter
            (:class:`models.adapters.FeatureAdapter`), A f_s.
        teacher: (N, C_t) teacher features f_t (detached here).

    Returns:
        scalar float32 (float64 for float64 input); 0 when A f_s = f_t.

    Raises:
        ValueError: on differing shapes or tensors that are not (N, C).
    """
    _check_pair(adapted_student, teacher, "feature_distillation_loss")
    if adapted_student.dim() != 2:
        raise ValueError(f"feature_distillation_loss: features must be (N, C), got {tuple(adapted_student.shape)}")
    with _full_precision(adapted_student.device):
        return (_work(adapted_student) - _work(teacher.detach())).pow(2).sum(-1).mean()


def sample_anchors(
    num_points: int,
    num_anchors: int = 4096,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw the anchor points of the graph loss: M = min(num_anchors, N) distinct rows.

    When M = N every point is an anchor (``arange(N)``, no random numbers drawn); otherwise the
    first M entries of a random permutation drawn from ``generator`` (on the generator's device,
    so a CPU generator seeded by the stage gives the same anchors on any accelerator).

    Args:
        num_points: N, points in the cloud (>= 0).
        num_anchors: requested M (>= 1); clamped to N.
        generator: optional torch.Generator (the global generator when None).
        device: device of the returned indices (default: the generator's, else CPU).

    Returns:
        (M,) int64 distinct point indices.

    Raises:
        ValueError: for a negative N or num_anchors < 1.
    """
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 0:
        raise ValueError(f"sample_anchors: num_points must be an int >= 0, got {num_points!r}")
    if isinstance(num_anchors, bool) or not isinstance(num_anchors, int) or num_anchors < 1:
        raise ValueError(f"sample_anchors: num_anchors must be an int >= 1, got {num_anchors!r}")
    draw_device = generator.device if generator is not None else torch.device("cpu")
    out_device = torch.device(device) if device is not None else draw_device
    if num_anchors >= num_points:
        return torch.arange(num_points, device=out_device)
    perm = torch.randperm(num_points, generator=generator, device=draw_device)
    return perm[:num_anchors].to(out_device)


def graph_distillation_loss(
    adapted_student: torch.Tensor,
    teacher: torch.Tensor,
    neighbors: torch.Tensor,
    num_anchors: int = 4096,
    generator: torch.Generator | None = None,
    valid: torch.Tensor | None = None,
    tau: float = 0.1,
    anchors: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> dict[str, torch.Tensor]:
    """L_graph, the "assisted supervision": match the teacher's feature graph at M anchor points.

    One kNN graph over the whole canonical cloud (built once, k = 16: ``neighbors[i]`` are the
    neighbours j of point i) is evaluated at M random anchors i (bounded memory). With
    a_i = A f_s,i (adapted student) and t_i = f_t,i (teacher), over the edges (i, j) of the anchors:

    * edge-difference matching (first-order relations, cf. Relational KD, Park et al. CVPR 2019)::

          L_edge = mean_(i,j) ||(a_i - a_j) - (t_i - t_j)||^2

    * local relation matching (cf. LSP, Yang et al. CVPR 2020): per anchor a softmax over its
      neighbours of the cosine similarity at temperature tau, teacher vs student::

          p_t(j|i) = softmax_j(cos(t_i, t_j) / tau),  p_s(j|i) = softmax_j(cos(a_i, a_j) / tau)
          L_rel = mean_i KL(p_t(.|i) || p_s(.|i)) = mean_i sum_j p_t log(p_t / p_s)

    Both are exactly 0 when A f_s = f_t. Edges excluded: slots with ``valid`` False (padding of
    clouds smaller than k) and self-edges j = i (a kNN of a cloud with itself lists each point
    first; such an edge has zero difference and a constant cosine of 1, i.e. no information).
    L_edge averages over the remaining edges; L_rel over the anchors that keep at least one
    edge (an anchor with a single edge has KL 0). With no edge at all both terms are 0 (still
    connected to the student's graph).

    Args:
        adapted_student: (N, C) A f_s, the adapted student features of the whole cloud.
        teacher: (N, C) f_t of the same points (detached here).
        neighbors: (N, k) int64 neighbour rows, e.g. ``models.ops.knn(points, points, 16)[0]``.
        num_anchors: M, clamped to N (default 4096).
        generator: torch.Generator the anchors are drawn from (:func:`sample_anchors`); the
            stage owns its seed.
        valid: optional (N, k) bool, False on padded neighbour slots.
        tau: softmax temperature (> 0).
        anchors: optional (M,) int64 anchor rows to use instead of drawing them.
        eps: norm floor of the cosine similarity.

    Returns:
        dict of scalar tensors ``edge`` (L_edge), ``relation`` (L_rel) and ``total`` (their sum,
        L_graph); float32 (float64 for float64 input).

    Raises:
        ValueError: on mismatched shapes, a bad ``valid`` mask, tau <= 0, or indices out of range.
    """
    op = "graph_distillation_loss"
    _check_pair(adapted_student, teacher, op)
    if adapted_student.dim() != 2:
        raise ValueError(f"{op}: features must be (N, C), got {tuple(adapted_student.shape)}")
    n = adapted_student.shape[0]
    if not isinstance(neighbors, torch.Tensor) or neighbors.dim() != 2 or neighbors.shape[0] != n:
        shape = tuple(neighbors.shape) if isinstance(neighbors, torch.Tensor) else type(neighbors).__name__
        raise ValueError(f"{op}: neighbors must be (N, k) = ({n}, k) neighbour rows, got {shape}")
    if valid is not None and (valid.dtype != torch.bool or valid.shape != neighbors.shape):
        raise ValueError(
            f"{op}: valid must be a bool tensor shaped like neighbors {tuple(neighbors.shape)}, "
            f"got {valid.dtype} {tuple(valid.shape)}"
        )
    if not tau > 0:
        raise ValueError(f"{op}: tau must be > 0, got {tau!r}")
    device = adapted_student.device
    if anchors is None:
        anchors = sample_anchors(n, num_anchors, generator=generator, device=device)
    elif anchors.dim() != 1 or anchors.is_floating_point():
        raise ValueError(f"{op}: anchors must be a 1-D integer tensor, got {anchors.dtype} {tuple(anchors.shape)}")
    anchors = anchors.to(device=device, dtype=torch.long)

    with _full_precision(device):
        s_all = _work(adapted_student)
        t_all = _work(teacher.detach())
        nbr = neighbors.to(device)[anchors]  # (M, k)
        edge_ok = nbr != anchors[:, None]  # (M, k) no self-edges
        if valid is not None:
            edge_ok = edge_ok & valid.to(device)[anchors]
        s_i, t_i = s_all[anchors], t_all[anchors]  # (M, C)
        s_j, t_j = gather(s_all, nbr), gather(t_all, nbr)  # (M, k, C)

        # Edge-difference matching.
        residual = (s_i[:, None, :] - s_j) - (t_i[:, None, :] - t_j)  # (M, k, C)
        sq = residual.pow(2).sum(-1)  # (M, k)
        num_edges = edge_ok.sum()
        edge = torch.where(edge_ok, sq, torch.zeros_like(sq)).sum() / num_edges.clamp_min(1).to(sq.dtype)

        # Local relation matching.
        def cosine(x_i: torch.Tensor, x_j: torch.Tensor) -> torch.Tensor:
            return (F.normalize(x_i, dim=-1, eps=eps)[:, None, :] * F.normalize(x_j, dim=-1, eps=eps)).sum(-1)

        logit_t = torch.where(edge_ok, cosine(t_i, t_j) / tau, torch.full_like(sq, _MASKED_LOGIT))  # (M, k)
        logit_s = torch.where(edge_ok, cosine(s_i, s_j) / tau, torch.full_like(sq, _MASKED_LOGIT))  # (M, k)
        log_p_t = torch.log_softmax(logit_t, dim=-1)
        log_p_s = torch.log_softmax(logit_s, dim=-1)
        kl_terms = torch.where(edge_ok, log_p_t.exp() * (log_p_t - log_p_s), torch.zeros_like(sq))
        row_ok = edge_ok.any(-1)  # (M,)
        kl_rows = torch.where(row_ok, kl_terms.sum(-1), torch.zeros_like(sq[:, 0]))  # (M,)
        relation = kl_rows.sum() / row_ok.sum().clamp_min(1).to(sq.dtype)
        return {"edge": edge, "relation": relation, "total": edge + relation}


def distillation_loss(terms: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """The distillation objective L = λ_gt L_gt + λ_out L_out + λ_feat L_feat + λ_graph L_graph.

    Args:
        terms: scalar losses by name, among ``gt``, ``out``, ``feat``, ``graph``
            (:data:`DISTILLATION_TERMS`); a term whose weight is 0 may be absent.
        weights: λ by the same names; a missing weight counts as 0.

    Returns:
        scalar float32 (float64 if a term is float64).

    Raises:
        ValueError: for an unknown name, a negative weight, or a missing term with a non-zero
            weight.
    """
    unknown = (set(terms) | set(weights)) - set(DISTILLATION_TERMS)
    if unknown:
        raise ValueError(f"distillation_loss: unknown term(s) {sorted(unknown)}; known: {list(DISTILLATION_TERMS)}")
    total = None
    for name in DISTILLATION_TERMS:
        weight = float(weights.get(name, 0.0))
        if weight < 0:
            raise ValueError(f"distillation_loss: weight of {name!r} must be >= 0, got {weight}")
        if weight == 0.0:
            continue
        if name not in terms:
            raise ValueError(f"distillation_loss: term {name!r} has weight {weight} but was not computed")
        value = weight * _work(terms[name])
        total = value if total is None else total + value
    if total is None:
        raise ValueError("distillation_loss: every weight is 0; give at least one term a positive weight")
    return total


def ground_truth_loss(
    rgb: torch.Tensor, alpha: torch.Tensor, image: torch.Tensor, mask: torch.Tensor, weights: Mapping[str, float],
) -> dict[str, torch.Tensor]:
    """L_gt of the distillation: w_rgb L1(render, frame on white) + w_mask L1(alpha, mask) + w_ssim (1 - SSIM).

    Args:
        rgb: (B, 3, H, W) the render on white; alpha: (B, 1, H, W) its coverage.
        image: (B, 3, H, W) the frames; mask: (B, 1, H, W) their head masks, both in [0, 1].
        weights: {rgb, mask, ssim}; an SSIM weight of 0 skips its computation.

    Returns:
        ``rgb``, ``mask``, (``ssim``) and their weighted sum ``total``: scalars.
    """
    target = composite_on_white(image, mask)
    terms = {"rgb": masked_l1(rgb, target), "mask": mask_loss(alpha, mask)}
    if weights["ssim"] > 0:
        terms["ssim"] = ssim_loss(rgb, target)
    terms["total"] = sum(weights[k] * v for k, v in terms.items())
    return terms


def per_point_distillation_losses(
    student, teacher, student_shading: nn.Module, teacher_shading: nn.Module, normals: torch.Tensor,
    adapted_feature: torch.Tensor | None = None, outputs: bool = True, deformation_weight: float = 100.0,
) -> dict[str, torch.Tensor]:
    """The distillation warm-up's per-point objective: the student fits the teacher's per-point outputs,
    no rendering (our addition to the paper's schedule; :mod:`lightning_modules.distill`).

    Args:
        student, teacher: canonical outputs (``albedo`` (N, 3), ``normals`` (N, 3), ``blendshapes``
            (N, E, 3), ``offset`` (N, 3), teacher ``feature`` (N, C_t)) on the same N points.
        student_shading, teacher_shading: the shading MLPs (..., 3) -> (..., 3), compared on ``normals``.
        normals: (M, 3) unit camera-space normals.
        adapted_feature: A(f_s) (N, C_t), for the L_feat term; None: no such term.
        outputs: with the L_out terms (albedo L1, normal 1 - cos, blendshape/offset MSE, and the L1
            between the two shading networks on ``normals``; the teacher's without gradient).
        deformation_weight: the weight of the blendshape/offset term in the total.

    Returns:
        ``albedo``, ``normal``, ``deformation``, ``shading`` (with ``outputs``), ``feat`` (with
        ``adapted_feature``) and ``total`` (their sum, every weight 1 but ``deformation``'s): scalars.
        Neither kind of term: ``total`` is the integer 0.
    """
    terms: dict[str, torch.Tensor] = {}
    if outputs:
        terms["albedo"] = albedo_distillation_loss(student.albedo, teacher.albedo)
        terms["normal"] = normal_distillation_loss(student.normals, teacher.normals)
        terms["deformation"] = deformation_distillation_loss(student.blendshapes, teacher.blendshapes,
                                                             student.offset, teacher.offset)
        with torch.no_grad():
            target = teacher_shading(normals)
        terms["shading"] = (student_shading(normals) - target).abs().mean()
    if adapted_feature is not None:
        terms["feat"] = feature_distillation_loss(adapted_feature, teacher.feature)
    terms["total"] = sum((deformation_weight if k == "deformation" else 1.0) * v for k, v in terms.items())
    return terms
