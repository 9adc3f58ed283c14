"""Golden values for the distillation losses (DESIGN.md, "Distillation losses") on hand-made inputs.

The graph case used throughout: 4 points with 2-d features, 2 neighbours each (no self-edges)::

    teacher t: t0 = (1, 0)   t1 = (0, 1)   t2 = (1, 0)   t3 = (0, 2)
    student a: a0 = (1, 0)   a1 = (1, 0)   a2 = (0, 1)   a3 = (0, 3)      (adapted, A f_s)
    e = a - t: e0 = (0, 0)   e1 = (1, -1)  e2 = (-1, 1)  e3 = (0, 1)
    neighbours: 0 -> [1, 2], 1 -> [0, 3], 2 -> [3, 0], 3 -> [1, 2]

Edge difference (a_i - a_j) - (t_i - t_j) = e_i - e_j, squared norms:
(0,1) 2, (0,2) 2, (1,0) 2, (1,3) |(1,-2)|^2 = 5, (2,3) |(-1,0)|^2 = 1, (2,0) 2, (3,1) 5, (3,2) 1;
sum 20 over 8 edges -> 2.5.

Cosines (every vector is axis-aligned, so each cosine is 0 or 1), teacher vs student per anchor:
0: t (0, 1) vs a (1, 0);  1: (0, 1) vs (1, 0);  2: (0, 1) vs (1, 0);  3: (1, 0) vs (0, 1).
With tau = 1 / ln 3 a pair of logits (1, 0)/tau becomes softmax (3/4, 1/4), so every anchor has
KL((1/4, 3/4) || (3/4, 1/4)) = 1/4 ln(1/3) + 3/4 ln 3 = (1/2) ln 3.
"""

from __future__ import annotations

import math

import pytest
import torch

from models.adapters import FeatureAdapter
from models.losses import (
    albedo_distillation_loss,
    deformation_distillation_loss,
    distillation_loss,
    feature_distillation_loss,
    graph_distillation_loss,
    normal_distillation_loss,
    output_distillation_loss,
    rendered_image_distillation_loss,
    sample_anchors,
)

TEACHER = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 2.0]])
STUDENT = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
NEIGHBORS = torch.tensor([[1, 2], [0, 3], [3, 0], [1, 2]])
TAU = 1.0 / math.log(3.0)
HALF_LN3 = 0.5 * math.log(3.0)


# ------------------------------------------------------------------------------ output losses


def test_albedo_l1_golden():
    s = torch.tensor([[0.2, 0.4, 0.6], [1.0, 0.0, 0.5]])
    t = torch.tensor([[0.0, 0.4, 0.9], [0.5, 0.0, 0.5]])
    # |diffs| = 0.2, 0, 0.3, 0.5, 0, 0 -> mean 1.0 / 6
    assert albedo_distillation_loss(s, t).item() == pytest.approx(1.0 / 6.0)


def test_normal_one_minus_cos_golden():
    s = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 3.0, 4.0], [1.0, 1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 1.0], [-1.0, -1.0, 0.0]])
    # 1 - cos: orthogonal 1, parallel (unnormalised) 0, cos = 4/5 -> 0.2, opposite 2
    assert normal_distillation_loss(s, t).item() == pytest.approx((1.0 + 0.0 + 0.2 + 2.0) / 4)


def test_deformation_mse_golden():
    bs = torch.zeros(2, 2, 3)
    bt = torch.zeros(2, 2, 3)
    bs[0, 1] = torch.tensor([1.0, 2.0, 0.0])  # squared errors 1 + 4 over 12 elements
    os_ = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 0.0]])
    ot = torch.zeros(2, 3)  # squared error 9 over 6 elements
    assert deformation_distillation_loss(bs, bt).item() == pytest.approx(5.0 / 12)
    assert deformation_distillation_loss(bs, bt, os_, ot).item() == pytest.approx(5.0 / 12 + 9.0 / 6)
    with pytest.raises(ValueError, match="both offsets"):
        deformation_distillation_loss(bs, bt, os_, None)


