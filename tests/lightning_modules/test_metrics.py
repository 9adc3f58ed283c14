"""Held-out evaluation: keys name protocol and region, known metric values, the baselines (their own
silhouettes, the nearest frame of a hand-built example), the refined protocol (codes move, the
model never does)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.metrics import (
    Baselines,
    HeldOutMetrics,
    composite_on_white,
    metric_key,
    multiply_adds,
    nearest_training_frames,
    refine_codes,
    small_rotation,
)
from lightning_modules.run_folder import is_metric_key


def test_composite_on_white():
    image = torch.full((1, 3, 2, 2), 0.25)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0]).view(1, 1, 2, 2)
    out = composite_on_white(image, mask)
    assert out[0, :, 0, 0].tolist() == [0.25] * 3
    assert out[0, :, 0, 1].tolist() == [1.0] * 3


def test_a_key_names_its_protocol_and_region():
    assert metric_key("gar_inverted", "refined", "test", "face", "psnr") == "gar_inverted/refined/test/face/psnr"
    assert is_metric_key("gar/tracked/val/full/psnr") and is_metric_key("ms_per_frame/gar/refined")
    for old in ("gar/test/psnr", "gar/val/psnr", "ms_per_frame/gar", "gar/leaky/test/full/psnr"):
        assert not is_metric_key(old), old
    with pytest.raises(ValueError, match="protocol"):
        metric_key("gar", "inverted", "test", "full", "psnr")
    with pytest.raises(ValueError, match="region"):
        metric_key("gar", "tracked", "test", "mouth", "psnr")


def test_psnr_l1_ssim_on_a_known_offset():
    metrics = HeldOutMetrics({"teacher": ("tracked",), "baseline_mean": ("tracked",)})
    image = torch.full((2, 3, 16, 16), 0.5)
    mask = torch.ones(2, 1, 16, 16)
    metrics.update("teacher", "tracked", image + 0.1, image, mask)  # MSE 0.01 -> PSNR 20 dB
    metrics.update("teacher", "tracked", image, image, mask)  # identical frames: l1 0
    out = metrics.compute("test")
    assert set(out) == {f"teacher/tracked/test/{r}/{m}" for r in ("full", "face") for m in ("l1", "psnr", "ssim")}
    assert out["teacher/tracked/test/full/l1"] == pytest.approx(0.05, abs=1e-6)
    assert metrics.null_metrics() == {"teacher/tracked/test/full/lpips": None, "teacher/tracked/test/face/lpips": None}


def test_psnr_is_per_image_then_averaged():
    metrics = HeldOutMetrics({"teacher": ("tracked",)})
    image = torch.full((2, 3, 16, 16), 0.5)
    pred = image.clone()
    pred[0] += 0.1  # MSE 1e-2 -> 20 dB
    pred[1] += 0.01  # MSE 1e-4 -> 40 dB
    metrics.update("teacher", "tracked", pred, image, torch.ones(2, 1, 16, 16))
    out = metrics.compute("val")
    assert out["teacher/tracked/val/full/psnr"] == pytest.approx(30.0, abs=1e-3)
    assert out["teacher/tracked/val/full/l1"] == pytest.approx(0.055, abs=1e-6)
    assert out["teacher/tracked/val/full/ssim"] <= 1.0
    metrics.reset()
    assert metrics.compute("val") == {}


def test_full_scores_the_silhouette_face_does_not():
    """A perfect face with a wrong silhouette: face region exact, full region pays for the silhouette."""
    metrics = HeldOutMetrics({"teacher": ("tracked",)})
    image = torch.full((1, 3, 16, 16), 0.5)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8, :] = 1.0  # top half is head
    pred = torch.full((1, 3, 16, 16), 0.5)  # colours the whole frame: the bottom half should be white
    metrics.update("teacher", "tracked", pred, image, mask)
    out = metrics.compute("test")
    assert out["teacher/tracked/test/face/l1"] == 0.0
    assert out["teacher/tracked/test/full/l1"] == pytest.approx(0.25)  # half the pixels off by 0.5
    assert out["teacher/tracked/test/full/psnr"] == pytest.approx(-10 * math.log10(0.125), abs=1e-4)


def test_an_undeclared_row_is_refused():
    metrics = HeldOutMetrics({"teacher": ("tracked",)})
    with pytest.raises(KeyError, match="teacher/refined"):
        metrics.update("teacher", "refined", torch.ones(1, 3, 4, 4), torch.ones(1, 3, 4, 4), torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="protocol"):
        HeldOutMetrics({"teacher": ("leaky",)})


def _pose(angle: float, tz: float) -> torch.Tensor:
    rot = small_rotation(torch.tensor([[0.0, angle, 0.0]]))[0]
    return torch.cat([rot, torch.tensor([[0.0], [0.0], [tz]])], 1)


def test_nearest_training_frame_of_a_hand_built_example():
    """Three training frames; the distance divides each term by the training spread of that term."""
    expression = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    world_mat = torch.stack([_pose(0.0, 4.0), _pose(0.0, 4.0), _pose(0.3, 4.0)])
    # a query with the expression of frame 1 and the pose of frames 0/1: frame 1
    index, distance = nearest_training_frames(expression, world_mat, torch.tensor([[1.0, 0.0]]), _pose(0.0, 4.0)[None])
    assert index.tolist() == [1] and distance.item() == pytest.approx(0.0, abs=1e-6)
    # expression halfway between frames 0 and 1, pose of frame 2: expression spread var_e = mean |e - mean e|^2
    var_e = (expression - expression.mean(0)).pow(2).sum(1).mean()
    rots = world_mat[:, :, :3].flatten(1)
    var_r = (rots - rots.mean(0)).pow(2).sum(1).mean()
    query_e, query_w = torch.tensor([[0.5, 0.0]]), _pose(0.3, 4.0)[None]
    expected = torch.stack([
        (0.25 / var_e + (rots[0] - rots[2]).pow(2).sum() / var_r),  # frame 0: expression 0.5 away, pose off
        (0.25 / var_e + (rots[1] - rots[2]).pow(2).sum() / var_r),  # frame 1: the same
        ((0.25 + 4.0) / var_e),  # frame 2: expression (0.5, -2) away, pose equal
    ]).sqrt()
    index, distance = nearest_training_frames(expression, world_mat, query_e, query_w)
    assert index.item() == int(expected.argmin())
    assert distance.item() == pytest.approx(float(expected.min()), rel=1e-5)
    with pytest.raises(ValueError, match="E = 3"):
        nearest_training_frames(expression, world_mat, torch.zeros(1, 3), query_w)


def test_baselines_predict_their_own_silhouette():
    image = torch.stack([torch.full((3, 2, 2), 0.2), torch.full((3, 2, 2), 0.6)])
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).expand(2, 1, 2, 2).clone()
    mask[1, 0, 1, 0] = 1.0  # frame 1 has one more head pixel
    expression = torch.tensor([[0.0], [1.0]])
    world_mat = torch.stack([_pose(0.0, 4.0), _pose(0.0, 4.0)])
    baselines = Baselines(image, mask, world_mat, expression)
    out = baselines(torch.tensor([[0.9]]), world_mat[:1])
    # mean of the frames on white: top row (0.2 + 0.6) / 2, pixel (1, 0) (1 + 0.6) / 2, pixel (1, 1) white
    mean = out["baseline_mean"][0, 0]
    assert mean.flatten().tolist() == pytest.approx([0.4, 0.4, 0.8, 1.0])
    # nearest in expression: frame 1, its image under its own mask, on white
    assert out["baseline_nearest"][0, 0].flatten().tolist() == pytest.approx([0.6, 0.6, 0.6, 1.0])


def test_refined_protocol_moves_the_codes_never_the_model():
    """refine_codes fits the codes of a frame rendered by a frozen linear 'model'; every parameter
    stays bitwise equal and gets no .grad."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2 + 12 + 1, 3 * 4 * 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def render(expression, world_mat, extra, scale):
        x = torch.cat([expression, world_mat.flatten(1), extra], 1)
        return torch.sigmoid(model(x) * scale).view(-1, 3, 4, 4)

    expression = torch.zeros(2, 2)
    world_mat = torch.stack([_pose(0.0, 4.0), _pose(0.1, 4.0)])
    z = torch.zeros(2, 1)
    with torch.no_grad():
        target = render(expression + 0.3, world_mat, z + 0.2, 1.0)
    codes = refine_codes(render, expression, world_mat, target, steps=30, lr=0.05, extra=z, inputs=(1.0,))
    assert codes.losses[-1] < 0.5 * codes.losses[0]
    assert not torch.equal(codes.expression, expression) and codes.extra.shape == (2, 1)
    # the refined camera is still a rotation and a translation
    rot = codes.world_mat[:, :, :3]
    torch.testing.assert_close(rot @ rot.transpose(1, 2), torch.eye(3).expand(2, 3, 3), atol=1e-5, rtol=0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())
    zero = refine_codes(render, expression, world_mat, target, steps=0, lr=0.05, extra=z, inputs=(1.0,))
    assert torch.equal(zero.expression, expression) and torch.equal(zero.world_mat, world_mat)
    with pytest.raises(ValueError, match="steps >= 0"):
        refine_codes(render, expression, world_mat, target, steps=-1, lr=0.05)


