"""The GAR stage on a real one-step student: frozen student, three phases, metrics with SWD, collapse signal."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_modules.gar import GARModule
from lightning_modules.handoff import load_student
from lightning_modules.metrics import composite_on_white
from tests.conftest import EXPERIMENTS, TINY_MESH, run_stage


def test_missing_student_is_one_line_naming_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        run_stage("fit", "--config", str(EXPERIMENTS / "gar.yaml"), "--config", str(TINY_MESH))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "lightning fit --config experiments/distill.yaml" in err and "runs/distill/latest" in err
    assert not (tmp_path / "runs").exists()


def test_gar_run_reports_tracked_rows_only(gar_run):
    """Inside a fit, val selects the checkpoint: only tracked rows (nothing looks at the frame)."""
    metrics = json.loads((gar_run / "metrics.json").read_text())
    for model in ("student", "gar"):
        for region in ("full", "face"):
            for metric in ("l1", "psnr", "ssim", "swd"):
                assert isinstance(metrics[f"{model}/tracked/val/{region}/{metric}"], float), (model, metric)
            assert metrics[f"{model}/tracked/val/{region}/lpips"] is None
    assert isinstance(metrics["baseline_nearest/tracked/val/full/psnr"], float)
    assert not any("/refined/" in key or key.startswith("gar_inverted/") for key in metrics)
    assert "gar/d_collapse" not in metrics  # a health signal: logged, not stored
    # D's accuracy and logit gap on train and val, E's code error and the divergence flag: in the CSV log
    import csv

    rows = list(csv.DictReader(open(gar_run / "csv" / "metrics.csv")))
    logged = {k: float(v) for r in rows for k, v in r.items() if v}
    for split in ("train", "val"):
        for key in ("d_accuracy", "d_accuracy_real", "d_accuracy_fake"):
            assert 0.0 <= logged[f"gar/{split}/{key}"] <= 1.0, (split, key)
        assert f"gar/{split}/d_logit_gap" in logged
    assert logged["gar/val/d_accuracy"] == pytest.approx(
        (logged["gar/val/d_accuracy_real"] + logged["gar/val/d_accuracy_fake"]) / 2)
    assert logged["gar/val/encoder_expression_mse"] >= 0 and logged["gar/diverged"] == 0.0
    ckpt = torch.load(gar_run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 3  # one batch = three optimizer steps (N, G+E, D)
    assert len(ckpt["optimizer_states"]) == 3
    assert any(k.startswith("generator_ema.") for k in ckpt["state_dict"])


def test_student_stays_frozen_and_bitwise_unchanged(distill_run, gar_run):
    reference = load_student(distill_run / "checkpoints" / "last.ckpt")
    module = GARModule.load_from_checkpoint(
        gar_run / "checkpoints" / "last.ckpt", student_ckpt=str(distill_run / "checkpoints" / "last.ckpt")
    )
    ckpt = torch.load(gar_run / "checkpoints" / "last.ckpt", weights_only=False)
    saved = {k[len("student."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("student.")}
    for name, value in reference.state_dict().items():
        assert torch.equal(value, saved[name]), name
    module.train()
    assert not module.student.training
    assert all(not p.requires_grad for p in module.student.parameters())


def test_toggling_optimizers_never_reenables_student_gradients(distill_run, tmp_path):
    """The known trap: toggle/untoggle_optimizer restore requires_grad of every optimizer's params."""
    cli = run_stage(
        "fit", "--config", str(EXPERIMENTS / "gar.yaml"), "--config", str(TINY_MESH),
        "--model.init_args.student_ckpt", str(distill_run / "checkpoints" / "last.ckpt"),
        "--trainer.max_steps=6", "--trainer.limit_val_batches=0", "--trainer.callbacks=[]",
        "--run_dir", str(tmp_path / "gar"),
    )
    module = cli.model
    assert all(not p.requires_grad for p in module.student.parameters())
    assert all(p.grad is None for p in module.student.parameters())
    optimised = {id(p) for opt in cli.trainer.optimizers for g in opt.param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in module.student.parameters()}
    assert all(p.requires_grad for p in module.generator.parameters())  # untoggled back


