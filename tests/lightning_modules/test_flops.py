"""FLOP counting (DESIGN.md, "Counting rules"): golden counts from layer sizes, the handles we
register, the explicit-Jacobian normal branch cross-checked with FlopCounterMode, and the
FlopCounter callback writing metrics.json."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules.flops import (
    FlopCounter,
    FlopTarget,
    count_flops,
    flop_counter_macs,
    sphere_points,
    teacher_canonical_flops,
    teacher_flop_target,
    teacher_frame_flops,
)
from lightning_modules.run_folder import RunFolder
from models import ops
from models.teacher import GeometryNetwork, PointAvatarTeacher


def mlp_macs(dims: list[int]) -> int:
    """Multiply-adds per point of a chain of Linear layers dims[0] -> dims[1] -> ..."""
    return sum(a * b for a, b in zip(dims[:-1], dims[1:]))


# Tiny teacher: encoding F = 1 (9-d input), geometry width 16, depth 3, skip at layer 2:
# linear layers 9 -> 16, 16 -> 7 (16 - 9: the skip re-appends the 9-d encoding), 16 -> 16, 16 -> 4.
TINY = dict(
    expression_dim=2, max_points=512, init_points=100, min_points=10, num_frequencies=1, geometry_width=16,
    geometry_depth=3, skip_layers=(2,), deformer_width=8, deformer_depth=2, shading_width=8, shading_depth=2,
)
TINY_GEOMETRY_LAYERS = [(9, 16), (16, 7), (16, 16), (16, 4)]
TINY_GEOMETRY_FORWARD = sum(a * b for a, b in TINY_GEOMETRY_LAYERS)  # 144 + 112 + 256 + 64 = 576
TINY_GEOMETRY_GRADIENT = sum(a * b for a, b in TINY_GEOMETRY_LAYERS[:-1])  # every layer but the last: 512
TINY_DEFORMER = mlp_macs([3, 8, 8]) + 8 * (3 * 2) + 8 * 3  # trunk + blendshape head (E x 3) + offset head = 160
TINY_PER_POINT = TINY_GEOMETRY_FORWARD + TINY_GEOMETRY_GRADIENT + TINY_DEFORMER + 3  # + |grad| (3 squares)
TINY_FRAME_PER_POINT = 2 * 3 + 9 + 3 + mlp_macs([3, 8, 8, 3])  # deform E x 3, rotate 3x3, |n|, shading


@pytest.fixture(scope="module")
def tiny_teacher() -> PointAvatarTeacher:
    torch.manual_seed(0)
    return PointAvatarTeacher(**TINY)


# ------------------------------------------------------------------------------ basics


def test_linear_64_to_128_on_1024_points():
    report = count_flops(nn.Linear(64, 128), (torch.randn(1024, 64),))
    assert report.total == 1024 * 64 * 128 == 8_388_608
    assert report.by_operator == {"linear": 8_388_608}
    assert report.unsupported == {}
    assert flop_counter_macs(nn.Linear(64, 128), (torch.randn(1024, 64),)) == 8_388_608


def test_by_module_names_are_the_counted_modules():
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    report = count_flops(net, (torch.randn(10, 3),))
    assert report.by_module[""] == report.total == 10 * (24 + 16)
    assert report.by_module["0"] == 240 and report.by_module["2"] == 160


def test_bound_method_and_plain_function():
    lin = nn.Linear(4, 6)
    assert count_flops(lin.forward, (torch.randn(5, 4),)).total == 5 * 24
    assert count_flops(lambda x, y: x @ y, (torch.randn(3, 4), torch.randn(4, 2))).total == 24
    with pytest.raises(ValueError, match="require grad"):
        count_flops(lambda x: lin(x), (torch.randn(5, 4),))  # closes over lin's parameters
    with pytest.raises(ValueError, match="tuple"):
        count_flops(lin, torch.randn(5, 4))


def test_non_tensor_inputs_are_bound_and_dict_outputs_flattened():
    def fn(x, scale: float, mode: str):
        return {"y": x @ x.T * scale, "mode": mode, "none": None}

    assert count_flops(fn, (torch.randn(6, 3), 2.0, "a")).total == 6 * 3 * 6


def test_counting_changes_no_state():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(8, 3)
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    count_flops(net, (x,))
    assert torch.equal(torch.rand(3), expected_next)  # RNG untouched
    assert net.training and all(m.training for m in net.modules())
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key  # batch-norm statistics untouched


# ------------------------------------------------------------------------------ our handles

X45 = torch.arange(20.0).view(4, 5)
SRC = torch.arange(12.0).view(6, 2)
SEG = torch.tensor([0, 0, 1, 2, 2, 2])

# (case, function, inputs, expected total, operator recorded as zero-flop or None)
HANDLE_CASES = [
    ("index", lambda x, i: x[i], (torch.randn(5, 3), torch.tensor([[0, 1], [2, 3], [4, 0], [1, 1]])), 0, "aten::index"),
    ("gather", lambda x, i: torch.gather(x, 0, i), (torch.randn(5, 3), torch.zeros(4, 3, dtype=torch.long)), 0, "aten::gather"),
    ("index_select", lambda x, i: x.index_select(0, i), (torch.randn(5, 3), torch.tensor([4, 0])), 0, "aten::index_select"),
    ("ops.gather", lambda x, i: ops.gather(x, i), (torch.randn(5, 3), torch.tensor([[0, 1], [2, 3]])), 0, "aten::index"),
    ("index_add", lambda s, i: torch.zeros(3, 2).index_add(0, i, s), (SRC, SEG), 12, None),
    ("scatter_add", lambda s, i: torch.zeros(3, 2).scatter_add(0, i[:, None].expand(-1, 2), s), (SRC, SEG), 12, None),
    ("scatter_reduce", lambda s, i: torch.zeros(3, 2).scatter_reduce(0, i[:, None].expand(-1, 2), s, "amax", include_self=False), (SRC, SEG), 12, None),
    ("bincount", lambda i: torch.bincount(i, minlength=3), (SEG,), 6, None),
    ("sum", lambda x: x.sum(-1), (X45,), 20, None),
    ("mean", lambda x: x.mean(), (X45,), 20, None),
    ("amax", lambda x: x.amax(0), (X45,), 20, None),
    ("max over a dim", lambda x: x.max(dim=1).values, (X45,), 20, None),
    ("elementwise max", lambda x, y: torch.max(x, y), (X45, X45.flip(0)), 0, "aten::max"),
    ("softmax", lambda x: x.softmax(-1), (X45,), 20, None),
    ("normalize", lambda x: F.normalize(x, dim=-1), (X45,), 20, None),
    ("elementwise", lambda x: torch.sigmoid(x) * 2 + x.sin() - F.softplus(x, beta=100), (X45,), 0, "aten::sigmoid"),
]
if "cluster" in ops.available_backends():
    import torch_scatter

    HANDLE_CASES += [
        ("torch_scatter max", lambda s, i: torch_scatter.scatter(s, i, 0, dim_size=3, reduce="max"), (SRC, SEG), 12, None),
        ("torch_scatter segment_csr", lambda s, p: torch_scatter.segment_csr(s, p, reduce="sum"), (SRC, torch.tensor([0, 2, 3, 6])), 12, None),
    ]


@pytest.mark.parametrize("case, fn, inputs, expected, zero_op", HANDLE_CASES, ids=[c[0] for c in HANDLE_CASES])
def test_handles_hand_counts(case, fn, inputs, expected, zero_op):
    report = count_flops(fn, inputs)
    assert report.total == expected
    assert report.unsupported == {}
    if zero_op is not None:
        assert report.zero_flop_ops.get(zero_op, 0) >= 1


def test_weight_norm_reparametrisation_is_free():
    lin = weight_norm(nn.Linear(3, 4))
    report = count_flops(lin, (torch.randn(5, 3),))
    assert report.total == 5 * 3 * 4
    assert report.zero_flop_ops == {"aten::_weight_norm": 1}


def test_unknown_operators_are_reported_unsupported():
    report = count_flops(lambda x: torch.topk(x, 2, dim=-1).values, (X45,))
    assert report.total == 0
    assert report.unsupported == {"aten::topk": 1}


@pytest.mark.parametrize("backend", ops.available_backends())
def test_ops_scatter_counts_agree_between_backends(backend):
    # sum: one flop per source element (12); mean: sum + one per index for the counts (12 + 6).
    for reduce, expected in (("sum", 12), ("max", 12), ("min", 12), ("mean", 18)):
        report = count_flops(lambda s, i, r=reduce: ops.scatter(s, i, dim_size=3, reduce=r, backend=backend), (SRC, SEG))
        assert report.total == expected, (reduce, report)


# ------------------------------------------------------------------------------ teacher


def test_explicit_normal_branch_hand_formula_and_flop_counter_cross_check():
    torch.manual_seed(0)
    geometry = GeometryNetwork(num_frequencies=1, width=16, depth=3, skip_layers=(2,))
    x = sphere_points(10)
    fv = count_flops(geometry.forward_with_gradient, (x,))
    assert fv.total == 10 * (TINY_GEOMETRY_FORWARD + TINY_GEOMETRY_GRADIENT) == 10_880
    assert fv.by_operator == {"linear": 10 * 576, "matmul": 10 * 512}
    assert flop_counter_macs(geometry.forward_with_gradient, (x,)) == fv.total
    # The counted branch is the real gradient: it equals autograd's.
    xg = x.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(geometry(xg)[0][:, 0].sum(), xg)
    assert torch.allclose(geometry.forward_with_gradient(x)[2], auto, atol=1e-5)


def test_autograd_normals_cannot_be_traced(tiny_teacher):
    # Why the explicit path exists: fvcore's trace fails on torch.autograd.grad inside forward.
    with pytest.raises(RuntimeError, match="could not trace"):
        count_flops(tiny_teacher.geometry_at, (sphere_points(8), True, None, "autograd"))
    # fvcore leaves its scope hooks on the modules after a failed trace; count_flops removes them
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in tiny_teacher.modules())


def test_tiny_teacher_canonical_count_is_linear_in_n(tiny_teacher):
    a = teacher_canonical_flops(tiny_teacher, 10_000)
    b = teacher_canonical_flops(tiny_teacher, 20_000)
    assert a.total == 10_000 * TINY_PER_POINT
    assert b.total == 2 * a.total
    assert a.by_module["geometry"] == 10_000 * (TINY_GEOMETRY_FORWARD + TINY_GEOMETRY_GRADIENT)
    assert a.by_module["deformer"] == 10_000 * TINY_DEFORMER
    assert a.unsupported == {}


def test_tiny_teacher_frame_count(tiny_teacher):
    report = teacher_frame_flops(tiny_teacher, 300)
    assert report.total == 300 * TINY_FRAME_PER_POINT
    assert report.by_module["shading"] == 300 * mlp_macs([3, 8, 8, 3])


def test_default_teacher_canonical_count_at_10k_points():
    torch.manual_seed(0)
    teacher = PointAvatarTeacher()  # PointAvatar's sizes, E = 16
    layers = [(39, 256), (256, 256), (256, 256), (256, 217), *[(256, 256)] * 5, (256, 4)]
    geometry = sum(a * b for a, b in layers) + sum(a * b for a, b in layers[:-1])
    deformer = mlp_macs([3, 128, 128, 128, 128]) + 128 * 48 + 128 * 3
    assert (geometry, deformer) == (525_312 + 524_288, 56_064)
    report = teacher_canonical_flops(teacher, 10_000)  # cross-checked against FlopCounterMode inside
    assert report.total == 10_000 * (geometry + deformer + 3)
    assert report.by_module["geometry"] == 10_000 * geometry
    assert report.unsupported == {}


# ------------------------------------------------------------------------------ the callback


class _Student(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4))

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return self.net(points)


class _DistillLike(pl.LightningModule):
    """A stage with a teacher and a student, as the distillation stage will have."""

    def __init__(self, teacher_traceable: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.teacher = PointAvatarTeacher(**TINY)
        self.student = _Student()
        self.teacher_traceable = teacher_traceable

    def training_step(self, batch, batch_idx):
        return self.student(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.student.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(16, 3)), batch_size=8)

    def flop_targets(self) -> dict[str, FlopTarget]:
        teacher = teacher_flop_target(self.teacher)
        if not self.teacher_traceable:  # the autograd normals: fvcore cannot trace them
            teacher.canonical = lambda n: count_flops(self.teacher.geometry_at, (sphere_points(n),))
        student = FlopTarget(
            canonical=lambda n: count_flops(self.student, (sphere_points(n),)),
            num_points=self.teacher.num_active,
            params=sum(p.numel() for p in self.student.parameters()),
        )
        return {"teacher": teacher, "student": student}


def _fit(module: pl.LightningModule, tmp_path) -> dict:
    trainer = pl.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[RunFolder(tmp_path), FlopCounter()],
    )
    trainer.fit(module)
    return json.loads((tmp_path / "metrics.json").read_text())


def test_flop_counter_writes_counts_and_ratios(tmp_path):
    module = _DistillLike()
    metrics = _fit(module, tmp_path)
    n_run = module.teacher.num_active
    teacher_params = sum(p.numel() for p in module.teacher.canonical_network_parameters())
    student_params = 3 * 8 + 8 + 8 * 4 + 4
    student_per_point = 3 * 8 + 8 * 4
    assert metrics["params/teacher"] == teacher_params
    assert metrics["params/student"] == student_params
    assert metrics["flops/teacher"] == 10_000 * TINY_PER_POINT
    assert metrics["flops_run/teacher"] == n_run * TINY_PER_POINT
    assert metrics["flops_per_frame/teacher/tracked"] == n_run * TINY_FRAME_PER_POINT
    assert metrics["flops/student"] == 10_000 * student_per_point
    assert metrics["flops_run/student"] == n_run * student_per_point
    assert "flops_per_frame/student/tracked" not in metrics  # no per-frame target given
    assert metrics["params_ratio"] == pytest.approx(student_params / teacher_params)
    assert metrics["flops_ratio"] == pytest.approx(student_per_point / TINY_PER_POINT)


def test_flop_counter_failure_is_a_warning_not_a_crash(tmp_path):
    module = _DistillLike(teacher_traceable=False)
    with pytest.warns(UserWarning, match="could not count the FLOPs of 'teacher'"):
        metrics = _fit(module, tmp_path)
    assert "flops/teacher" not in metrics and "flops_ratio" not in metrics
    assert metrics["flops/student"] == 10_000 * (3 * 8 + 8 * 4)
    assert metrics["params/teacher"] > 0 and "params_ratio" in metrics
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()  # the fit went on


def test_flop_counter_without_targets_warns(tmp_path):
    class Plain(_DistillLike):
        flop_targets = None

    with pytest.warns(UserWarning, match="no flop_targets"):
        metrics = _fit(Plain(), tmp_path)
    assert not any(k.startswith(("flops", "params")) for k in metrics)