def test_rendered_image_l1_golden_with_mask():
    s = torch.zeros(1, 3, 2, 2)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 2, 2)
    assert rendered_image_distillation_loss(s, t).item() == pytest.approx(0.5)
    assert rendered_image_distillation_loss(s, t, mask).item() == pytest.approx(0.3)


def _outputs(seed: int, n: int = 5, e: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "albedo": torch.rand(n, 3, generator=g),
        "normals": torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1),
        "blendshapes": torch.randn(n, e, 3, generator=g),
        "offset": torch.randn(n, 3, generator=g),
        "image": torch.rand(2, 3, 4, 4, generator=g),
    }


def _out_loss(s: dict, t: dict, **kwargs) -> dict[str, torch.Tensor]:
    return output_distillation_loss(
        s["albedo"], t["albedo"], s["normals"], t["normals"], s["blendshapes"], t["blendshapes"],
        s["offset"], t["offset"], s["image"], t["image"], **kwargs,
    )


def test_output_loss_sums_its_terms_and_is_zero_for_identical_outputs():
    s, t = _outputs(0), _outputs(1)
    terms = _out_loss(s, t)
    assert set(terms) == {"albedo", "normal", "deformation", "render", "total"}
    assert terms["albedo"].item() == pytest.approx(albedo_distillation_loss(s["albedo"], t["albedo"]).item())
    assert terms["total"].item() == pytest.approx(sum(terms[k].item() for k in ("albedo", "normal", "deformation", "render")))
    same = _out_loss(t, t)
    for name, value in same.items():
        assert value.item() == pytest.approx(0.0, abs=1e-6), name
    no_image = output_distillation_loss(
        s["albedo"], t["albedo"], s["normals"], t["normals"], s["blendshapes"], t["blendshapes"]
    )
    assert "render" not in no_image
    with pytest.raises(ValueError, match="both rendered images"):
        output_distillation_loss(
            s["albedo"], t["albedo"], s["normals"], t["normals"], s["blendshapes"], t["blendshapes"],
            student_image=s["image"],
        )


def test_output_loss_weights_only_the_deformation_term():
    s, t = _outputs(0), _outputs(1)
    plain = _out_loss(s, t)
    weighted = _out_loss(s, t, deformation_weight=100.0)
    for name in ("albedo", "normal", "deformation", "render"):  # the terms are logged unweighted
        assert weighted[name].item() == pytest.approx(plain[name].item())
    expected = plain["total"].item() + 99.0 * plain["deformation"].item()
    assert weighted["total"].item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="deformation_weight must be >= 0"):
        output_distillation_loss(
            s["albedo"], t["albedo"], s["normals"], t["normals"], s["blendshapes"], t["blendshapes"],
            deformation_weight=-1.0,
        )


def test_output_loss_gradients_reach_student_never_teacher():
    s = {k: v.clone().requires_grad_(True) for k, v in _outputs(0).items()}
    t = {k: v.clone().requires_grad_(True) for k, v in _outputs(1).items()}
    _out_loss(s, t)["total"].backward()
    for name in s:
        assert s[name].grad is not None and s[name].grad.abs().sum() > 0, name
        assert t[name].grad is None, name


