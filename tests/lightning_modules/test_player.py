"""The browser player (lightning_modules/player.py and its page, lightning_modules/player_page/) on the tiny GAR run.

The slow test opens the page in headless Chromium with ONNX Runtime Web (WASM, one thread: the
test server sends no COOP/COEP, like ``python -m http.server``) and compares its frame 0 with
PyTorch's render of the same codes. It needs ``chromium`` and ``npm`` (``make player-deps``): without
them it skips, except under CI (the environment variable ``CI`` set), where it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request

import numpy as np
import pytest
import torch

from lightning_modules.player import (
    PAGE_FILES,
    PlayerError,
    build_player,
    find_chromium,
    main,
    measure_in_chromium,
    serve,
    tracked_codes,
)

SIZE, EXPRESSION_DIM = 32, 4  # the tiny runs' (tiny_mesh.yaml)
#: Browser (WASM) against PyTorch on [0, 1] floats. Measured: 1.2e-7 to 1.8e-7 on the tiny run and on the
#: carphone runs at 128 x 128 (float32 round-off: the data-dependent rasterizer ops pick the same fragments).
TOLERANCE = 1e-3


def _codes(folder) -> dict:
    return json.loads((folder / "codes.json").read_text())


def _frame(codes: dict, driver: str, index: int) -> tuple[torch.Tensor, ...]:
    d = codes["drivers"][driver]
    return tuple(torch.tensor([d[key][index]], dtype=torch.float32) for key in ("expression", "world_mat", "K"))


@pytest.fixture(scope="module")
def player_dir(gar_run, tmp_path_factory):
    return build_player(gar_run, tmp_path_factory.mktemp("player") / "player")


def test_build_player_writes_the_graph_the_test_codes_and_the_page(gar_run, player_dir):
    import onnxruntime as ort

    from lightning_modules.export import frame_graph, load_datamodule, load_gar_module

    for name in ("avatar.onnx", "codes.json", *PAGE_FILES):
        assert (player_dir / name).is_file(), name
    assert '"onnxruntime-web": "1.31.1"' in (player_dir / "package.json").read_text()  # pinned, installed by npm
    codes = _codes(player_dir)
    assert codes["image_size"] == SIZE and codes["expression_dim"] == EXPRESSION_DIM
    assert list(codes["drivers"]) == ["test"]  # no driver given
    assert codes["run"] == {"run_dir": gar_run.as_posix(), "checkpoint": "best.ckpt"}  # the selected one, on val
    plan = codes["rasterizer"]  # planned on the run's frames (train, val, test: the test driver's among them)
    assert plan["name"] == "tiles" and plan["planned_frames"] == sum(load_datamodule(gar_run).split_sizes().values())
    assert all(c >= r for c, r in zip(plan["tile_capacity"], plan["tile_required"]))
    expected = tracked_codes(load_datamodule(gar_run))
    test = codes["drivers"]["test"]
    assert test["frames"] == len(expected["expression"]) == 2  # the tiny data's test views
    for key in ("expression", "world_mat", "K"):  # the decimals read back as the same float32
        np.testing.assert_array_equal(np.array(test[key], dtype=np.float32), expected[key])
    # the written graph renders those codes as PyTorch does (z: its default, the mean training z)
    module = load_gar_module(gar_run, "best.ckpt")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(player_dir / "avatar.onnx"), options, providers=["CPUExecutionProvider"])
    for i in range(test["frames"]):
        e, w, k = _frame(codes, "test", i)
        with torch.no_grad():
            ref = frame_graph(module)(e, w, k, module.z_mean[None]).numpy()
        got = session.run(None, {"expression": e.numpy(), "world_mat": w.numpy(), "K": k.numpy()})[0]
        assert got.shape == (1, 3, SIZE, SIZE) and ref.std() > 1e-3
        assert np.abs(got - ref).max() < 1e-4


def test_player_errors_are_one_line(gar_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/demo here
    with pytest.raises(SystemExit, match=r"^error: no GAR run at runs/demo/gar/latest: make it with `make demo`$"):
        main(["--driver", "none"])
    with pytest.raises(SystemExit, match=r"no GAR run at elsewhere: pass a GAR run folder with --run$"):
        main(["--run", "elsewhere", "--driver", "none"])
    with pytest.raises(SystemExit, match=r"driving video nope\.mp4 does not exist"):
        main(["--run", str(gar_run), "--driver", "nope.mp4"])
    with pytest.raises(PlayerError, match="max_frames must be >= 1, got 0"):
        build_player(gar_run, tmp_path / "out", max_frames=0)
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")
    with pytest.raises(PlayerError, match="reenactment needs a run trained on a prepared video; this run's data is "
                                          "MeshViewsDataModule"):
        build_player(gar_run, tmp_path / "out", driver=clip)
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are known to be good


def test_serve_collects_posted_results_and_sends_isolation_headers_on_request(tmp_path):
    (tmp_path / "index.html").write_text("<p>hi</p>")
    for isolated in (False, True):
        with serve(tmp_path, isolated=isolated) as (url, results):
            with urllib.request.urlopen(url + "index.html") as response:
                assert response.read() == b"<p>hi</p>"
                assert response.headers.get("Cross-Origin-Embedder-Policy") == ("require-corp" if isolated else None)
                assert response.headers.get("Cross-Origin-Opener-Policy") == ("same-origin" if isolated else None)
            request = urllib.request.Request(url + "result", data=b'{"ok": true, "fps": 3.5}', method="POST")
            with urllib.request.urlopen(request) as response:
                assert response.status == 204
            assert results.get(timeout=5) == {"ok": True, "fps": 3.5}


def _require(tool: str, found: bool) -> None:
    """Skip without ``tool``, unless under CI, where its absence is a failure (CI installs it)."""
    if found:
        return
    reason = f"{tool} is not installed (make player-deps installs it)"
    if os.environ.get("CI"):
        pytest.fail(f"CI: {reason}")
    pytest.skip(reason)


@pytest.mark.slow  # npm ci (seconds, from npm's cache) and a headless Chromium: about 15 s on 2 cores
def test_page_in_headless_chromium_renders_frame_0_like_pytorch(gar_run, player_dir, tmp_path):
    from lightning_modules.export import frame_graph, load_gar_module

    _require("chromium", find_chromium() is not None)
    _require("npm", shutil.which("npm") is not None)
    # what `make player` does: the pinned onnxruntime-web into the player folder
    subprocess.run(["npm", "ci", "--prefix", str(player_dir), "--ignore-scripts", "--no-audit", "--no-fund",
                    "--prefer-offline"], check=True, capture_output=True, timeout=300)
    result = measure_in_chromium(player_dir, runs=30, timeout=300)
    assert result["shape"] == [1, 3, SIZE, SIZE]
    assert result["threads"] == 1 and result["isolated"] is False  # no COOP/COEP: single-threaded WASM
    got = np.array(result["rgb"], dtype=np.float32).reshape(1, 3, SIZE, SIZE)
    module = load_gar_module(gar_run, "best.ckpt")  # the checkpoint the player shows
    e, w, k = _frame(_codes(player_dir), "test", 0)
    with torch.no_grad():
        ref = frame_graph(module)(e, w, k, module.z_mean[None]).numpy()
    error = float(np.abs(got - ref).max())
    summary = {"max_abs_error": error, "tolerance": TOLERANCE, "image_size": SIZE,
               **{key: result[key] for key in ("fps", "mean_ms", "median_ms", "first_ms", "runs", "threads")}}
    (tmp_path / "player_fps.json").write_text(json.dumps(summary, indent=1))
    print(f"browser player, tiny run ({SIZE}x{SIZE}): {result['fps']:.1f} frames/s (session.run "
          f"{result['mean_ms']:.1f} ms mean of {result['runs']}), max |browser - PyTorch| = {error:.2e}")
    assert ref.std() > 1e-3  # a picture, not a constant
    assert error <= TOLERANCE
    assert result["fps"] > 0 and result["mean_ms"] > 0