def test_gar_test_run_reports_per_frame_cost(distill_run, gar_run, tmp_path):
    """`lightning test` of a GAR checkpoint writes every row's cost: ms_per_frame/gar/tracked and
    flops_per_frame/gar/tracked (cross-checked against torch's FlopCounterMode on the generator and
    the deformation), and the refined rows' (their refinement steps included: far above tracked);
    params/gar_inverted counts G and E."""
    from lightning_modules.flops import flop_counter_macs

    student_ckpt = str(distill_run / "checkpoints" / "last.ckpt")
    run_dir = tmp_path / "gar_test"
    cli = run_stage(
        "test", "--config", str(EXPERIMENTS / "gar.yaml"), "--config", str(TINY_MESH),
        "--model.init_args.student_ckpt", student_ckpt,
        "--ckpt_path", str(gar_run / "checkpoints" / "last.ckpt"), "--run_dir", str(run_dir),
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["ms_per_frame/gar/tracked"] > 0
    module = cli.model
    for row in ("gar/refined", "gar_inverted/refined"):
        assert metrics[f"flops_per_frame/{row}"] > 5 * metrics["flops_per_frame/gar/tracked"], row
        assert metrics[f"ms_per_frame/{row}"] > 0
        assert isinstance(metrics[f"{row.split('/')[0]}/refined/test/full/psnr"], float)
    assert metrics["params/gar_inverted"] == metrics["params/gar"] + sum(p.numel() for p in module.encoder.parameters())
    # the feature ablation (validate/test only)
    for model in ("gar_zero_features", "gar_shuffled_features"):
        assert isinstance(metrics[f"{model}/tracked/test/full/psnr"], float), model
    # flicker needs consecutive frames: the tiny head's test views (3, 7) are not a sequence, so no
    # figure is made up (tests/lightning_modules/test_metrics.py scores a real sequence)
    frames = [int(f) for batch in cli.datamodule.test_dataloader() for f in batch.frame_index]
    assert frames == [3, 7] and not any(k.endswith("/flicker") for k in metrics)
    batch = next(iter(cli.datamodule.test_dataloader()))
    one = batch.head(1)
    with torch.no_grad():
        inputs = module.raster_inputs(one, one.expression)
    z = module.z_mean.expand(1, -1)
    reference = flop_counter_macs(module.generator_ema, (inputs.inputs, z, inputs.base)) + flop_counter_macs(
        module.student.deform, (module.student_canonical(), one.expression)
    )
    assert module.generator.residual  # experiments/gar.yaml: the student's colours are part of the path
    reference += flop_counter_macs(module.student.shade, (module.student_canonical(), one.world_mat))
    # fvcore and FlopCounterMode agree on convolutions and matmuls; element-wise work (counted by
    # neither) is all that separates them
    assert metrics["flops_per_frame/gar/tracked"] == pytest.approx(reference, rel=0.05)
    assert metrics["flops_per_frame/gar/tracked"] > 0



def test_inversion_refines_e_through_the_frozen_generator(gar_run, distill_run):
    """GAR's inversion (the `gar` row): from E's output, gradient steps on z and the expression lower
    the reconstruction loss of the frame, inside inference mode too, and touch no parameter."""
    from lightning_modules.export import load_datamodule, load_gar_module
    from lightning_modules.metrics import composite_on_white
    from models.losses import masked_l1, ssim_loss

    module = load_gar_module(gar_run)
    with torch.no_grad():  # after one step z and the codes barely matter: make both matter, as in a trained run
        g = torch.Generator().manual_seed(0)
        module.generator_ema.to_rgb.weight.normal_(0.0, 0.3, generator=g)
        module.student_blendshapes.normal_(0.0, 0.05, generator=g)
    batch = next(iter(load_datamodule(gar_run).val_dataloader()))
    target = composite_on_white(batch.image, batch.mask)
    before = {k: v.clone() for k, v in module.state_dict().items()}

    def loss(z, expression):
        fake = module.generate(module.generator_ema, module.raster_inputs(batch, expression), z)
        return float(masked_l1(fake, target) + module.loss_weights["ssim"] * ssim_loss(fake, target))

    with torch.inference_mode():
        z0, e0 = module.invert(batch, steps=0)
        z1, e1 = module.invert(batch, steps=15)
        start, end = loss(z0, e0), loss(z1, e1)
    z_e, e_e = module.encoder(target, batch.mask)
    # 0 steps: E's z, and the frame's tracked expression (invert_from_tracking, the default) ...
    assert torch.equal(z0, z_e.detach()) and torch.equal(e0, batch.expression)
    module.hparams.invert_from_tracking = False  # ... or E's own expression
    assert torch.equal(module.invert(batch, steps=0)[1], e_e.detach())
    module.hparams.invert_from_tracking = True
    assert end < start - 1e-4, (start, end)
    assert not torch.equal(e1, e0)
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in module.parameters())