def test_output_losses_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        albedo_distillation_loss(torch.zeros(4, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        normal_distillation_loss(torch.zeros(4, 2), torch.zeros(4, 2))


# ------------------------------------------------------------------------------ feature loss


def test_feature_loss_golden_and_zero():
    # per-point |e|^2 = 0, 2, 2, 1 -> mean 5/4
    assert feature_distillation_loss(STUDENT, TEACHER).item() == pytest.approx(1.25)
    assert feature_distillation_loss(TEACHER.clone(), TEACHER).item() == 0.0


def test_feature_adapter_is_a_per_point_linear_map():
    adapter = FeatureAdapter(3, 5)
    f = torch.randn(7, 3)
    expected = f @ adapter.proj.weight.T + adapter.proj.bias
    assert torch.allclose(adapter(f), expected)
    assert torch.allclose(adapter(f.view(1, 7, 3))[0], expected)  # any leading shape
    assert sum(p.numel() for p in adapter.parameters()) == 3 * 5 + 5
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        adapter(torch.randn(7, 4))
    with pytest.raises(ValueError, match="positive int"):
        FeatureAdapter(0, 5)


# ------------------------------------------------------------------------------ graph loss


def test_graph_loss_golden_4_points():
    out = graph_distillation_loss(STUDENT, TEACHER, NEIGHBORS, tau=TAU)
    assert out["edge"].item() == pytest.approx(20.0 / 8)
    assert out["relation"].item() == pytest.approx(HALF_LN3, rel=1e-6)
    assert out["total"].item() == pytest.approx(2.5 + HALF_LN3, rel=1e-6)


def test_graph_loss_golden_with_padded_neighbour():
    # Anchor 3 loses its edge to 1: edges 20 - 5 = 15 over 7; its softmax has one entry (KL 0),
    # so the relation mean is (3 * (1/2) ln 3 + 0) / 4.
    valid = torch.ones(4, 2, dtype=torch.bool)
    valid[3, 0] = False
    out = graph_distillation_loss(STUDENT, TEACHER, NEIGHBORS, tau=TAU, valid=valid)
    assert out["edge"].item() == pytest.approx(15.0 / 7)
    assert out["relation"].item() == pytest.approx(3 * HALF_LN3 / 4, rel=1e-6)


def test_graph_loss_ignores_self_edges_and_uses_given_anchors():
    with_self = torch.cat([torch.arange(4)[:, None], NEIGHBORS], dim=1)  # kNN lists each point first
    out = graph_distillation_loss(STUDENT, TEACHER, with_self, tau=TAU)
    assert out["edge"].item() == pytest.approx(2.5)
    assert out["relation"].item() == pytest.approx(HALF_LN3, rel=1e-6)
    # Anchor 1 alone: edges (1,0) 2 and (1,3) 5.
    one = graph_distillation_loss(STUDENT, TEACHER, NEIGHBORS, tau=TAU, anchors=torch.tensor([1]))
    assert one["edge"].item() == pytest.approx(3.5)
    assert one["relation"].item() == pytest.approx(HALF_LN3, rel=1e-6)


def test_graph_loss_relation_matches_brute_force_kl():
    g = torch.Generator().manual_seed(3)
    n, k, c, tau = 12, 4, 5, 0.3
    s, t = torch.randn(n, c, generator=g), torch.randn(n, c, generator=g)
    nbr = torch.randint(0, n, (n, k), generator=g)
    nbr = torch.where(nbr == torch.arange(n)[:, None], (nbr + 1) % n, nbr)  # no self-edges
    out = graph_distillation_loss(s, t, nbr, tau=tau)
    kl, edges = 0.0, 0.0
    for i in range(n):
        cos_t = torch.stack([torch.nn.functional.cosine_similarity(t[i], t[j], dim=0) for j in nbr[i]]) / tau
        cos_s = torch.stack([torch.nn.functional.cosine_similarity(s[i], s[j], dim=0) for j in nbr[i]]) / tau
        p, q = cos_t.softmax(0), cos_s.softmax(0)
        kl += float((p * (p / q).log()).sum())
        edges += sum(float(((s[i] - s[j]) - (t[i] - t[j])).pow(2).sum()) for j in nbr[i])
    assert out["relation"].item() == pytest.approx(kl / n, rel=1e-5)
    assert out["edge"].item() == pytest.approx(edges / (n * k), rel=1e-5)


def test_each_term_is_zero_when_student_equals_teacher():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(50, 8, generator=g)
    nbr = torch.randint(0, 50, (50, 6), generator=g)
    out = graph_distillation_loss(t.clone(), t, nbr, num_anchors=20, generator=g)
    assert out["edge"].item() == 0.0
    assert out["relation"].item() == 0.0
    assert feature_distillation_loss(t.clone(), t).item() == 0.0


def test_gradients_reach_student_and_adapter_never_teacher():
    g = torch.Generator().manual_seed(1)
    raw = torch.randn(30, 4, generator=g, requires_grad=True)  # student latent f_s
    teacher = torch.randn(30, 6, generator=g, requires_grad=True)  # f_t, a leaf that must stay untouched
    adapter = FeatureAdapter(4, 6)
    nbr = torch.randint(0, 30, (30, 5), generator=g)
    adapted = adapter(raw)
    graph = graph_distillation_loss(adapted, teacher, nbr, num_anchors=10, generator=g)
    loss = distillation_loss({"feat": feature_distillation_loss(adapted, teacher), "graph": graph["total"]},
                             {"feat": 1.0, "graph": 0.5})
    loss.backward()
    assert teacher.grad is None
    assert raw.grad is not None and raw.grad.abs().sum() > 0
    for p in adapter.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_graph_loss_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 2, generator=g, dtype=torch.float64)
    nbr = torch.tensor([[(i + 1) % 5, (i + 2) % 5, (i + 4) % 5] for i in range(5)])
    assert torch.autograd.gradcheck(lambda x: graph_distillation_loss(x, t, nbr, tau=0.5)["total"], (s,))


def test_anchors_come_from_the_generator_and_clamp_to_n():
    a = sample_anchors(100, 10, generator=torch.Generator().manual_seed(5))
    b = sample_anchors(100, 10, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.unique().numel() == 10 and int(a.min()) >= 0 and int(a.max()) < 100
    assert torch.equal(sample_anchors(7, 4096), torch.arange(7))
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(100, 3, generator=g), torch.randn(100, 3, generator=g)
    nbr = torch.randint(0, 100, (100, 4), generator=g)
    drawn = graph_distillation_loss(s, t, nbr, num_anchors=10, generator=torch.Generator().manual_seed(5))
    given = graph_distillation_loss(s, t, nbr, anchors=a)
    assert drawn["total"].item() == pytest.approx(given["total"].item(), rel=1e-6)


def test_graph_loss_is_float32_under_bf16_autocast():
    s16, t16 = STUDENT.to(torch.bfloat16), TEACHER.to(torch.bfloat16)  # exactly representable
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = graph_distillation_loss(s16, t16, NEIGHBORS, tau=TAU)
        feat = feature_distillation_loss(s16, t16)
    assert out["total"].dtype == torch.float32 and feat.dtype == torch.float32
    assert out["relation"].item() == pytest.approx(HALF_LN3, rel=1e-6)
    assert feat.item() == pytest.approx(1.25)


def test_graph_loss_rejects_bad_inputs():
    with pytest.raises(ValueError, match="neighbors must be"):
        graph_distillation_loss(STUDENT, TEACHER, NEIGHBORS[:3])
    with pytest.raises(ValueError, match="valid must be a bool"):
        graph_distillation_loss(STUDENT, TEACHER, NEIGHBORS, valid=torch.ones(4, 2))
    with pytest.raises(ValueError, match="tau must be > 0"):
        graph_distillation_loss(STUDENT, TEACHER, NEIGHBORS, tau=0.0)
    with pytest.raises(ValueError, match=r"values must lie in \[0, 4\)"):
        graph_distillation_loss(STUDENT, TEACHER, NEIGHBORS + 3)


# ------------------------------------------------------------------------------ objective


def test_distillation_objective_weights_terms():
    terms = {"gt": torch.tensor(1.0), "out": torch.tensor(2.0), "feat": torch.tensor(3.0), "graph": torch.tensor(4.0)}
    weights = {"gt": 1.0, "out": 0.5, "feat": 0.1, "graph": 0.0}
    assert distillation_loss(terms, weights).item() == pytest.approx(1.0 + 1.0 + 0.3)
    assert distillation_loss({"gt": torch.tensor(2.0)}, {"gt": 1.0, "graph": 0.0}).item() == 2.0
    with pytest.raises(ValueError, match="unknown term"):
        distillation_loss({"kd": torch.tensor(1.0)}, {"kd": 1.0})
    with pytest.raises(ValueError, match="was not computed"):
        distillation_loss({"gt": torch.tensor(1.0)}, {"gt": 1.0, "feat": 1.0})
