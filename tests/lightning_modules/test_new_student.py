"""A new student is one file and one config: the toy MLP student through distill -> GAR -> export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import EXPERIMENTS, REPO_ROOT, TINY_MESH, run_stage

TOY = REPO_ROOT / "tests" / "students" / "mlp_student.yaml"
TOY_CLASS = "tests.students.mlp_student.MLPStudent"

# tests/students/mlp_student.yaml: width 16, latent 8; E = 4 on the tiny head. Weight norm adds one
# gain per output of the shading MLP.
#   encoder 3->16, 16->8: 64 + 136; heads albedo, normal, offset 8->3: 3 x 27; blendshapes 8->12: 108;
#   shading (width 8, depth 1) 3->8, 8->3 with weight norm: (24 + 8 + 8) + (24 + 3 + 3)
TOY_PARAMS = 64 + 136 + 3 * 27 + 108 + 40 + 30


@pytest.mark.slow  # three stages and an ONNX export: about a minute on 2 cores
def test_the_toy_student_goes_through_distill_gar_and_export(teacher_run, tmp_path):
    from lightning_modules.export import load_datamodule, load_gar_module, main
    from lightning_modules.handoff import load_student
    from tests.lightning_modules.test_export import _session
    from tests.students.mlp_student import MLPStudent

    distill = tmp_path / "distill"
    run_stage(
        "fit", "--config", str(EXPERIMENTS / "distill.yaml"), "--config", str(TINY_MESH), "--config", str(TOY),
        "--model.init_args.teacher_ckpt", str(teacher_run / "checkpoints" / "last.ckpt"),
        "--model.init_args.warmup_steps=3", "--trainer.max_steps=2", "--run_dir", str(distill),
    )
    ckpt = torch.load(distill / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["student"]["class_path"] == TOY_CLASS
    assert ckpt["student"]["init_args"] == {"width": 16, "latent_dim": 8, "expression_dim": 4}
    metrics = json.loads((distill / "metrics.json").read_text())
    assert metrics["params/student"] == TOY_PARAMS  # counted by the stage, by hand here
    assert metrics["flops/student"] > 0 and isinstance(metrics["student/tracked/val/full/psnr"], float)
    student = load_student(distill / "checkpoints" / "last.ckpt")
    assert isinstance(student, MLPStudent) and student.num_points == ckpt["num_points"]

    gar = tmp_path / "gar"
    run_stage(
        "fit", "--config", str(EXPERIMENTS / "gar.yaml"), "--config", str(TINY_MESH),
        "--model.init_args.student_ckpt", str(distill / "checkpoints" / "last.ckpt"),
        "--trainer.max_steps=3", "--trainer.callbacks=[]", "--run_dir", str(gar),
    )
    module = load_gar_module(gar)
    assert isinstance(module.student, MLPStudent) and module.generator.feature_channels == 8
    session = _session(main([str(gar), str(tmp_path / "toy.onnx")]))
    batch = next(iter(load_datamodule(gar).test_dataloader()))
    from lightning_modules.export import ort_inputs

    with torch.no_grad():
        reference = module.render_meanz(batch)
    got = session.run(None, ort_inputs(batch, 0))[0]
    assert np.abs(got - reference[:1].numpy()).max() < 1e-4