def test_generator_from_features_alone_and_e_alone(distill_run, tmp_path):
    """residual=false (the paper's G, drawing from the features alone) and invert_steps=0 (the `gar`
    row from E as it is): a batch trains, validation scores every row, and no base image is made."""
    cli = run_stage(
        "fit", "--config", str(EXPERIMENTS / "gar.yaml"), "--config", str(TINY_MESH),
        "--model.init_args.student_ckpt", str(distill_run / "checkpoints" / "last.ckpt"),
        "--model.init_args.generator.residual=false", "--model.init_args.invert_steps=0",
        "--trainer.max_steps=3", "--trainer.callbacks=[]", "--run_dir", str(tmp_path / "gar"),
    )
    module = cli.model
    assert not module.generator.residual and not module.generator_ema.residual
    metrics = json.loads((tmp_path / "gar" / "metrics.json").read_text())
    assert all(isinstance(metrics[f"{m}/tracked/val/full/psnr"], float) for m in ("student", "gar"))
    batch = next(iter(cli.datamodule.val_dataloader()))
    with torch.no_grad():
        inputs = module.raster_inputs(batch, batch.expression)
        z, expression = module.invert(batch)
        e_z, e_expression = module.encoder(composite_on_white(batch.image, batch.mask), batch.mask)
    assert inputs.base is None and inputs.inputs[0].shape[1] == module.generator.in_channels
    assert torch.equal(z, e_z) and torch.equal(expression, batch.expression)  # E's z, the tracked code


def test_e_learns_no_geometry_through_the_residual_base(gar_run):
    """Phase G of a residual GAR: the reconstruction reaches E only through the generator's
    feature maps, never through logit(base) (whose slope near white/black derailed E). At init
    to_rgb is zero, so the reconstruction loss gives E's expression head exactly no gradient, while
    the base itself does depend on E's expression."""
    from lightning_modules.export import load_datamodule, load_gar_module
    from models.losses import masked_l1

    module = load_gar_module(gar_run)
    assert module.generator.residual
    module.hparams.geometry = "encoder"  # GAR's loop: E's expression poses the reconstruction
    with torch.no_grad():
        module.generator.to_rgb.weight.zero_()
        module.student_blendshapes.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(0))
    batch = next(iter(load_datamodule(gar_run).val_dataloader()))
    target = composite_on_white(batch.image, batch.mask)
    fake, _, expression, inputs = module.reconstruct(batch, target)
    assert inputs.base is not None and not inputs.base.requires_grad
    masked_l1(fake, target).backward()
    assert module.encoder.expression_head.weight.grad is None or module.encoder.expression_head.weight.grad.abs().max() == 0
    # the undetached base would have carried a gradient to the expression
    base = module.raster_inputs(batch, expression.detach().requires_grad_(True)).base
    assert base.requires_grad


