"""`make ablation` (benchmarks/ablation.py): the variants' flags, the table from fixed metrics, a real tiny run."""

from __future__ import annotations

import json

import pytest

from benchmarks.ablation import (
    VARIANTS,
    ablation_table,
    format_ablation,
    run_ablation,
    variant_args,
    write_readme,
)


def test_variant_flags():
    assert variant_args("full") == []
    assert variant_args("no_graph") == ["--model.init_args.loss_weights.graph=0"]
    (flag,) = variant_args("gcn_only")
    key, value = flag.split("=", 1)
    spec = json.loads(value)
    assert key == "--model.init_args.student" and spec["class_path"] == "models.student.Student"
    assert spec["init_args"]["branches"] == ["gcn"] and spec["init_args"]["latent_dim"] == 32  # distill.yaml's sizes kept
    assert "--model.init_args.warmup_steps=0" in variant_args("gt_only")  # the warm-up is teacher signal too
    with pytest.raises(ValueError, match="unknown variant 'pointnet'"):
        variant_args("pointnet")


def _write(run, metrics):
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_table_reads_every_column_from_the_runs(tmp_path):
    def runs(name, psnr, params):
        fit = _write(tmp_path / name, {"params/student": params, "flops/student": 2.5e6, "params/teacher": 9})
        val = _write(tmp_path / f"{name}-val", {"student/tracked/val/full/psnr": psnr,
                                                 "teacher/tracked/val/full/psnr": 30.0})
        test = _write(tmp_path / f"{name}-test", {"student/tracked/test/face/swd": 0.05,
                                                   "ms_per_frame/student/tracked": 7.25,
                                                   "ms_per_frame/teacher/tracked": 3.5})
        return {"fit": fit, "val": val, "test": test}

    result = ablation_table({"full": runs("full", 21.5, 1000), "gcn_only": runs("gcn_only", 20.25, 400)},
                            {"full": 12.0, "gcn_only": 4.0}, table_size=777)
    rows = result["rows"]
    assert list(rows) == ["teacher_table", "full", "gcn_only"]
    assert rows["teacher_table"]["params"] == 777 and rows["teacher_table"]["flops"] == 0
    assert rows["teacher_table"]["val/full/psnr"] == 30.0 and rows["teacher_table"]["ms_per_frame"] == 3.5
    assert rows["gcn_only"]["val/full/psnr"] == 20.25 and rows["gcn_only"]["params"] == 400
    assert rows["full"]["test/face/swd"] == 0.05 and rows["full"]["one_off_ms"] == 12.0
    assert rows["full"]["test/full/psnr"] is None  # never a substitute number
    text = format_ablation(result)
    assert "| `gcn_only` | GCN (EdgeConv) branch only | 400 | 2.5 M | 4.0 | 7.2 | 20.25 |" in text
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- ablation:begin -->\nold\n<!-- ablation:end -->\ntail\n")
    write_readme(readme, result)
    assert "old" not in readme.read_text() and "| `full` |" in readme.read_text() and readme.read_text().endswith("tail\n")


@pytest.mark.slow
@pytest.mark.timeout(1800)  # nine tiny CLI runs (fit, validate, test of three students): minutes on 2 cores
def test_tiny_ablation_runs_every_stage_and_writes_the_table(teacher_run, tmp_path):
    from lightning_modules.demo import _run_in_process

    variants = ["full", "gcn_only", "gt_only"]
    result = run_ablation(teacher_run / "checkpoints" / "last.ckpt", variants, tmp_path / "ablation", "tiny",
                          run=_run_in_process, log=lambda line: None)
    rows = result["rows"]
    assert list(rows) == ["teacher_table", *variants] and set(VARIANTS) >= set(variants)
    assert rows["gcn_only"]["params"] < rows["full"]["params"] and rows["gcn_only"]["flops"] < rows["full"]["flops"]
    for name in variants:
        assert isinstance(rows[name]["val/full/psnr"], float) and isinstance(rows[name]["test/face/ssim"], float)
        assert rows[name]["one_off_ms"] > 0 and isinstance(rows[name]["test/full/swd"], float)
    assert (tmp_path / "ablation" / "ablation.md").read_text().count("| `") == 4
    # --retime: every row timed again side by side; the quality columns stay as the runs wrote them
    from benchmarks.ablation import retime

    before = {name: dict(row) for name, row in rows.items()}
    retimed = retime(result, repeats=2, log=lambda line: None)["rows"]
    assert "side by side" in result["timing"] and retimed["teacher_table"]["one_off_ms"] == 0.0
    for name in ["teacher_table", *variants]:
        assert retimed[name]["ms_per_frame"] > 0
        assert {k: v for k, v in retimed[name].items() if "ms" not in k} == {
            k: v for k, v in before[name].items() if "ms" not in k}
