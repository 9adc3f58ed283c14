"""The deployment table (lightning_modules/deploy.py, python -m benchmarks.deploy) on the tiny test runs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from lightning_modules.deploy import (
    DTYPES,
    FORMS,
    MARKER,
    DeployError,
    default_checkpoint,
    format_deployment_markdown,
    prepare_out_dir,
)

NETWORK_FORMS = ("teacher", "student", "student_gar")


@pytest.fixture(scope="module")
def deployed(teacher_run, distill_run, gar_run, tmp_path_factory):
    """The CLI run once on the three tiny runs: (table dict, out dir, JSON path)."""
    import torch

    from benchmarks.deploy import main

    root = tmp_path_factory.mktemp("deploy")
    out, json_path = root / "out", root / "table.json"
    threads = torch.get_num_threads()
    table = main([
        "--teacher", str(teacher_run / "checkpoints" / "last.ckpt"),
        "--student", str(distill_run / "checkpoints" / "last.ckpt"),
        "--gar", str(gar_run / "checkpoints" / "last.ckpt"),
        "--out", str(out), "--json", str(json_path), "--repeats", "2", "--threads", "1",
    ])
    assert table["threads"] == 1 and torch.get_num_threads() == threads  # restored after the timings
    return table, out, json_path


def test_bytes_are_the_sizes_of_the_files_written(deployed):
    table, out, json_path = deployed
    assert list(table["forms"]) == list(FORMS)
    for form in FORMS:
        entry = table["forms"][form]
        written = sorted(p.name for p in (out / form).iterdir())
        assert written == sorted(f"{form}.{dtype}.npz" for dtype in DTYPES)
        for dtype in DTYPES:
            path = out / form / f"{form}.{dtype}.npz"
            assert entry["files"][dtype] == str(path)
            assert entry["bytes"][dtype] == os.path.getsize(path) > 0
    assert (out / MARKER).is_file()
    assert json.loads(json_path.read_text()) == json.loads((out / "table.json").read_text())
    assert json.loads(json_path.read_text())["forms"]["student"]["bytes"] == table["forms"]["student"]["bytes"]


def test_float16_files_are_smaller_for_the_network_forms(deployed):
    forms = deployed[0]["forms"]
    for form in NETWORK_FORMS:
        assert forms[form]["bytes"]["float16"] < forms[form]["bytes"]["float32"], form
        assert forms[form]["float16_overflow"] == 0
    # the student network ships far fewer bytes than the teacher's; the GAR's generator adds to it
    assert forms["student"]["bytes"]["float32"] < forms["teacher"]["bytes"]["float32"] / 5
    assert forms["student_gar"]["bytes"]["float32"] > forms["student"]["bytes"]["float32"]


def test_files_hold_what_each_form_ships(deployed, teacher_run):
    import torch

    from lightning_modules.teacher import TeacherModule

    table, out, _ = deployed
    teacher = TeacherModule.load_from_checkpoint(str(teacher_run / "checkpoints" / "last.ckpt"), map_location="cpu").teacher
    n, e = teacher.num_active, teacher.expression_dim
    forms = table["forms"]
    # teacher: every canonical-network parameter, the active points and the radius, nothing else
    assert forms["teacher"]["params"] == sum(p.numel() for p in teacher.canonical_network_parameters())
    assert forms["teacher"]["numbers"] == forms["teacher"]["params"] + 3 * n + 1
    with np.load(out / "teacher_table" / "teacher_table.float32.npz") as data:
        assert data["blendshapes"].shape == (n, e, 3) and data["points"].shape == (n, 3)
        assert not any(name.startswith(("geometry.", "deformer.")) for name in data.files)  # no canonical network
        assert {"albedo", "normals", "offset", "radius"} <= set(data.files)
        assert np.array_equal(data["points"], teacher.active_points().detach().numpy())
    with np.load(out / "teacher_table" / "teacher_table.float16.npz") as data:
        assert data["albedo"].dtype == np.float16
    for dtype in DTYPES:  # the kNN / sampling indices: int32 in both files
        with np.load(out / "student" / f"student.{dtype}.npz") as data:
            assert data["graph_neighbors_0"].dtype == np.int32 and data["graph_sub_indices_1"].dtype == np.int32
            assert data["points"].dtype == np.dtype(dtype)
            assert data["graph_neighbors_0"].shape[0] == forms["student"]["num_points"]
    with np.load(out / "student_gar" / "student_gar.float32.npz") as data:
        assert data["z_mean"].dtype == np.float32 and "student.graph_neighbors_0" in data.files
        assert any(name.startswith("generator_ema.") for name in data.files)
    assert table["index_dtype"] == "int32"
    assert torch.is_tensor(teacher.radius)


def test_table_form_costs_nothing_once_and_the_teachers_frame(deployed):
    forms = deployed[0]["forms"]
    table, teacher = forms["teacher_table"], forms["teacher"]
    assert table["one_off"]["ms"] == 0 and table["one_off"]["flops"] == 0
    assert table["per_frame"]["flops"] == teacher["per_frame"]["flops"] > 0
    assert table["fidelity"]["float32"] == 0.0  # the table read back renders the teacher's frame exactly
    assert 0 < table["fidelity"]["float16"] < 0.05
    assert teacher["one_off"]["flops"] > forms["student"]["one_off"]["flops"] > 0
    assert forms["student_gar"]["one_off"] == {**forms["student"]["one_off"], "what": forms["student_gar"]["one_off"]["what"]}
    parts = forms["student"]["one_off"]["parts"]
    assert parts["knn_graph_flops"] is None and parts["knn_graph_ms"] > 0 and parts["canonical_forward_ms"] > 0
    assert forms["student_gar"]["per_frame"]["flops"] > forms["student"]["per_frame"]["flops"]
    for form in FORMS:
        assert forms[form]["per_frame"]["ms"] > 0


def test_one_off_flops_are_the_flop_targets_counts(deployed, distill_run):
    from lightning_modules.flops import student_flop_target
    from lightning_modules.handoff import load_student

    student = load_student(str(distill_run / "checkpoints" / "last.ckpt"))
    forms = deployed[0]["forms"]
    assert forms["student"]["one_off"]["flops"] == student_flop_target(student).canonical(student.num_points).total
    assert forms["student"]["per_frame"]["flops"] == student_flop_target(student).per_frame(student.num_points).total


def test_markdown_says_what_the_ratios_change(deployed):
    table = deployed[0]
    changes = {form: table["forms"][form]["changes_with_ratios"]["changes"] for form in FORMS}
    assert changes == {"teacher": False, "teacher_table": False, "student": True, "student_gar": True}
    ratios = table["ratios"]
    assert ratios["params"] < 0.05 and ratios["canonical_flops"] < 0.05
    text = format_deployment_markdown(table)
    assert text == (deployed[1] / "table.md").read_text()
    for form in FORMS:
        assert f"| {form} |" in text
    assert "change two figures only: the network bytes (teacher against student) and the one-off build cost" in text
    assert "They do not change the per-frame cost" in text and "ships no canonical network" in text
    assert "GAR run's datamodule" in table["camera"] and table["image_size"] == 32
    assert "int32" in text


def test_missing_checkpoint_is_one_line_naming_make_demo(tmp_path, capsys, teacher_run, distill_run):
    from benchmarks.deploy import main

    with pytest.raises(SystemExit) as err:
        main(["--runs", str(tmp_path / "runs")])
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no teacher checkpoint") and "`make demo`" in lines[0]
    assert not (tmp_path / "runs").exists()  # nothing written

    runs = tmp_path / "demo"  # teacher and distill there, the GAR missing
    for stage, run in (("teacher", teacher_run), ("distill", distill_run)):
        (runs / stage).mkdir(parents=True)
        (runs / stage / "latest").symlink_to(run)
    with pytest.raises(SystemExit) as err:
        main(["--runs", str(runs)])
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "no gar checkpoint" in lines[0] and "`make demo`" in lines[0]
    assert not (runs / "deploy").exists()


def test_default_checkpoint_prefers_best(tmp_path):
    folder = tmp_path / "teacher" / "latest" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "last.ckpt").write_bytes(b"x")
    assert default_checkpoint(tmp_path, "teacher") == folder / "last.ckpt"
    (folder / "best.ckpt").write_bytes(b"x")
    assert default_checkpoint(tmp_path, "teacher") == folder / "best.ckpt"
    with pytest.raises(DeployError, match="make demo"):
        default_checkpoint(tmp_path, "gar")


def test_never_writes_into_a_folder_it_did_not_make(tmp_path, capsys, deployed, teacher_run, distill_run, gar_run):
    from benchmarks.deploy import main

    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    args = ["--teacher", str(teacher_run / "checkpoints" / "last.ckpt"),
            "--student", str(distill_run / "checkpoints" / "last.ckpt"),
            "--gar", str(gar_run / "checkpoints" / "last.ckpt")]
    with pytest.raises(SystemExit) as err:
        main([*args, "--out", str(user)])
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "not made by" in lines[0]
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"] and (user / "notes.txt").read_text() == "keep"

    (tmp_path / "file").write_text("x")
    with pytest.raises(DeployError, match="not a folder"):
        prepare_out_dir(tmp_path / "file")
    assert prepare_out_dir(deployed[1]) == deployed[1]  # its own folder: may be written again
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (prepare_out_dir(empty) / MARKER).is_file()
    assert (prepare_out_dir(tmp_path / "new" / "out") / MARKER).is_file()