def test_feature_ablation_zeroes_and_shuffles_exactly_what_g_sees(gar_run):
    """``gar_zero_features``: every scale's f_s channels are 0, the normal map, alpha and base are the
    real row's; ``gar_shuffled_features``: the student's codes, each on another point."""
    from lightning_modules.export import load_datamodule, load_gar_module

    module = load_gar_module(gar_run)
    batch = next(iter(load_datamodule(gar_run).val_dataloader()))
    c = module.student.latent_dim
    with torch.no_grad():
        real = module.raster_inputs(batch, batch.expression)
        zero = module.raster_inputs(batch, batch.expression, "zero")
    assert any(bool(x[:, :c].abs().max() > 0) for x in real.inputs)
    for x_real, x_zero in zip(real.inputs, zero.inputs):
        assert x_zero[:, :c].abs().max() == 0
        assert torch.equal(x_zero[:, c:], x_real[:, c:])  # normal map and alpha untouched
    assert torch.equal(zero.base, real.base)
    features, shuffled = module.point_features("real"), module.point_features("shuffled")
    assert not torch.equal(shuffled, features)
    assert torch.equal(shuffled, features[module.feature_shuffle])
    assert torch.equal(module.feature_shuffle.sort().values, torch.arange(module.student.num_points))
    with pytest.raises(ValueError, match="features must be one of"):
        module.point_features("noise")


def test_mean_z_replaces_e_z_with_the_stated_probability(gar_run):
    from lightning_modules.export import load_gar_module

    module = load_gar_module(gar_run)
    module.z_mean.fill_(7.0)
    z = torch.zeros(400, module.hparams.z_dim)
    module.hparams.z_mean_prob = 0.0
    assert module.training_z(z) is z
    module.hparams.z_mean_prob = 0.25
    mixed = module.training_z(z)
    rows_mean = (mixed == 7.0).all(1)
    assert torch.equal(rows_mean | (mixed == 0).all(1), torch.ones(400, dtype=torch.bool))  # whole rows
    assert 0.18 < rows_mean.float().mean() < 0.32
    assert torch.equal(module.training_z(z), mixed)  # seeded by (seed, batch): reproducible
    module.hparams.z_mean_prob = 1.0
    assert (module.training_z(z) == 7.0).all()


def test_a_fit_driven_into_divergence_is_flagged_and_not_the_tested_checkpoint(distill_run, tmp_path):
    """Two healthy epochs, then G's learning rate set absurdly high: the divergence guard warns,
    ``gar/diverged`` turns 1 in the logs, and the checkpoint the demo tests (best on val) is one
    from before the divergence, with a better val PSNR than the diverged last.ckpt."""
    import csv

    from lightning_modules.demo import selected_checkpoint

    run_dir = tmp_path / "gar"
    callback = '{"class_path": "tests.lightning_modules.toy.AbsurdLearningRate", "init_args": {"from_epoch": 2, "lr": 5.0}}'
    with pytest.warns(UserWarning, match="the GAR fit diverged"):
        run_stage(
            "fit", "--config", str(EXPERIMENTS / "gar.yaml"), "--config", str(TINY_MESH),
            "--model.init_args.student_ckpt", str(distill_run / "checkpoints" / "last.ckpt"),
            "--model.init_args.divergence_window=2", "--model.init_args.divergence_patience=1",
            "--trainer.max_steps=-1", "--trainer.max_epochs=3", "--trainer.limit_train_batches=2",
            "--trainer.val_check_interval=2", "--trainer.callbacks=[]", f"--trainer.callbacks+={callback}",
            "--run_dir", str(run_dir),
        )
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    flags = [float(r["gar/diverged"]) for r in rows if r.get("gar/diverged")]
    assert flags[0] == 0.0 and flags[-1] == 1.0
    best, last = (torch.load(run_dir / "checkpoints" / n, weights_only=False) for n in ("best.ckpt", "last.ckpt"))
    assert selected_checkpoint(run_dir) == run_dir / "checkpoints" / "best.ckpt"
    assert best["epoch"] < 2 <= last["epoch"]
    assert last["divergence_guard"]["diverged_at"] is not None and best["divergence_guard"]["diverged_at"] is None
    psnr = [float(r["gar/tracked/val/full/psnr"]) for r in rows if r.get("gar/tracked/val/full/psnr")]
    assert max(psnr[:2]) > psnr[-1] + 1.0, psnr