def test_refined_protocol_works_inside_inference_mode():
    """Lightning evaluates in inference mode: inputs made there are cloned for the backward passes."""
    weight = torch.randn(3, 2)
    with torch.inference_mode():
        scale = torch.ones(1, 3, 1, 1)  # an inference tensor, like a cached canonical output

        def render(expression, world_mat, extra, s):
            return torch.sigmoid(expression @ weight.T)[:, :, None, None].expand(-1, -1, 2, 2) * s

        target = torch.full((1, 3, 2, 2), 0.7)
        codes = refine_codes(render, torch.zeros(1, 2), _pose(0.0, 4.0)[None], target, 5, 0.1, inputs=(scale,))
    assert codes.losses[-1] < codes.losses[0]


def test_multiply_adds_counts_forward_and_backward_matmuls():
    layer = torch.nn.Linear(8, 4, bias=False)
    x = torch.randn(5, 8, requires_grad=True)

    def step():
        (grad,) = torch.autograd.grad(layer(x).sum(), x)
        return grad

    # forward 5 x 8 x 4 multiply-adds; the input gradient (5, 4) @ (4, 8) the same again
    assert multiply_adds(step) == 2 * 5 * 8 * 4


def test_flicker_hand_value_over_batches_and_a_new_sequence():
    """Three frames in two batches. Masks cover the left column (2 of 4 pixels). The ground truth
    moves by 0.1 between every pair; the render by 0.3 then by 0.1: flicker = ((0.3 - 0.1) + 0) / 2."""
    from lightning_modules.metrics import Flicker

    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).expand(1, 1, 2, 2)
    gt = torch.stack([torch.full((3, 2, 2), v) for v in (0.2, 0.3, 0.4)])
    pred = torch.stack([torch.full((3, 2, 2), v) for v in (0.2, 0.5, 0.6)])
    pred[:, :, :, 1] = torch.tensor([0.0, 1.0, 0.0])[:, None, None]  # outside the mask: ignored
    masks = mask.expand(3, 1, 2, 2)
    flicker = Flicker()
    flicker.update(pred[:2], gt[:2], masks[:2], torch.tensor([10, 11]))
    flicker.update(pred[2:], gt[2:], masks[2:], torch.tensor([12]))  # pairs with frame 11 of the last batch
    assert int(flicker.pairs) == 2
    assert flicker.compute().item() == pytest.approx(0.1, abs=1e-6)
    # a frame number that goes back, or skips one, pairs nothing
    flicker.update(pred[:1], gt[:1], masks[:1], torch.tensor([3]))
    flicker.update(pred[1:2], gt[1:2], masks[1:2], torch.tensor([5]))
    assert int(flicker.pairs) == 2
    flicker.reset()
    assert torch.isnan(flicker.compute()) and int(flicker.pairs) == 0
    flicker.update(pred[1:2], gt[1:2], masks[1:2], torch.tensor([11]))  # reset forgets the last frame
    assert int(flicker.pairs) == 0


def test_flicker_is_reported_for_declared_rows_only():
    from lightning_modules.metrics import HeldOutMetrics

    metrics = HeldOutMetrics({"student": ("tracked",), "gar": ("tracked", "refined")}, flicker_models=("gar",))
    image, mask = torch.rand(4, 3, 8, 8), torch.ones(4, 1, 8, 8)
    for model, protocol in (("student", "tracked"), ("gar", "tracked"), ("gar", "refined")):
        metrics.update(model, protocol, image, image, mask, torch.arange(4))
    out = metrics.compute("test")
    assert out["gar/tracked/test/full/flicker"] == pytest.approx(0.0, abs=1e-6)  # render = ground truth
    assert [k for k in out if k.endswith("flicker")] == ["gar/tracked/test/full/flicker"]
