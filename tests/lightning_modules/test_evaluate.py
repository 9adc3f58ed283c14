"""benchmarks/evaluate.py: one table per subject and their mean, every number from the reports."""

from __future__ import annotations

import json

import pytest

from benchmarks.evaluate import COLUMNS, main, mean_over_subjects, run_evaluation, subject_name, write_readme


def _report(psnr: float, swd: float | None) -> dict:
    def cells(value):
        return {region: {"l1": 0.1, "psnr": value, "ssim": 0.9, "swd": swd} for region in ("full", "face")}

    rows = {
        "baseline_nearest/tracked": {"model": "baseline_nearest", "protocol": "tracked", "val": cells(psnr - 1),
                                     "test": cells(psnr - 1)},
        "student/tracked": {"model": "student", "protocol": "tracked", "val": cells(psnr), "test": cells(psnr)},
        "student/refined": {"model": "student", "protocol": "refined", "val": cells(psnr + 2), "test": cells(psnr + 2)},
    }
    return {"rows": rows, "splits": {"train": 84, "val": 12, "test": 24}}


def test_mean_over_subjects_needs_every_subject():
    reports = {"a": _report(20.0, 0.04), "b": _report(24.0, None)}
    mean = mean_over_subjects(reports)
    assert mean["student/tracked"]["test/full/psnr"] == 22.0
    assert mean["student/refined"]["val/face/psnr"] == 24.0
    assert mean["student/tracked"]["test/full/swd"] is None  # b has no SWD: no mean of one subject
    assert set(mean["student/tracked"]) == {"/".join(c) for c in COLUMNS}


def test_run_evaluation_writes_the_tables(tmp_path):
    calls = []

    def fake_demo(out, video=None, overrides="cpu_demo"):
        calls.append((out, video, overrides))
        return _report(20.0 if video is None else 26.0, 0.05)

    result = run_evaluation([None, "clips/akiyo_cif.mp4"], tmp_path / "eval", run=fake_demo, log=lambda line: None)
    assert [c[0].name for c in calls] == ["carphone", "akiyo_cif"]
    assert json.loads((tmp_path / "eval" / "eval.json").read_text()) == result
    md = (tmp_path / "eval" / "eval.md").read_text()
    assert "## Mean over 2 subject(s)" in md and "## carphone" in md and "## akiyo_cif" in md
    mean_line = next(line for line in md.splitlines() if line.startswith("| student/tracked |"))
    assert mean_line.split("|")[4].strip() == "23.00"  # test full PSNR: (20 + 26) / 2
    assert "| student/refined (looks at the frame) |" in md
    assert "Frames: train 84, val 12, test 24" in md
    assert "student (20.00 dB) beats both baselines." not in md  # no baseline_mean row: no verdict invented
    with pytest.raises(ValueError, match="share a subject name"):
        run_evaluation([None, "x/carphone.mp4"], tmp_path / "again", run=fake_demo)


def test_subject_names_and_cli_errors(tmp_path, capsys):
    assert subject_name(None) == "carphone" and subject_name("a/b/akiyo_cif.mp4") == "akiyo_cif"
    assert main(["--video", str(tmp_path / "missing.mp4"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evaluate: error: video") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_readme_block_is_replaced_and_nothing_else(tmp_path, capsys):
    result = run_evaluation([None], tmp_path / "eval", run=lambda out, video=None, overrides="": _report(21.0, 0.05),
                            log=lambda line: None)
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nbefore\n<!-- results:begin -->\nold\n<!-- results:end -->\nafter\n")
    write_readme(readme, result)
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n<!-- results:begin -->") and text.endswith("<!-- results:end -->\nafter\n")
    assert "old" not in text and "| student/tracked |" in text and "## carphone" in text
    assert main(["--out", str(tmp_path / "eval"), "--write-readme", str(readme)]) == 0
    (tmp_path / "plain.md").write_text("no block\n")
    assert main(["--out", str(tmp_path / "eval"), "--write-readme", str(tmp_path / "plain.md")]) == 2
    assert "no <!-- results:begin -->" in capsys.readouterr().err
    assert (tmp_path / "plain.md").read_text() == "no block\n"


def test_the_teachers_diagnosis_reaches_eval_md(tmp_path):
    """Each subject's teacher diagnosis (train-frame fit, test mouth r) is one line of eval.md, its
    command included; a subject without one gets no line."""
    diagnoses = iter([
        {"command": "python -m benchmarks.teacher_errors --run R --ckpt best --no-refined", "train_full_psnr": 25.5,
         "train_face_psnr": 27.25, "train_fitted_face_psnr": None, "mouth_r": 0.734, "mouth_pairs": 23,
         "mouth_target_r": 0.6},
        None,
    ])
    result = run_evaluation([None, "clips/akiyo_cif.mp4"], tmp_path / "eval",
                            run=lambda out, video=None, overrides="": _report(20.0, 0.05), log=lambda line: None,
                            diagnose=lambda report: next(diagnoses))
    md = (tmp_path / "eval" / "eval.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("- teacher on its training frames"))
    assert line == ("- teacher on its training frames: face 27.25 dB, full 25.50 dB; test mouth-opening r 0.73 over "
                    "23 frames (target >= 0.6); `python -m benchmarks.teacher_errors --run R --ckpt best --no-refined`.")
    assert md.count("teacher on its training frames") == 1
    assert result["diagnosis"]["akiyo_cif"] is None