def test_tracked_geometry_cuts_e_expression_out_of_the_reconstruction(gar_run):
    """geometry="tracked" (the cure for the divergence through E's expression): G's reconstruction is
    posed by the tracked code, so the reconstruction loss gives E's expression head exactly no
    gradient even with a trained-looking G, while E's z head still learns from it; with
    geometry="encoder" the same loss reaches the expression head."""
    from lightning_modules.export import load_datamodule, load_gar_module
    from models.losses import masked_l1

    module = load_gar_module(gar_run)
    with torch.no_grad():
        module.generator.to_rgb.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(0))
        module.student_blendshapes.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(1))
    batch = next(iter(load_datamodule(gar_run).val_dataloader()))
    target = composite_on_white(batch.image, batch.mask)
    grads = {}
    for geometry in ("tracked", "encoder"):
        module.hparams.geometry = geometry
        module.zero_grad(set_to_none=True)
        fake, _, _, inputs = module.reconstruct(batch, target)
        masked_l1(fake, target).backward()
        head = module.encoder.expression_head.weight.grad
        grads[geometry] = 0.0 if head is None else float(head.abs().max())
        assert module.encoder.z_head.weight.grad.abs().max() > 0, geometry
    assert grads["tracked"] == 0.0 and grads["encoder"] > 0, grads


def test_gar_errors_benchmark_splits_the_error_and_matches_the_stage(gar_run, capsys):
    """benchmarks/gar_errors.py on the run's first val batch: the three regions add up to each row's
    MSE, and the student's and the GAR's PSNR are the fit's own val figures (same frames, same renders)."""
    from benchmarks.gar_errors import ROWS, main

    metrics = json.loads((gar_run / "metrics.json").read_text())
    batch_size = 2  # experiments/overrides/tiny_mesh.yaml; its validation scores one batch
    result = main(["--run", str(gar_run), "--ckpt", "last", "--split", "val", "--max-frames", str(batch_size)])
    assert result["frames"] == batch_size
    for row in ROWS:
        d = result[row]
        assert d["mse_interior"] + d["mse_band"] + d["mse_outside"] == pytest.approx(d["mse"], rel=1e-5)
    for row in ("student", "gar"):
        assert result[row]["psnr"] == pytest.approx(metrics[f"{row}/tracked/val/full/psnr"], abs=1e-3)
        assert result[row]["psnr_gt_mask"] == pytest.approx(metrics[f"{row}/tracked/val/face/psnr"], abs=1e-3)
    assert "| gar_zero_features |" in capsys.readouterr().out


def test_a_checkpoint_trained_with_another_activation_gain_is_refused_in_one_line(gar_run, distill_run, tmp_path):
    """activation_gain and residual_space shape G's output but not its weights: a checkpoint made
    before them (no such init arg: gain 1.0, logit residual) loads as it was trained, and a config
    that asks for another value is refused with the flag to pass."""
    ckpt = torch.load(gar_run / "checkpoints" / "last.ckpt", weights_only=False)
    spec = ckpt["hyper_parameters"]["generator"]
    assert spec["init_args"]["activation_gain"] == 1.0  # experiments/gar.yaml
    old_spec = {**spec, "init_args": {k: v for k, v in spec["init_args"].items()
                                      if k not in ("activation_gain", "residual_space")}}
    old = dict(ckpt, hyper_parameters={**ckpt["hyper_parameters"], "generator": old_spec})
    torch.save(old, tmp_path / "old.ckpt")
    student = str(distill_run / "checkpoints" / "last.ckpt")
    module = GARModule.load_from_checkpoint(tmp_path / "old.ckpt", student_ckpt=student)
    assert module.generator.encoder[0].gain == 1.0 and module.generator.residual_space == "logit"
    # `lightning test --config experiments/gar.yaml --ckpt_path old.ckpt`: the config's module, then the
    # trainer hands it the checkpoint (on_load_checkpoint) before loading the weights
    init_args = {k: v for k, v in old["hyper_parameters"].items() if not k.startswith("_")}
    configured = GARModule(**{**init_args, "student_ckpt": student, "generator": {**old_spec, "activation_gain": 2 ** 0.5}})
    with pytest.raises(ValueError, match=r"trained with activation_gain=1.0, not 1.41.*--model.init_args.generator.activation_gain=1.0"):
        configured.on_load_checkpoint(old)
    # a run fitted with the flag form (--model.init_args.generator.activation_gain=1.4142: a key beside
    # class_path) trained with that gain: a gain-1.0 module refuses it, naming the gain it was trained with
    flagged = dict(ckpt, hyper_parameters={**ckpt["hyper_parameters"], "generator": {**spec, "activation_gain": 2 ** 0.5}})
    with pytest.raises(ValueError, match=r"trained with activation_gain=1.41.*, not 1.0"):
        module.on_load_checkpoint(flagged)
    # residual changes G's output, not its weights: a residual checkpoint is refused by a non-residual G
    plain = GARModule(**{**init_args, "student_ckpt": student, "generator": {**spec, "residual": False}})
    with pytest.raises(ValueError, match=r"trained with residual=True, not False"):
        plain.on_load_checkpoint(ckpt)
    # so does the input pyramid: a checkpoint from before it was rasterized at every scale
    pooled = GARModule(**{**init_args, "student_ckpt": student, "generator": {**spec, "input_pyramid": "pooled"}})
    with pytest.raises(ValueError, match=r"trained with input_pyramid='rasterized', not 'pooled'"):
        pooled.on_load_checkpoint(ckpt)


