"""The browser player (``make player``; ``python -m lightning_modules.player [--run RUN] [--out player]
[--driver VIDEO]``): a GAR avatar played by ONNX Runtime Web in a static page.

:func:`build_player` writes into ``OUT`` (default ``player/``, git-ignored):

- ``avatar.onnx``: the run's per-frame graph (:mod:`lightning_modules.export`: expression, world_mat
  and K in, rgb out; z left at its default, the mean training z), its tile rasterizer planned on every
  frame of the run and every frame the page plays (``codes.json``'s ``rasterizer`` says the plan);
- ``codes.json``: the inputs of every frame the page plays, per driver (:func:`codes_document`):
  ``"test"``, the test frames' tracked codes, and ``"reenact"``, the codes and retargeted poses of a
  driving video (:mod:`datamodules.driving`, as ``lightning predict --data.init_args.driving_video``
  computes them), at most ``max_frames`` each;
- the page, copied from ``lightning_modules/player_page/``: ``index.html``, ``player.js`` and the
  ``package.json`` / ``package-lock.json`` that pin ``onnxruntime-web``. ``make player`` installs
  that package into ``OUT/node_modules`` with ``npm ci``; the page loads it from there (never from a
  CDN).

The page runs ONNX Runtime Web's WASM backend, single-threaded unless the server sends the
cross-origin isolation headers (COOP/COEP; ``python -m http.server`` does not), then with up to 4
threads. It plays a driver at its video's frame rate at most, shows the frames/s of
``session.run`` (mean of the last 30 frames), and has a frame slider and a driver select. With
``?test=1`` it renders frame 0 of the ``test`` driver, times ``runs`` more frames, and writes the
frame's RGB floats and the timing as JSON into ``#test-result`` (also POSTed to ``report``, when
given): what :func:`measure_in_chromium` (``--measure``) and ``tests/lightning_modules/test_player.py``
read.

Only ``--measure`` needs Chromium; building the folder needs neither Chromium nor npm.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lightning_modules.export import (
    ExportError,
    export_graph,
    frame_graph,
    load_datamodule,
    load_gar_module,
    planning_frames,
    run_checkpoint,
)
from lightning_modules.handoff import UpstreamChangedError
from lightning_modules.run_folder import UpstreamMissingError

__all__ = [
    "DEFAULT_DRIVER",
    "DEFAULT_RUN",
    "MAX_FRAMES",
    "ORT_WEB_VERSION",
    "PAGE_DIR",
    "PAGE_FILES",
    "PlayerError",
    "build_player",
    "codes_document",
    "find_chromium",
    "main",
    "measure_in_chromium",
    "driving_codes",
    "selected_checkpoint",
    "serve",
    "tracked_codes",
]

#: The demo's GAR run (``make demo``).
DEFAULT_RUN = Path("runs") / "demo" / "gar" / "latest"
#: The default driving video, used when present.
DEFAULT_DRIVER = Path("..") / "shared" / "data" / "videos" / "akiyo_cif.mp4"
#: Frames per driver in codes.json (120 frames of E=32 codes: about 60 kB).
MAX_FRAMES = 120
#: The static page, copied into the output folder.
PAGE_DIR = Path(__file__).with_name("player_page")
PAGE_FILES = ("index.html", "player.js", "package.json", "package-lock.json")
#: The onnxruntime-web version pinned in player_page/package.json.
ORT_WEB_VERSION = "1.31.1"
ONNX_NAME, CODES_NAME = "avatar.onnx", "codes.json"
ORT_WEB_DIST = Path("node_modules") / "onnxruntime-web" / "dist"


class PlayerError(ValueError):
    """A player that cannot be built or measured (no run, a run without reenactment, no Chromium); one line."""


# -- the frames ----------------------------------------------------------------------------------


def selected_checkpoint(run_dir: str | Path) -> str:
    """The checkpoint the player shows: ``best.ckpt`` (the demo's selection, on val) when the run has
    one, else ``last.ckpt``.

    Raises:
        ExportError: when the run folder or both checkpoints are missing.
    """
    if (Path(run_dir) / "checkpoints" / "best.ckpt").is_file():
        return "best.ckpt"
    run_checkpoint(run_dir, "last.ckpt")  # raises the one-line error when missing
    return "last.ckpt"


def tracked_codes(datamodule, max_frames: int = MAX_FRAMES) -> dict[str, np.ndarray]:
    """The test frames' tracked codes, as the run's datamodule serves them (the ``gar/tracked`` row).

    Args:
        datamodule: a set-up datamodule of the run (:func:`lightning_modules.export.load_datamodule`).
        max_frames: keep the first ``max_frames`` test frames.

    Returns:
        {"expression": (T, E), "world_mat": (T, 3, 4), "K": (T, 3, 3)} float32, T <= max_frames.

    Raises:
        PlayerError: when the run has no test frame.
    """
    parts: dict[str, list[np.ndarray]] = {"expression": [], "world_mat": [], "K": []}
    count = 0
    for batch in datamodule.test_dataloader():
        parts["expression"].append(batch.expression.float().numpy())
        parts["world_mat"].append(batch.world_mat[:, :3].float().numpy())
        parts["K"].append(batch.K.float().numpy())
        count += len(batch)
        if count >= max_frames:
            break
    if count == 0:
        raise PlayerError("the run's datamodule serves no test frame")
    return {k: np.concatenate(v)[:max_frames].astype(np.float32) for k, v in parts.items()}


def driving_codes(datamodule, video: str | Path, max_frames: int = MAX_FRAMES) -> dict[str, Any]:
    """Codes and poses that make the run's subject follow ``video`` (:func:`datamodules.driving.driving_sequence`).

    The video is tracked once into ``<data_root>/<stem>_driving/`` (:func:`datamodules.driving.prepare_driver`,
    MediaPipe), exactly as ``lightning predict --data.init_args.driving_video`` does; K is the
    subject's crop intrinsics.

    Args:
        datamodule: the run's set-up :class:`~datamodules.avatar.AvatarDataModule`.
        video: the driving video.
        max_frames: keep its first ``max_frames`` frames.

    Returns:
        {"expression": (T, E), "world_mat": (T, 3, 4), "K": (T, 3, 3)} float32 and "fps" (float, 0.0
        when the video has no rate), T <= max_frames.

    Raises:
        PlayerError: when the video is missing or the run's data is not a prepared video (e.g. the
            generated tiny head: no expression basis to project a driver onto).
    """
    from datamodules.driving import driving_dataset_name, driving_sequence, prepare_driver

    video = Path(video)
    if not video.is_file():
        raise PlayerError(f"driving video {video} does not exist (pass --driver VIDEO, or --driver none)")
    if not hasattr(datamodule, "dataset_dir") or getattr(datamodule, "train_set", None) is None:
        raise PlayerError(f"reenactment needs a run trained on a prepared video; this run's data is "
                          f"{type(datamodule).__name__} (pass --driver none)")
    driver_dir = prepare_driver(video, datamodule.data_root / driving_dataset_name(video), fov=datamodule.fov,
                                progress=False)
    seq = driving_sequence(datamodule.dataset_dir, driver_dir, datamodule.train_set.world_mats.double().numpy())
    n = min(len(seq), max_frames)
    return {
        "expression": seq.expressions[:n].astype(np.float32),
        "world_mat": seq.world_mats[:n].astype(np.float32),
        "K": np.broadcast_to(datamodule.K.float().numpy(), (n, 3, 3)).astype(np.float32),
        "fps": float(seq.fps),
    }


def _float32_list(array: np.ndarray) -> list:
    """A float32 array as nested lists of the shortest decimals that read back as the same float32."""
    array = np.asarray(array, dtype=np.float32)
    flat = [float(np.format_float_positional(v, unique=True, trim="-")) for v in array.ravel()]
    return np.array(flat, dtype=object).reshape(array.shape).tolist()


def codes_document(image_size: int, expression_dim: int, drivers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """codes.json: what the page plays.

    Args:
        image_size: S, the graph's output side.
        expression_dim: E.
        drivers: name -> {"label": str, "fps": float (0: unknown), "expression": (T, E), "world_mat":
            (T, 3, 4), "K": (T, 3, 3)} (arrays float32).

    Returns:
        {"image_size", "expression_dim", "drivers": {name: {"label", "fps", "frames", "expression",
        "world_mat", "K"}}}, the arrays as nested lists whose decimals read back as the same float32.

    Raises:
        PlayerError: on arrays of the wrong shape.
    """
    out: dict[str, Any] = {"image_size": int(image_size), "expression_dim": int(expression_dim), "drivers": {}}
    for name, d in drivers.items():
        e, w, k = (np.asarray(d[key], dtype=np.float32) for key in ("expression", "world_mat", "K"))
        t = len(e)
        if t == 0 or e.shape != (t, expression_dim) or w.shape != (t, 3, 4) or k.shape != (t, 3, 3):
            raise PlayerError(f"driver {name!r}: need expression (T>0, {expression_dim}), world_mat (T, 3, 4), "
                              f"K (T, 3, 3); got {e.shape}, {w.shape}, {k.shape}")
        out["drivers"][name] = {"label": str(d.get("label", name)), "fps": float(d.get("fps") or 0.0), "frames": t,
                                "expression": _float32_list(e), "world_mat": _float32_list(w), "K": _float32_list(k)}
    return out


def build_player(run_dir: str | Path = DEFAULT_RUN, out: str | Path = "player", driver: str | Path | None = None,
                 max_frames: int = MAX_FRAMES, checkpoint: str | None = None) -> Path:
    """Write the player folder: avatar.onnx, codes.json and the page (module docstring).

    Args:
        run_dir: a GAR run folder (default the demo's, ``runs/demo/gar/latest``).
        out: the folder to write (created; existing files of the same names are replaced, its
            ``node_modules`` is kept).
        driver: a driving video for the "reenact" driver; None: the test frames only.
        max_frames: frames per driver (>= 1).
        checkpoint: ``checkpoints/<name>`` to show; None: :func:`selected_checkpoint`.

    Returns:
        ``out`` as a Path.

    Raises:
        PlayerError: ``max_frames < 1``, a missing default run (names ``make demo``), a missing
            driving video, or a run whose data cannot be reenacted.
        ExportError: not a GAR run, or no checkpoint.
        UpstreamMissingError: the run's student checkpoint is gone.
    """
    if max_frames < 1:
        raise PlayerError(f"max_frames must be >= 1, got {max_frames}")
    run_dir, out = Path(run_dir), Path(out)
    if not run_dir.exists():
        hint = "make it with `make demo`" if run_dir == DEFAULT_RUN else "pass a GAR run folder with --run"
        raise PlayerError(f"no GAR run at {run_dir}: {hint}")
    if driver is not None and not Path(driver).is_file():
        raise PlayerError(f"driving video {driver} does not exist (pass --driver VIDEO, or --driver none)")
    checkpoint = checkpoint or selected_checkpoint(run_dir)
    module = load_gar_module(run_dir, checkpoint)
    datamodule = load_datamodule(run_dir)
    drivers: dict[str, dict[str, Any]] = {}
    record = getattr(datamodule, "record", None)
    fps = float((record.meta.get("fps") if record is not None else None) or 0.0)
    drivers["test"] = {"label": "test frames (tracked codes)", "fps": fps, **tracked_codes(datamodule, max_frames)}
    if driver is not None:
        drivers["reenact"] = {"label": f"reenactment: {Path(driver).stem}", **driving_codes(datamodule, driver,
                                                                                               max_frames)}
    # the tile rasterizer planned on every frame of the run and every frame the page plays (the "test"
    # driver's are the run's test frames, already among them)
    graph = frame_graph(module, planning_frames(datamodule, *((d["expression"], d["world_mat"], d["K"])
                                                                 for name, d in drivers.items() if name != "test")))
    out.mkdir(parents=True, exist_ok=True)
    export_graph(graph, module.z_mean, out / ONNX_NAME)
    document = codes_document(graph.image_size, graph.expression_dim, drivers)
    document["run"] = {"run_dir": run_dir.as_posix(), "checkpoint": checkpoint}
    document["rasterizer"] = {"name": "tiles", "tile_capacity": graph.tile_capacity,
                              "tile_required": graph.tile_required, "planned_frames": graph.tile_planned_frames}
    (out / CODES_NAME).write_text(json.dumps(document, separators=(",", ":")))
    for name in PAGE_FILES:
        shutil.copyfile(PAGE_DIR / name, out / name)
    return out


# -- measuring the page in headless Chromium -----------------------------------------------------


def find_chromium() -> str | None:
    """The Chromium executable: ``$CHROMIUM``, else ``chromium``, ``chromium-browser`` or ``google-chrome`` on PATH."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@contextlib.contextmanager
def serve(folder: str | Path, isolated: bool = False) -> Iterator[tuple[str, queue.Queue]]:
    """Serve ``folder`` over HTTP on a free local port in a thread; POSTs to ``/result`` are collected.

    Args:
        folder: the player folder.
        isolated: send the cross-origin isolation headers (COOP ``same-origin``, COEP
            ``require-corp``), which let the page run ONNX Runtime Web with several threads.

    Yields:
        (the base URL ``http://127.0.0.1:<port>/``, a queue receiving each POSTed JSON body).
    """
    results: queue.Queue = queue.Queue()
    directory = str(folder)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=directory, **kwargs)

        def end_headers(self) -> None:
            self.send_header("Cache-Control", "no-store")
            if isolated:
                self.send_header("Cross-Origin-Opener-Policy", "same-origin")
                self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            super().end_headers()

        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                results.put(json.loads(body))
            except ValueError:
                results.put({"ok": False, "error": f"unreadable result ({len(body)} bytes)"})
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", results
    finally:
        server.shutdown()
        server.server_close()