def _earlier_layout(checkpoint: dict) -> dict:
    """``checkpoint`` as the layout before G, D and E had class paths wrote it: their sizes flat among the stage's args."""
    hparams = dict(checkpoint["hyper_parameters"])
    generator, disc, encoder = (hparams.pop(k)["init_args"] for k in ("generator", "discriminator", "encoder"))
    hparams.update({k: v for k, v in generator.items() if k not in ("feature_channels", "z_dim")})
    hparams.update(disc_channels=disc["base_channels"], disc_scales=disc["num_scales"],
                   encoder_channels=encoder["base_channels"])
    return dict(checkpoint, hyper_parameters=hparams)


def test_a_gar_checkpoint_of_the_earlier_layout_loads_with_its_own_sizes(gar_run, distill_run, tmp_path):
    """A checkpoint with flat generator sizes (base_channels, num_scales, ..., disc_channels, encoder_channels)
    builds G, D and E with those sizes, through ``load_from_checkpoint`` and through ``lightning test
    --ckpt_path`` (the CLI reads them into the networks' entries), and scores as the current layout does."""
    ckpt = torch.load(gar_run / "checkpoints" / "last.ckpt", weights_only=False)
    old = _earlier_layout(ckpt)
    old["hyper_parameters"].update(base_channels=8, num_scales=2, disc_channels=8, disc_scales=1, encoder_channels=8)
    module = GARModule(**{k: v for k, v in GARModule.upgrade_hparams(old["hyper_parameters"]).items()
                          if not k.startswith("_")})  # the small networks the old checkpoint describes
    networks = ("generator", "generator_ema", "discriminator", "encoder")
    old["state_dict"] = {**{k: v for k, v in old["state_dict"].items() if k.split(".")[0] not in networks},
                         **{k: v for k, v in module.state_dict().items() if k.split(".")[0] in networks}}
    torch.save(old, tmp_path / "old.ckpt")
    loaded = GARModule.load_from_checkpoint(tmp_path / "old.ckpt")
    assert loaded.generator.num_scales == 2 and loaded.discriminator.num_scales == 1
    assert loaded.generator.spec["init_args"]["base_channels"] == 8 and loaded.encoder.spec["init_args"]["base_channels"] == 8
    assert sum(p.numel() for p in loaded.generator.parameters()) == sum(p.numel() for p in module.generator.parameters())
    cli = run_stage("test", "--config", str(EXPERIMENTS / "gar.yaml"), "--config", str(TINY_MESH),
                    "--ckpt_path", str(tmp_path / "old.ckpt"), "--run_dir", str(tmp_path / "old-test"))
    assert cli.model.generator.num_scales == 2 and cli.model.discriminator.num_scales == 1
    metrics = json.loads((tmp_path / "old-test" / "metrics.json").read_text())
    assert metrics["params/gar"] == sum(p.numel() for p in module.generator.parameters())