def measure_in_chromium(folder: str | Path, runs: int = 30, isolated: bool = False,
                        timeout: float = 300.0) -> dict[str, Any]:
    """Open the player folder's test mode (``index.html?test=1``) in headless Chromium and return its result.

    Args:
        folder: a folder made by :func:`build_player` with ``node_modules/onnxruntime-web`` installed.
        runs: frames timed after frame 0 (cycling through the test frames).
        isolated: serve with COOP/COEP (multi-threaded WASM); False: single-threaded, as under
            ``python -m http.server``.
        timeout: seconds to wait for the page's result.

    Returns:
        the page's JSON: {"ok": True, "shape": [1, 3, S, S], "rgb": S*S*3 floats (frame 0, channel-major),
        "fps": frames/s of session.run (1000 / mean ms), "mean_ms", "median_ms", "first_ms" (frame 0,
        the first run), "runs", "threads", "isolated"}.

    Raises:
        PlayerError: no Chromium, onnxruntime-web not installed in ``folder``, no result within
            ``timeout``, or the page reported an error.
    """
    folder = Path(folder)
    chromium = find_chromium()
    if chromium is None:
        raise PlayerError("measuring needs Chromium, which is not installed (apt-get install -y chromium)")
    if not (folder / ORT_WEB_DIST / "ort.wasm.min.js").is_file():
        raise PlayerError(f"{folder} has no {ORT_WEB_DIST.as_posix()}: run `npm ci --prefix {folder}` "
                          "(or `make player`)")
    with serve(folder, isolated) as (url, results), tempfile.TemporaryDirectory() as profile:
        page = f"{url}index.html?test=1&runs={int(runs)}&report=/result"
        cmd = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--no-default-browser-check", f"--user-data-dir={profile}", page]
        browser = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            result = results.get(timeout=timeout)
        except queue.Empty:
            raise PlayerError(f"the page sent no result within {timeout:.0f} s") from None
        finally:
            browser.terminate()
            try:
                browser.wait(timeout=20)
            except subprocess.TimeoutExpired:
                browser.kill()
                browser.wait()
    if not result.get("ok"):
        raise PlayerError(f"the page failed: {result.get('error')}")
    return result


# -- CLI -----------------------------------------------------------------------------------------


def _driver_arg(value: str | None) -> Path | None:
    if value is None:
        return DEFAULT_DRIVER if DEFAULT_DRIVER.is_file() else None
    return None if value.lower() == "none" else Path(value)


def main(argv: list[str] | None = None) -> Path:
    """CLI: ``python -m lightning_modules.player [--run RUN] [--out player] [--driver VIDEO|none]
    [--max-frames 120] [--checkpoint NAME] [--measure [--isolated] [--runs 30]]``.

    Errors (no run, a missing driver, no Chromium for ``--measure``) exit with one line.
    """
    parser = argparse.ArgumentParser(
        prog="python -m lightning_modules.player",
        description="Write a static page that plays a GAR avatar with ONNX Runtime Web (make player).",
    )
    parser.add_argument("--run", default=str(DEFAULT_RUN), help=f"GAR run folder (default {DEFAULT_RUN.as_posix()})")
    parser.add_argument("--out", default="player", help="the folder to write (default player)")
    parser.add_argument("--driver", default=None,
                        help=f"driving video of the reenactment (default {DEFAULT_DRIVER.as_posix()} when present; "
                             "none: test frames only)")
    parser.add_argument("--max-frames", type=int, default=MAX_FRAMES, help=f"frames per driver (default {MAX_FRAMES})")
    parser.add_argument("--checkpoint", default=None, help="checkpoints/<NAME> (default best.ckpt, else last.ckpt)")
    parser.add_argument("--measure", action="store_true",
                        help="then open the page in headless Chromium and print its frames/s (needs npm ci in OUT)")
    parser.add_argument("--isolated", action="store_true",
                        help="with --measure: serve with COOP/COEP (multi-threaded WASM)")
    parser.add_argument("--runs", type=int, default=30, help="with --measure: frames timed (default 30)")
    args = parser.parse_args(argv)
    driver = _driver_arg(args.driver)
    try:
        out = build_player(args.run, args.out, driver, args.max_frames, args.checkpoint)
        plan = json.loads((out / CODES_NAME).read_text())["rasterizer"]
        print(f"wrote {out}/ ({ONNX_NAME}, {CODES_NAME}, the page; drivers: test"
              f"{', reenact (' + driver.name + ')' if driver else ''}); tile rasterizer capacity "
              f"{plan['tile_capacity']} per scale (exact on the {plan['planned_frames']} frames planned on: "
              f"{plan['tile_required']})", file=sys.stderr)
        if not (out / ORT_WEB_DIST).is_dir():
            print(f"next: npm ci --prefix {out} (installs onnxruntime-web {ORT_WEB_VERSION}; `make player` does it)",
                  file=sys.stderr)
        if args.measure:
            result = measure_in_chromium(out, runs=args.runs, isolated=args.isolated)
            print(json.dumps({k: v for k, v in result.items() if k != "rgb"}))
    except (PlayerError, ExportError, UpstreamMissingError, UpstreamChangedError) as err:
        raise SystemExit(f"error: {err}") from None
    return out


if __name__ == "__main__":
    main()
